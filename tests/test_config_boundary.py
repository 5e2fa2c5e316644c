"""The config boundary (docs/design.md §1): only the trainer, `training/`, `tools/`,
`experiments/` and `bench/` read a `ConfigDict`; `models/ data/ objectives/ rollout/
teachers/` take typed specs. Read from the source with `ast`:

  python tests/test_config_boundary.py [PACKAGE_DIR]   lists the modules with a function that
                                                       takes a ConfigDict (or a section of one)

A function counts when a parameter is named `config`, is annotated `ConfigDict`, or is read
as `param.<a section of base_config()>` (`c.rollout.temperature`), or when the function is a
`from_config` / `*_from_config` (it receives a section, such as `config.teachers.NAME`).
"""

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'opd_jax')
SECTIONS = {'student', 'teachers', 'gopd', 'rollout', 'agent', 'loss', 'rl', 'optim', 'sft',
            'checkpoint', 'export', 'debug'}  # not mesh, data, eval, batch: common attribute names
BELOW = ('models', 'data', 'objectives', 'rollout', 'teachers')


def _takes_config(fn) -> bool:
  args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
  names = {a.arg for a in args} - {'self', 'cls'}
  if fn.name == 'from_config' or fn.name.endswith('_from_config'):
    return True
  for a in args:
    if a.arg == 'config' or (a.annotation is not None and 'ConfigDict' in ast.unparse(a.annotation)):
      return True
  for node in ast.walk(fn):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in names and node.attr in SECTIONS
        and isinstance(node.ctx, ast.Load)):
      # `x.rollout` where x is a parameter: a whole config (not e.g. `run.student_cfg`)
      return True
  return False


def config_modules(root: str = ROOT) -> dict[str, list[str]]:
  """{module path relative to the package: [functions that take a ConfigDict]}."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(d, f)
      with open(path) as fh:
        tree = ast.parse(fh.read())
      fns = [n.name for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _takes_config(n)]
      if fns:
        out[os.path.relpath(path, root).replace(os.sep, '/')] = sorted(set(fns))
  return dict(sorted(out.items()))


def test_no_config_below_the_trainer():
  below = {m: f for m, f in config_modules().items() if m.split('/')[0] in BELOW}
  assert not below, below


if __name__ == '__main__':
  mods = config_modules(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
  below = [m for m in mods if m.split('/')[0] in BELOW]
  print(f'modules_taking_config={len(mods)} below_the_trainer={len(below)}')
  for m, fns in mods.items():
    print(f'  {m}: {", ".join(fns)}')
