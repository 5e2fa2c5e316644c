"""Compute efficiency of on-policy distillation (OPD) vs RL and off-policy distillation, in
miniature on a CPU:

  python -m opd_jax.experiments.compute_efficiency --workdir runs/ce/seed0 --seed 0
  python -m opd_jax.experiments.compute_efficiency --workdir /tmp/ce_quick --quick
  python -m opd_jax.experiments.compute_efficiency --aggregate runs/ce/seed0 runs/ce/seed1 ...

Stages (each the ordinary trainer `opd_jax.train.run` on configs/compute_efficiency.py:STAGE;
a stage whose result.json exists in its directory is reused, so an interrupted run continues):
  data      chained arithmetic mod 10 (opd_jax/tasks/chain.py): train / validation / held-out
            eval, pairwise disjoint;
  teacher   SFT of the larger model on the written solutions;
  student   a short SFT of the smaller model (a mediocre starting point);
  methods   from that same student checkpoint, the same prompts (data files, seed) and the
            same number of steps x training sequences per step, each of
              opd          pure OPD (teacher kl_coef 1),
              sft_teacher  SFT on responses the teacher samples at T=1 (sampling FLOPs counted),
              grpo         GRPO on the exact-match reward, GROUP samples per prompt, no teacher,
              mixed        GRPO + the teacher's KL term,
            over the same learning-rate sweep. Each method's learning rate is chosen by its
            final greedy accuracy on the validation split (drawn from the training
            distribution, disjoint from the held-out set); the held-out set is only reported.

The evaluation of every method run covers both the held-out set (tag 'chain') and the
validation split (tag 'val') in one pass; training FLOPs (`compute/flops/*` of the trainer's
history, analytic, evaluation excluded) are cumulative at every evaluation step.
Outputs in WORKDIR: results.md (the table, also printed as the last lines), results.json,
accuracy_vs_flops.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

from opd_jax.experiments.common import enable_compile_cache, mean_std, run_stage, seeded_model

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'configs', 'compute_efficiency.py')

HELD_OUT = 'chain'     # tag of the held-out eval records (and of the training records)
VAL = 'val'            # tag of the validation split
TARGET_FRACTION = 0.9  # "reaches the teacher": 90% of the teacher's held-out accuracy
# secondary, lower target: halfway from the student's initial accuracy to the teacher's
MID_FRACTION = 0.5
METHOD_NAMES = {'opd': 'OPD (pure)', 'sft_teacher': 'SFT on teacher samples',
                'grpo': 'RL (GRPO)', 'mixed': 'GRPO + OPD'}


def load_recipe():
  spec = importlib.util.spec_from_file_location('compute_efficiency_config', _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_data(directory: str, *, quick: bool) -> dict:
  """train / val / eval JSONL (fixed problems for every seed and method); the validation
  records carry tag 'val' so that one evaluation reports both sets separately."""
  from opd_jax.tasks import chain
  paths = chain.write_dataset(directory, n_train=2000 if quick else 20000,
                              n_val=32 if quick else 128, n_eval=32 if quick else 256, seed=0)
  with open(paths['val']) as f:
    recs = [json.loads(line) for line in f]
  paths['val_tagged'] = os.path.join(directory, 'val_tagged.jsonl')
  chain.write_jsonl(paths['val_tagged'], [{**r, 'tag': VAL} for r in recs])
  return paths


def stage_config(recipe, stage: str, paths: dict, *, seed: int, quick: bool, lr=None):
  c = recipe.get_config(stage + (',quick' if quick else ''))
  c.unlock()
  c.seed = seed
  c.data.train.chain = paths['train']
  c.data.eval = {'chain': paths['eval'], 'val': paths['val_tagged']}
  c.rl.tag_to_reward = {HELD_OUT: 'exact_match', VAL: 'exact_match'}
  c.eval.num_prompts = 0  # every held-out and validation record
  if stage in ('teacher', 'student'):
    c.student.model = seeded_model(c.student.model, seed)
  else:
    c.student.model = paths['student']
    c.eval.temperature = 1.0  # pass@1 at T=1 (accuracy is always greedy)
  if 'teacher' in c.teachers:
    c.teachers.teacher.model = paths['teacher']
  if lr is not None:
    c.optim.lr = lr
  c.lock()
  return c


# ---------------------------------------------------------------------------- analysis
def _series(history: dict, key: str) -> list[tuple[int, float]]:
  return [(int(s), float(v)) for s, v in history.get(key, [])]


def flops_at(history: dict, key: str = 'compute/flops/total') -> dict[int, float]:
  """Cumulative training FLOPs by logged step (0 at step 0)."""
  out = {0: 0.0}
  out.update(dict(_series(history, key)))
  return out


def accuracy_curve(history: dict, tag: str = HELD_OUT) -> list[tuple[float, float, int]]:
  """[(cumulative FLOPs, held-out greedy accuracy, step)] at every evaluation."""
  fl = flops_at(history)
  curve = []
  for step, acc in _series(history, f'eval/accuracy/{tag}'):
    if step not in fl:
      raise KeyError(f'no compute/flops/total at eval step {step}: log_every must divide '
                     'eval_every')
    curve.append((fl[step], acc, step))
  return curve


def flops_to_reach(curve, target: float):
  """FLOPs at which the accuracy curve first reaches `target`, linearly interpolated
  between the two evaluations around the crossing; None if never reached."""
  prev = None
  for f, a, _ in curve:
    if a >= target:
      if prev is None or prev[1] >= target:
        return f
      (f0, a0) = prev
      return f0 + (target - a0) / (a - a0) * (f - f0)
    prev = (f, a)
  return None


def summarize(stages: dict, methods, lrs) -> dict:
  """Chooses each method's learning rate on validation and collects its numbers."""
  teacher_acc = stages['teacher']['final'][f'eval/accuracy/{HELD_OUT}']
  target = TARGET_FRACTION * teacher_acc
  student_acc = stages['student']['final'][f'eval/accuracy/{HELD_OUT}']
  mid_target = student_acc + MID_FRACTION * (teacher_acc - student_acc)
  rows = {}
  for m in methods:
    cands = []
    for lr in lrs:
      r = stages[f'{m}_lr{lr:g}']
      val_curve = _series(r['history'], f'eval/accuracy/{VAL}')
      # final validation accuracy; ties broken by the mean over the curve
      cands.append((r['final'][f'eval/accuracy/{VAL}'],
                    sum(v for _, v in val_curve) / max(len(val_curve), 1), -lr, lr))
    best_lr = max(cands)[3]
    r = stages[f'{m}_lr{best_lr:g}']
    curve = accuracy_curve(r['history'])
    phases = {k[len('compute/flops/'):]: v[-1][1] for k, v in r['history'].items()
              if k.startswith('compute/flops/') and v}
    rows[m] = {
        'best_lr': best_lr,
        'val_accuracy': {f'{lr:g}': c[0] for c, lr in zip(cands, lrs)},
        'accuracy': r['final'][f'eval/accuracy/{HELD_OUT}'],
        'pass1_t1': r['final'].get(f'eval/pass@1/{HELD_OUT}'),
        'flops_to_target': flops_to_reach(curve, target),
        'flops_to_mid': flops_to_reach(curve, mid_target),
        'best_accuracy': max(a for _, a, _ in curve),
        'total_flops': phases['total'],
        'phases': phases,
        'curve': curve,
        'wall_s': r['wall_s'],
        'sweep_wall_s': sum(stages[f'{m}_lr{lr:g}']['wall_s'] for lr in lrs),
    }
  for key, suffix in (('flops_to_target', ''), ('flops_to_mid', '_mid')):
    opd_f = rows.get('opd', {}).get(key)
    for m, row in rows.items():
      f = row[key]
      row['ratio_to_opd' + suffix] = (f / opd_f) if (f is not None and opd_f) else None
      # not reached: the ratio is at least the run's total FLOPs over OPD's FLOPs-to-target
      row['ratio_lower_bound' + suffix] = ((row['total_flops'] / opd_f)
                                           if (f is None and opd_f) else None)
  return {'teacher_accuracy': teacher_acc, 'target': target, 'mid_target': mid_target,
          'student_accuracy': student_acc, 'rows': rows}


def _fmt_flops(x):
  return 'not reached' if x is None else f'{x:.3g}'


def table(summary: dict, stage_walls: dict | None = None) -> str:
  lines = ['| method | best lr (by validation) | final held-out accuracy (greedy) | '
           'pass@1 at T=1 | FLOPs to reach 90% of teacher | ratio to OPD | FLOPs to reach '
           'halfway (ratio to OPD) | total training FLOPs | wall time (best lr run / whole '
           'sweep) |',
           '|---|---|---|---|---|---|---|---|---|']
  for m, r in summary['rows'].items():
    if r['ratio_to_opd'] is not None:
      ratio = f'{r["ratio_to_opd"]:.2f}x'
    elif r['ratio_lower_bound'] is not None:
      ratio = f'> {r["ratio_lower_bound"]:.2f}x'
    else:
      ratio = '—'
    p1 = '—' if r['pass1_t1'] is None else f'{r["pass1_t1"]:.1%}'
    mid = _fmt_flops(r.get('flops_to_mid'))
    if r.get('ratio_to_opd_mid') is not None:
      mid += f' ({r["ratio_to_opd_mid"]:.2f}x)'
    elif r.get('ratio_lower_bound_mid') is not None:
      mid += f' (> {r["ratio_lower_bound_mid"]:.2f}x)'
    lines.append(f'| {METHOD_NAMES.get(m, m)} | {r["best_lr"]:g} | {r["accuracy"]:.1%} | {p1} | '
                 f'{_fmt_flops(r["flops_to_target"])} | {ratio} | {mid} | '
                 f'{r["total_flops"]:.3g} | '
                 f'{r["wall_s"]:.0f} s / {r["sweep_wall_s"]:.0f} s |')
  head = (f'teacher held-out accuracy {summary["teacher_accuracy"]:.1%} (target 90%: '
          f'{summary["target"]:.1%}); student init {summary["student_accuracy"]:.1%}; halfway '
          f'target {summary.get("mid_target", float("nan")):.1%}. '
          'Learning rate chosen per method by final greedy accuracy on the validation split '
          '(training distribution), not on the held-out set.')
  return head + '\n\n' + '\n'.join(lines)


def plot(summary: dict, path: str, title: str = ''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401
  colors = {'opd': 'tab:blue', 'sft_teacher': 'tab:orange', 'grpo': 'tab:green',
            'mixed': 'tab:purple'}
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  xs_all = []
  for m, r in summary['rows'].items():
    pts = [(f, a) for f, a, _ in r['curve'] if f > 0]
    start = [a for f, a, _ in r['curve'] if f == 0]
    if not pts:
      continue
    xs, ys = zip(*pts)
    xs_all += xs
    if start:  # step 0 (no FLOPs yet) drawn at a third of the first point's FLOPs
      xs, ys = (xs[0] / 3,) + xs, (start[0],) + ys
    ax.plot(xs, ys, 'o-', ms=3, color=colors.get(m), label=f'{METHOD_NAMES.get(m, m)} '
            f'(lr {r["best_lr"]:g})')
  ax.axhline(summary['teacher_accuracy'], color='gray', ls='--', label='teacher')
  ax.axhline(summary['target'], color='gray', ls=':', label='90% of teacher')
  ax.set_xscale('log')
  ax.set_xlabel('cumulative training FLOPs (student + teacher, analytic)')
  ax.set_ylabel('held-out accuracy (greedy)')
  ax.set_ylim(0, 1.05)
  if title:
    ax.set_title(title)
  ax.legend(fontsize=8, loc='upper left')
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------ driver
def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False) -> dict:
  recipe = load_recipe()
  lrs = tuple(recipe.QUICK_LRS if quick else recipe.LRS)
  methods = tuple(recipe.METHODS)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  enable_compile_cache(workdir)
  t0 = time.time()
  paths = write_data(os.path.join(workdir, 'data'), quick=quick)
  walls = {'data': time.time() - t0}
  paths['teacher'] = os.path.join(workdir, 'teacher', 'export')
  paths['student'] = os.path.join(workdir, 'student', 'export')
  stages = {}
  for stage in ('teacher', 'student'):
    stages[stage] = run_stage(stage, stage_config(recipe, stage, paths, seed=seed, quick=quick),
                              workdir, need_export=True)
    walls[stage] = stages[stage]['wall_s']
  for m in methods:
    for lr in lrs:
      name = f'{m}_lr{lr:g}'
      stages[name] = run_stage(name, stage_config(recipe, m, paths, seed=seed, quick=quick,
                                                  lr=lr), workdir)
      walls[name] = stages[name]['wall_s']
  summary = summarize(stages, methods, lrs)
  summary['seed'] = seed
  summary['quick'] = quick
  summary['stage_wall_s'] = walls
  summary['wall_s'] = time.time() - t_start
  summary['stage_wall_sum_s'] = sum(walls.values())
  summary['budget'] = {'steps': int(stages[f'{methods[0]}_lr{lrs[0]:g}']['step']),
                       'rows_per_step': recipe.ROWS_PER_STEP, 'group': recipe.GROUP,
                       'lrs': list(lrs)}
  text = table(summary)
  walls_txt = ', '.join(f'{k} {v:.0f}s' for k, v in walls.items())
  text += (f'\n\nseed {seed}; stage wall times: {walls_txt}; sum of stages '
           f'{summary["stage_wall_sum_s"]:.0f} s (reused stages count their original run); '
           f'this invocation {summary["wall_s"]:.0f} s')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  plot(summary, os.path.join(workdir, 'accuracy_vs_flops.png'), title=f'seed {seed}')
  print('\n' + text, flush=True)
  return summary


# --------------------------------------------------------------------------- aggregate
def aggregate(workdirs, out_dir: str | None = None) -> str:
  """Mean ± std (sample std over seeds) of every seed's results.json; also plots the mean
  curves. Returns (and prints) the markdown."""
  sums = []
  for w in workdirs:
    with open(os.path.join(w, 'results.json')) as f:
      sums.append(json.load(f))
  n = len(sums)

  def ms(xs, fmt):
    m, s, k = mean_std(xs)
    if m is None:
      return 'not reached'
    txt = f'{format(m, fmt)} ± {format(s, fmt)}'
    return txt + (f' ({k}/{n} seeds)' if k < n else '')

  t = [x['teacher_accuracy'] for x in sums]
  st = [x['student_accuracy'] for x in sums]
  lines = [f'{n} seeds ({", ".join(str(x["seed"]) for x in sums)}); teacher held-out accuracy '
           f'{ms(t, ".1%")}, student init {ms(st, ".1%")}; target = 90% of each seed\'s teacher; '
           'halfway = student init + half the gap to the teacher (per seed).',
           '',
           '| method | best lr per seed | final held-out accuracy (greedy) | pass@1 at T=1 | '
           'FLOPs to reach 90% of teacher | ratio to OPD (per seed, then mean ± std) | '
           'FLOPs to reach halfway | ratio to OPD at halfway (per seed, then mean ± std) | '
           'best held-out accuracy on the curve | total training FLOPs | wall time per run (s) |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for m in sums[0]['rows']:
    rows = [x['rows'][m] for x in sums]
    ratios = []
    for r in rows:
      if r['ratio_to_opd'] is not None:
        ratios.append(f'{r["ratio_to_opd"]:.2f}')
      elif r['ratio_lower_bound'] is not None:
        ratios.append(f'>{r["ratio_lower_bound"]:.2f}')
      else:
        ratios.append('—')
    rvals = [r['ratio_to_opd'] for r in rows]
    lrs_txt = ', '.join(format(r['best_lr'], 'g') for r in rows)
    rtxt = ', '.join(ratios) + (f' → {ms(rvals, ".2f")}' if any(v is not None for v in rvals)
                                else '')
    ratios_mid = []
    for r in rows:
      if r.get('ratio_to_opd_mid') is not None:
        ratios_mid.append(f'{r["ratio_to_opd_mid"]:.2f}')
      elif r.get('ratio_lower_bound_mid') is not None:
        ratios_mid.append(f'>{r["ratio_lower_bound_mid"]:.2f}')
      else:
        ratios_mid.append('—')
    rvals_mid = [r.get('ratio_to_opd_mid') for r in rows]
    rtxt_mid = ', '.join(ratios_mid) + (f' → {ms(rvals_mid, ".2f")}'
                                        if any(v is not None for v in rvals_mid) else '')
    lines.append(
        f'| {METHOD_NAMES.get(m, m)} | {lrs_txt} | '
        f'{ms([r["accuracy"] for r in rows], ".1%")} | '
        f'{ms([r["pass1_t1"] for r in rows], ".1%")} | '
        f'{ms([r["flops_to_target"] for r in rows], ".3g")} | {rtxt} | '
        f'{ms([r.get("flops_to_mid") for r in rows], ".3g")} | {rtxt_mid} | '
        f'{ms([r.get("best_accuracy") for r in rows], ".1%")} | '
        f'{ms([r["total_flops"] for r in rows], ".3g")} | '
        f'{ms([r["wall_s"] for r in rows], ".0f")} |')
  walls = [x.get('stage_wall_sum_s', x['wall_s']) for x in sums]
  lines += ['', f'wall time per seed (sum of its stages): {ms(walls, ".0f")} s']
  text = '\n'.join(lines)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'aggregate.md'), 'w') as f:
      f.write(text + '\n')
    _plot_seeds(sums, os.path.join(out_dir, 'accuracy_vs_flops_seeds.png'))
  print(text, flush=True)
  return text


def _plot_seeds(sums, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401
  colors = {'opd': 'tab:blue', 'sft_teacher': 'tab:orange', 'grpo': 'tab:green',
            'mixed': 'tab:purple'}
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, x in enumerate(sums):
    for m, r in x['rows'].items():
      pts = [(f, a) for f, a, _ in r['curve'] if f > 0]
      if not pts:
        continue
      xs, ys = zip(*pts)
      ax.plot(xs, ys, 'o-', ms=2.5, alpha=0.75, color=colors.get(m),
              label=METHOD_NAMES.get(m, m) if i == 0 else None)
    ax.axhline(x['teacher_accuracy'], color='gray', ls='--', alpha=0.6,
               label='teacher' if i == 0 else None)
  ax.set_xscale('log')
  ax.set_xlabel('cumulative training FLOPs (student + teacher, analytic)')
  ax.set_ylabel('held-out accuracy (greedy)')
  ax.set_ylim(0, 1.05)
  ax.set_title(f'{len(sums)} seeds (one line per seed)')
  ax.legend(fontsize=8, loc='upper left')
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/ce/seed0')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true', help='a ~3-minute pipeline check')
  parser.add_argument('--aggregate', nargs='+', metavar='WORKDIR',
                      help="print mean ± std over these seeds' results.json (no training); "
                           'writes aggregate.md and a plot into --workdir')
  args = parser.parse_args(argv)
  if args.aggregate:
    aggregate(args.aggregate, out_dir=args.workdir)
  else:
    run_experiment(args.workdir, seed=args.seed, quick=args.quick)


if __name__ == '__main__':
  main()
