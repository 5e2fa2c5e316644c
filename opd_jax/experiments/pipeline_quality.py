"""Pipelined OPD's quality on the demo's task: rollout.max_staleness=1 vs the synchronous
loop at equal steps, over seeds, with the importance ratios that correct the lag.

  python -m opd_jax.experiments.pipeline_quality --workdir runs/pipeq --seed 0   # then 1, 2
  python -m opd_jax.experiments.pipeline_quality --workdir runs/pipeq/agg --aggregate runs/pipeq
  python -m opd_jax.experiments.pipeline_quality --workdir /tmp/pipeq_quick --quick

Stages (configs/demo_arithmetic.py, each the ordinary trainer; a finished stage is reused):
the demo's data, teacher (SFT on clean solutions) and student (SFT on noisy ones), then from
that student OPD against the teacher twice with the same seed, prompts, steps and learning
rate: `sync_seedS` (max_staleness 0) and `pipelined_seedS` (max_staleness 1: batch k + 1 is
sampled with the parameters from before update k; docs/design.md §11). The teacher, the
student and the data are the same for every seed (trained once per workdir, with seed 0);
`--seed` sets the OPD runs' seed (prompt order, sampling); each seed writes
WORKDIR/seedS.json and WORKDIR/seedS.md, and `--aggregate WORKDIR` reads them all.
Printed: held-out greedy accuracy and reverse KL at the end of each run, their
difference, and the pipelined run's ρ = exp(s − s_b) statistics over its updates.
"""

from __future__ import annotations

import json
import os

from opd_jax.experiments.common import (cli, enable_compile_cache, fmt_seeds, load_recipe,
                                        run_stage)

TINY_TEACHER = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=11'
TINY_STUDENT = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=12'
RHO = ('is/ratio_mean', 'is/ratio_min', 'is/ratio_max', 'is/sampler_logprob_gap')


def _config(stage: str, paths: dict, *, seed: int, quick: bool, staleness: int = 0):
  c = load_recipe('demo_arithmetic').get_config('opd' if stage in ('sync', 'pipelined')
                                                else stage)
  c.unlock()
  c.data.train.arith = paths['noisy_train' if stage == 'student' else 'train']
  c.data.eval.arith = paths['eval']
  if stage in ('sync', 'pipelined'):
    c.student.model = paths['student']
    c.seed = seed
    c.rollout.max_staleness = staleness
  if 'teacher' in c.teachers:
    c.teachers.teacher.model = paths['teacher']
  if quick:  # the demo's --tiny sizes
    c.eval.num_prompts = c.eval.batch_size = 32
    c.log_every = 5
    if stage == 'teacher':
      c.student.model, c.total_steps = TINY_TEACHER, 80
    elif stage == 'student':
      c.student.model, c.total_steps = TINY_STUDENT, 40
    else:
      c.total_steps, c.eval_every, c.optim.lr = 20, 10, 3e-3
      c.rollout.prompts_per_step = 32
  c.lock()
  return c


def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False) -> dict:
  from opd_jax.tasks.arithmetic import write_dataset
  os.makedirs(workdir, exist_ok=True)
  enable_compile_cache(workdir)
  paths = write_dataset(os.path.join(workdir, 'data'), n_train=2000 if quick else 20000,
                        n_eval=32 if quick else 256, seed=0)
  paths['teacher'] = os.path.join(workdir, 'teacher', 'export')
  paths['student'] = os.path.join(workdir, 'student', 'export')
  results = {}
  for stage in ('teacher', 'student'):
    results[stage] = run_stage(stage, _config(stage, paths, seed=0, quick=quick), workdir,
                               need_export=True)
  for stage, staleness in (('sync', 0), ('pipelined', 1)):
    results[stage] = run_stage(f'{stage}_seed{seed}', _config(
        stage, paths, seed=seed, quick=quick, staleness=staleness), workdir)
  summary = summarize(results)
  summary['seed'] = seed
  with open(os.path.join(workdir, f'seed{seed}.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  text = table([summary])
  with open(os.path.join(workdir, f'seed{seed}.md'), 'w') as f:
    f.write(text + '\n')
  print('\n' + text, flush=True)
  return summary


def summarize(results: dict) -> dict:
  """Final held-out accuracy / reverse KL of both OPD runs, their steps, and the pipelined
  run's ρ statistics over its updates (mean of the per-update mean, extreme min and max)."""
  out = {'teacher_accuracy': results['teacher']['final'].get('eval/accuracy')}
  for name in ('sync', 'pipelined'):
    r = results[name]
    out[name] = {'accuracy': r['final'].get('eval/accuracy'),
                 'reverse_kl': r['final'].get('eval/reverse_kl'), 'steps': r['step'],
                 'start_accuracy': (r['history'].get('eval/accuracy') or [(0, None)])[0][1]}
  h = results['pipelined']['history']
  vals = {k: [v for _, v in h.get(k, [])] for k in RHO + ('pipeline/staleness',)}
  out['rho'] = {
      'mean': sum(vals['is/ratio_mean']) / max(len(vals['is/ratio_mean']), 1),
      'min': min(vals['is/ratio_min'], default=None),
      'max': max(vals['is/ratio_max'], default=None),
      'sampler_logprob_gap': (sum(vals['is/sampler_logprob_gap'])
                              / max(len(vals['is/sampler_logprob_gap']), 1)),
      'staleness': max(vals['pipeline/staleness'], default=None),
      'updates': len(vals['is/ratio_mean'])}
  return out


def table(summaries: list[dict]) -> str:
  """The comparison over the given seeds (mean ± sample std)."""
  def col(name, key):
    return [s[name][key] for s in summaries]
  diff = [p - q for p, q in zip(col('pipelined', 'accuracy'), col('sync', 'accuracy'))
          if p is not None and q is not None]
  rho = [s['rho'] for s in summaries]
  lines = [f'seeds: {", ".join(str(s.get("seed")) for s in summaries)}; '
           f'{summaries[0]["sync"]["steps"]} steps each; teacher '
           f'{fmt_seeds([s["teacher_accuracy"] for s in summaries])}',
           '',
           '| OPD loop | held-out accuracy (start → end) | held-out reverse KL |',
           '|---|---|---|']
  for name, label in (('sync', 'synchronous (max_staleness 0)'),
                      ('pipelined', 'pipelined (max_staleness 1)')):
    lines.append(f'| {label} | {fmt_seeds(col(name, "start_accuracy"))} → '
                 f'{fmt_seeds(col(name, "accuracy"))} | '
                 f'{fmt_seeds(col(name, "reverse_kl"), ".3f")} |')
  lines += ['', f'pipelined − synchronous accuracy: {fmt_seeds(diff, "+.1%")} '
                f'(per seed: {", ".join(format(d, "+.1%") for d in diff)})',
            f'pipelined ρ = exp(s − s_b): mean {fmt_seeds([r["mean"] for r in rho], ".4f")}, '
            f'min {min(r["min"] for r in rho):.3f}, max {max(r["max"] for r in rho):.3f}, '
            f'sampler logprob gap {fmt_seeds([r["sampler_logprob_gap"] for r in rho], ".4f")}, '
            f'staleness {max(r["staleness"] for r in rho):.0f}']
  return '\n'.join(lines)


def aggregate(workdirs: list[str], out_dir: str) -> str:
  """The table over every seedS.json in `workdirs`, written to OUT_DIR/aggregate.md."""
  import glob
  summaries = []
  for w in workdirs:
    for path in sorted(glob.glob(os.path.join(w, 'seed*.json'))):
      with open(path) as f:
        summaries.append(json.load(f))
  if not summaries:
    raise FileNotFoundError(f'no seed*.json in {", ".join(workdirs)}: run the seeds first')
  text = table(summaries)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'aggregate.md'), 'w') as f:
    f.write(text + '\n')
  print(text, flush=True)
  return text


def main(argv=None):
  cli(__doc__, 'runs/pipeq', run_experiment, aggregate, argv)


if __name__ == '__main__':
  main()
