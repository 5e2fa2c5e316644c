"""The CPU demo, end to end from nothing:

  python -m opd_jax.tools.demo --workdir runs/demo

1. writes the synthetic addition task (clean and noisy training sets, held-out eval set);
2. trains a teacher by SFT on clean solutions;
3. trains a smaller student by SFT on noisy solutions (half of them forget carries);
4. runs on-policy distillation of the student against the teacher;
5. runs the off-policy baseline (SFT on clean solutions, same budget);
and prints a table (held-out accuracy and reverse KL to the teacher), writes it to
WORKDIR/results.md and plots the curves to WORKDIR/*.png. Each stage is the ordinary
trainer (`opd_jax.train.run`) on configs/demo_arithmetic.py; a finished stage is reused.
`--tiny` shrinks everything to a ~1-minute smoke run (used by the tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = os.path.join(_ROOT, 'configs', 'demo_arithmetic.py')


def _stage_config(stage: str, paths: dict, tiny: bool):
  spec = importlib.util.spec_from_file_location('demo_arithmetic', _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(stage)
  c.unlock()
  c.data.train.arith = paths['noisy_train' if stage == 'student' else 'train']
  c.data.eval.arith = paths['eval']
  if stage in ('opd', 'sft_more'):
    c.student.model = paths['student']
  if 'teacher' in c.teachers:
    c.teachers.teacher.model = paths['teacher']
  if tiny:  # seconds per stage; the curves are short but the loop is the real one
    c.eval.num_prompts = 32
    c.eval.batch_size = 32
    c.log_every = 5
    if stage == 'teacher':
      c.student.model = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=11'
      c.total_steps = 80
    elif stage == 'student':
      c.student.model = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=12'
      c.total_steps = 40
    else:
      c.total_steps = 30
      c.eval_every = 15
      c.optim.lr = 3e-3
      c.rollout.prompts_per_step = 32
      c.sft.batch_size = 32
  c.lock()
  return c


def _final(result: dict) -> dict:
  return result.get('final') or {}


def run_demo(workdir: str, *, tiny: bool = False, stages=('teacher', 'student', 'opd', 'sft_more')):
  from opd_jax.tasks.arithmetic import write_dataset
  from opd_jax.train import run

  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  paths = write_dataset(os.path.join(workdir, 'data'), n_train=2000 if tiny else 20000,
                        n_eval=32 if tiny else 256, seed=0)
  paths['teacher'] = os.path.join(workdir, 'teacher', 'export')
  paths['student'] = os.path.join(workdir, 'student', 'export')
  results, times = {}, {}
  for stage in stages:
    t0 = time.time()
    print(f'\n=== {stage} ===', flush=True)
    results[stage] = run(_stage_config(stage, paths, tiny), os.path.join(workdir, stage))
    times[stage] = time.time() - t0
  wall = time.time() - t_start

  # ------------------------------------------------------------------------ the table
  opd = results.get('opd', {})
  hist = opd.get('history', {})
  before = {k: v for s, v in hist.get('eval/accuracy', [])[:1] for k in ['acc']}
  before_kl = dict(hist.get('eval/reverse_kl', [])[:1])
  rows = [('teacher (SFT, 3x96)', _final(results.get('teacher', {})).get('eval/accuracy'), None)]
  first_acc = hist.get('eval/accuracy', [(0, None)])[0][1]
  first_kl = hist.get('eval/reverse_kl', [(0, None)])[0][1]
  rows.append(('student before OPD (SFT on noisy data, 2x64)', first_acc, first_kl))
  rows.append(('student after OPD', _final(opd).get('eval/accuracy'),
               _final(opd).get('eval/reverse_kl')))
  if 'sft_more' in results:
    f = _final(results['sft_more'])
    rows.append(('student after SFT on clean data (baseline)', f.get('eval/accuracy'),
                 f.get('eval/reverse_kl')))
  del before, before_kl

  def fmt(x, spec):
    return '—' if x is None else format(x, spec)
  lines = ['| model | held-out accuracy | reverse KL to teacher (nats/token) |',
           '|---|---|---|']
  lines += [f'| {name} | {fmt(acc, ".1%")} | {fmt(kl, ".3f")} |' for name, acc, kl in rows]
  table = '\n'.join(lines)
  steps_note = ', '.join(f'{s} {times[s]:.0f}s' for s in times)
  summary = f'{table}\n\nwall time {wall:.0f}s ({steps_note})'
  print('\n' + summary, flush=True)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(summary + '\n')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'rows': rows, 'times': times, 'wall_s': wall,
               'history': {s: r.get('history', {}) for s, r in results.items()}}, f)
  if opd:
    plot_curves(results, workdir)
  return {'rows': rows, 'results': results, 'wall_s': wall, 'table': table}


def plot_curves(results: dict, workdir: str):
  """Reverse KL and accuracy over steps (OPD vs the SFT baseline) as PNGs."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  opd = results['opd']['history']
  ax = axes[0]
  if 'opd/reverse_kl' in opd:
    s, v = zip(*opd['opd/reverse_kl'])
    ax.plot(s, v, color='tab:blue', alpha=0.35, label='OPD: training batch')
  for name, color in (('opd', 'tab:blue'), ('sft_more', 'tab:orange')):
    h = results.get(name, {}).get('history', {})
    if 'eval/reverse_kl' in h:
      s, v = zip(*h['eval/reverse_kl'])
      ax.plot(s, v, 'o-', color=color, label=f'{"OPD" if name == "opd" else "SFT baseline"}: '
                                               'held-out')
  ax.set_xlabel('step')
  ax.set_ylabel('reverse KL to teacher (nats/token)')
  ax.legend()
  ax = axes[1]
  for name, color in (('opd', 'tab:blue'), ('sft_more', 'tab:orange')):
    h = results.get(name, {}).get('history', {})
    if 'eval/accuracy' in h:
      s, v = zip(*h['eval/accuracy'])
      ax.plot(s, v, 'o-', color=color, label='OPD' if name == 'opd' else 'SFT baseline')
  teacher_acc = _final(results.get('teacher', {})).get('eval/accuracy')
  if teacher_acc is not None:
    ax.axhline(teacher_acc, color='gray', ls='--', label='teacher')
  ax.set_xlabel('step')
  ax.set_ylabel('held-out accuracy (greedy)')
  ax.set_ylim(0, 1.05)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'demo_curves.png'), dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--tiny', action='store_true', help='a ~1-minute smoke run')
  args = parser.parse_args(argv)
  run_demo(args.workdir, tiny=args.tiny)


if __name__ == '__main__':
  main()
