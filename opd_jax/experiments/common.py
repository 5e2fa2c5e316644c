"""What the experiment commands share: loading their recipe from configs/ and the
`--workdir W [--seed S] [--quick] | --aggregate W...` command line."""

from __future__ import annotations

import argparse
import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'configs')


def load_recipe(name: str):
  """configs/NAME.py as a module (its constants and get_config)."""
  spec = importlib.util.spec_from_file_location(f'{name}_config',
                                                os.path.join(CONFIGS, name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fmt_seeds(values, fmt: str = '.1%') -> str:
  """One value, or 'mean ± std' (sample std) over seeds; None entries are skipped."""
  from opd_jax.experiments.compute_efficiency import _mean_std
  values = [v for v in values if v is not None]
  if not values:
    return '—'
  if len(values) == 1:
    return format(values[0], fmt)
  m, s, _ = _mean_std(values)
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
