"""The package's import graph, read from the source (every `import`, inside functions too):
no cycle, and imports point one way, down the layers of docs/design.md §1.

  python tests/test_imports.py [PACKAGE_DIR]   prints the cycles (none) and any import
                                               against the layers (default: this opd_jax/)
"""

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'opd_jax')

# Lowest first; a module may import its own package and any lower layer, never a higher one.
LAYERS = (
    ('opd_jax', 'opd_jax.sharding', 'opd_jax.policy', 'opd_jax.buckets', 'opd_jax.config_lib'),
    ('opd_jax.models',),
    ('opd_jax.data', 'opd_jax.rewards', 'opd_jax.tasks'),
    ('opd_jax.envs',),
    ('opd_jax.objectives',),
    ('opd_jax.rollout',),
    ('opd_jax.teachers',),
    ('opd_jax.training',),
    ('opd_jax.train',),
    ('opd_jax.tools', 'opd_jax.experiments', 'opd_jax.bench'),
)


def modules() -> dict[str, str]:
  """{dotted module name: path} of every module under opd_jax/."""
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
  return out


def graph() -> dict[str, set[str]]:
  """{module: the opd_jax modules it imports}, counting imports made inside functions."""
  mods = modules()
  out = {}
  for m, path in mods.items():
    pkg = m if path.endswith('__init__.py') else m.rpartition('.')[0]
    deps = set()
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = pkg.split('.')[:len(pkg.split('.')) - node.level + 1]
          base = '.'.join(parts + ([base] if base else []))
        for a in node.names:
          deps.add(f'{base}.{a.name}' if f'{base}.{a.name}' in mods else base)
    out[m] = {d for d in deps if d in mods and d != m}
  return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  sys.setrecursionlimit(10000)

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def layer(m: str) -> tuple[int, str]:
  """(layer index, package) of a module: the longest matching entry of LAYERS."""
  best = None
  for i, names in enumerate(LAYERS):
    for n in names:
      if (m == n or m.startswith(n + '.')) and (best is None or len(n) > len(best[1])):
        best = (i, n)
  assert best is not None, m
  return best


def upward(g: dict[str, set[str]]) -> list[str]:
  """Imports of a higher layer, or of another package of the same layer."""
  bad = []
  for m, deps in sorted(g.items()):
    lm, pm = layer(m)
    for d in sorted(deps):
      ld, pd = layer(d)
      if ld > lm or (ld == lm and pd != pm and lm > 0):
        bad.append(f'{m} -> {d}')
  return bad


def test_no_import_cycle():
  assert cycles(graph()) == []


def test_imports_point_down_the_layers():
  assert upward(graph()) == []


def test_every_module_has_a_layer():
  for m in modules():
    layer(m)


if __name__ == '__main__':
  if len(sys.argv) > 1:
    ROOT = os.path.abspath(sys.argv[1])
  g = graph()
  cyc, up = cycles(g), upward(g)
  print(f'modules={len(g)} import_cycles={len(cyc)} upward_imports={len(up)}')
  for c in cyc:
    print('cycle:', ' '.join(c))
  for u in up:
    print('upward:', u)
