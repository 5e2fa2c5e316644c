"""What the experiment commands share: loading their recipe from configs/, tiny models seeded
per experiment seed, running a stage once (reused when its result exists) under a persistent
compilation cache, mean ± std over seeds, and the
`--workdir W [--seed S] [--quick] | --aggregate W...` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'configs')


def load_recipe(name: str):
  """configs/NAME.py as a module (its constants and get_config)."""
  spec = importlib.util.spec_from_file_location(f'{name}_config',
                                                os.path.join(CONFIGS, name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def seeded_model(spec: str, seed: int) -> str:
  """A tiny:... spec with its init seed offset by the experiment seed."""
  if not spec.startswith('tiny:'):
    return spec
  parts = spec.split(',')
  for i, p in enumerate(parts):
    if p.startswith('seed='):
      parts[i] = f'seed={int(p[5:]) + 100 * seed}'
  return ','.join(parts)


def enable_compile_cache(workdir: str) -> None:
  """JAX's persistent compilation cache in WORKDIR/.jax_cache (unless one is configured):
  the stages compile the same programs (same model shapes, new jit objects), so later
  stages load them instead of compiling again."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run_stage(name: str, config, workdir: str, *, need_export: bool = False) -> dict:
  """Runs one stage unless its result.json (and export, when needed) already exists."""
  stage_dir = os.path.join(workdir, name)
  result_path = os.path.join(stage_dir, 'result.json')
  if os.path.exists(result_path) and (not need_export or os.path.exists(
      os.path.join(stage_dir, 'export', 'config.json'))):
    with open(result_path) as f:
      out = json.load(f)
    print(f'=== {name}: reused ({result_path})', flush=True)
    return out
  from opd_jax.train import run
  print(f'\n=== {name} ===', flush=True)
  t0 = time.time()
  result = run(config, stage_dir)
  out = {'history': result.get('history', {}), 'final': result.get('final') or {},
         'step': result.get('step'), 'preempted': result.get('preempted', False),
         'wall_s': time.time() - t0, 'lr': float(config.optim.lr)}
  if out['preempted']:
    raise RuntimeError(f'stage {name} was preempted; rerun to continue')
  with open(result_path + '.tmp', 'w') as f:
    json.dump(out, f)
  os.replace(result_path + '.tmp', result_path)
  return out


def mean_std(xs):
  """(mean, sample std, count) of the values that are not None; (None, None, 0) if none."""
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None, 0
  m = sum(xs) / len(xs)
  s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, s, len(xs)


def fmt_seeds(values, fmt: str = '.1%') -> str:
  """One value, or 'mean ± std' (sample std) over seeds; None entries are skipped."""
  values = [v for v in values if v is not None]
  if not values:
    return '—'
  if len(values) == 1:
    return format(values[0], fmt)
  m, s, _ = mean_std(values)
  return f'{format(m, fmt)} ± {format(s, fmt.replace("+", ""))}'


def cli(doc: str, default_workdir: str, run_experiment, aggregate, argv=None) -> None:
  """Runs one seed (`run_experiment(workdir, seed=, quick=)`) or, with --aggregate, the
  mean ± std over finished seeds (`aggregate(workdirs, out_dir)`)."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default=default_workdir)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='the shrunk pipeline check (a few minutes)')
  parser.add_argument('--aggregate', nargs='+', metavar='WORKDIR',
                      help="mean ± std over these seeds' results.json (no training); writes "
                           'aggregate.md and the plots into --workdir')
  args = parser.parse_args(argv)
  if args.aggregate:
    aggregate(args.aggregate, args.workdir)
  else:
    run_experiment(args.workdir, seed=args.seed, quick=args.quick)
