"""Sampled-token OPD vs exact and top-k reverse KL, on the compute-efficiency task (CPU):

  python -m opd_jax.experiments.divergences --workdir runs/div/seed0 [--seed 0]
  python -m opd_jax.experiments.divergences --workdir /tmp/div_quick --quick

Every method minimises the same objective, the reverse KL(π_θ ‖ q) to the teacher at each
position of the student's own samples (docs/design.md §3.2), with a different estimate of
its gradient:
  opd           sampled-token OPD: advantage −(s_b − t) on the sampled token (k1), policy
                gradient (the compute-efficiency experiment's 'opd' stage, unchanged);
  exact         `loss.full_vocab='reverse_kl_exact'`: KL(p_s ‖ p_t) over the whole
                vocabulary, computed in the update from the teacher's hidden states;
  topk          `loss.full_vocab='reverse_kl'`: on the teacher's top-20 tokens + a tail;
  student_topk  `loss.full_vocab='reverse_kl_student_topk'`: the teacher scores the
                student's top-20 tokens + a tail.
The last three have `rl.use_opd=False` (no sampled-token term) and `full_vocab_coef=1`.

Stages (the ordinary trainer; a stage whose result.json exists is reused, so a workdir of
`opd_jax.experiments.compute_efficiency` can be passed and its data, teacher, student and
'opd' runs are reused): data, teacher SFT, student SFT (configs/compute_efficiency.py), then
each method over the same learning-rate sweep, the lr chosen per method by final greedy
accuracy on the validation split (never the held-out set), all from the same student
checkpoint with the same prompts, steps and sequences per step.

Gradient variance: at the student checkpoint (fixed parameters), NB independent rollout
batches of the method runs' size (32 prompts, T = 1) are drawn and scored by the teacher;
on each batch the gradient of every estimator's loss is taken (token-mean, the update's own
loss function). Reported per estimator: the per-parameter variance over the batches
(unbiased, averaged over parameters), the norm of the mean gradient, and the cosine between
its mean gradient and the exact one's.

Outputs in WORKDIR: results.md (the tables, also printed as the last lines), results.json,
divergences.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from opd_jax.experiments import common
from opd_jax.experiments import compute_efficiency as ce

METHODS = ('opd', 'exact', 'topk', 'student_topk')
METHOD_NAMES = {'opd': 'sampled-token OPD (k1)', 'exact': 'exact reverse KL (full vocab)',
                'topk': 'teacher top-20 + tail', 'student_topk': 'student top-20 + tail'}
OPTION = {'exact': 'reverse_kl_exact', 'topk': 'reverse_kl',
          'student_topk': 'reverse_kl_student_topk'}
TOP_K = 20
GRAD_BATCHES = 20
QUICK_GRAD_BATCHES = 2


def _shrink_quick(c, stage: str):
  """--quick: fewer steps and evaluation prompts than the recipe's quick form (a pipeline
  check only; its numbers mean nothing)."""
  c.unlock()
  c.eval.pass_k = []  # greedy accuracy only (every held-out and validation prompt)
  if stage in ('teacher', 'student'):
    c.total_steps = 4 if stage == 'teacher' else 2
    c.log_every = 2
  else:
    c.total_steps = c.eval_every = c.log_every = 2
  c.lock()
  return c


def stage_config(recipe, stage: str, paths: dict, *, seed: int, quick: bool):
  c = ce.stage_config(recipe, stage, paths, seed=seed, quick=quick)
  return _shrink_quick(c, stage) if quick else c


def method_config(recipe, method: str, paths: dict, *, seed: int, quick: bool, lr=None):
  """The compute-efficiency 'opd' stage, with the method's gradient estimator."""
  c = ce.stage_config(recipe, 'opd', paths, seed=seed, quick=quick, lr=lr)
  if quick:
    c = _shrink_quick(c, method)
  if method == 'opd':
    return c
  c.unlock()
  c.rl.use_opd = False               # no sampled-token term: the divergence alone
  c.loss.full_vocab = OPTION[method]
  c.loss.full_vocab_coef = 1.0
  c.loss.full_vocab_top_k = TOP_K
  c.lock()
  return c


# ---------------------------------------------------------------------- gradient variance
def gradient_variance(recipe, paths: dict, *, seed: int, quick: bool, n_batches: int) -> dict:
  """Per-estimator gradient statistics over `n_batches` rollout batches at the student
  checkpoint (see the module docstring)."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from opd_jax.training import builder
  from opd_jax.objectives import advantages as token_adv
  from opd_jax.rollout.engine import rollout_arrays
  from opd_jax import sharding as shd
  from opd_jax.teachers.local import LocalTeacher, route_matrix, score_teachers
  from opd_jax.train import load_data
  from opd_jax.training.update import UpdateBatch, _loss_terms

  config = method_config(recipe, 'exact', paths, seed=seed, quick=quick)
  mesh = shd.make_mesh(dict(config.mesh))
  data = load_data(config)
  r = builder.build_run(config, mesh, tokenizer=data.tokenizer)
  t0 = r.teachers[0]
  # One teacher call gives everything: logprobs (sampled-token), top-k, hidden states.
  teacher = LocalTeacher(t0.spec, student_mesh=mesh, top_k=TOP_K,
                         temperature=float(config.rollout.temperature),
                         parts=(t0.graphdef, t0.params, t0.cfg), with_hidden=True)
  specs = {m: dataclasses.replace(r.loss, full_vocab=OPTION.get(m),
                                  full_vocab_coef=0.0 if m == 'opd' else 1.0)
           for m in METHODS}
  graphdef = r.graphdef

  def grad_fn(spec):
    def loss(params, batch):
      total, _ = _loss_terms(params, graphdef, batch, spec)
      return total / jnp.maximum(jnp.sum(batch.loss_mask), 1.0)
    return jax.jit(jax.grad(loss))
  grad_fns = {m: grad_fn(s) for m, s in specs.items()}
  params = r.params
  cast = r.cast_fn()
  base_key = jax.random.key(10_000 + seed)
  grads = {m: [] for m in METHODS}
  for i in range(n_batches):
    records = data.prompts.next_batch(int(config.rollout.prompts_per_step))
    with jax.set_mesh(mesh):
      rollout = r.sampler(cast(params), data.encoder.encode_batch(records),
                          jax.random.fold_in(base_key, i), r.rollout_sp)
    tokens, attn, lmask, s_b = rollout_arrays(rollout)
    route = route_matrix([x.tag for x in records], r.specs)
    t, extras = score_teachers([teacher], tokens, attn, route, out_sharding=tokens.sharding,
                               count=False)
    adv, _, _ = token_adv.advantages(s_b, t, None, r.coef_J, jnp.asarray(route), lmask, None,
                                 mode='opd')
    ex = extras[teacher.name]
    full = UpdateBatch(tokens, attn, lmask, behaviour_logprobs=s_b, advantages=adv,
                       teacher_top_ids=ex['top_ids'], teacher_top_logprobs=ex['top_logprobs'],
                       teacher_hidden=ex['hidden'], teacher_unembed=r.teacher_unembed)
    for m in METHODS:
      batch = full
      if m != 'opd':  # the divergence alone: no advantage term
        batch = dataclasses.replace(full, advantages=jnp.zeros_like(adv))
      with jax.set_mesh(mesh):
        g = grad_fns[m](params, batch)
      grads[m].append(np.concatenate([np.asarray(x, np.float64).ravel()
                                      for x in jax.tree.leaves(g)]))
  out = {}
  mean_exact = np.mean(grads['exact'], axis=0)
  for m in METHODS:
    g = np.stack(grads[m])
    mean = g.mean(0)
    out[m] = {'mean_param_variance': float(g.var(0, ddof=1).mean()),
              'mean_grad_norm': float(np.linalg.norm(mean)),
              'mean_batch_grad_norm': float(np.linalg.norm(g, axis=1).mean()),
              'cosine_to_exact': float(mean @ mean_exact / max(
                  np.linalg.norm(mean) * np.linalg.norm(mean_exact), 1e-30))}
  out['num_params'] = int(grads['exact'][0].size)
  out['batches'] = int(n_batches)
  out['rows_per_batch'] = int(config.rollout.prompts_per_step)
  return out


# ------------------------------------------------------------------------------- report
def table(summary: dict) -> str:
  init = summary['student_accuracy']
  lines = [
      f'teacher held-out accuracy {summary["teacher_accuracy"]:.1%}; student init '
      f'{init:.1%}. Learning rate chosen per method by final greedy validation accuracy.',
      '',
      '| method | best lr | final held-out accuracy (greedy) | best on the curve | total '
      'training FLOPs | update FLOPs | held-out points gained per 1e11 FLOPs |',
      '|---|---|---|---|---|---|---|']
  for m, r in summary['rows'].items():
    gain = (r['accuracy'] - init) / (r['total_flops'] / 1e11)
    lines.append(f'| {METHOD_NAMES.get(m, m)} | {r["best_lr"]:g} | {r["accuracy"]:.1%} | '
                 f'{r["best_accuracy"]:.1%} | {r["total_flops"]:.3g} | '
                 f'{r["phases"].get("update", 0):.3g} | {100 * gain:+.2f} |')
  gv = summary['grad']
  lines += ['', f'Gradient statistics at the student checkpoint over {gv["batches"]} rollout '
            f'batches of {gv["rows_per_batch"]} sequences ({gv["num_params"]:,} parameters):',
            '', '| estimator | mean per-parameter variance | variance / exact | norm of the '
            'mean gradient | its noise, sqrt(P var / N) | mean norm of one batch\'s gradient | '
            'cosine(mean, exact mean) |',
            '|---|---|---|---|---|---|---|']
  ref = gv['exact']['mean_param_variance']
  for m in METHODS:
    g = gv[m]
    noise = (gv['num_params'] * g['mean_param_variance'] / gv['batches']) ** 0.5
    lines.append(f'| {METHOD_NAMES[m]} | {g["mean_param_variance"]:.3e} | '
                 f'{g["mean_param_variance"] / ref:.2f} | {g["mean_grad_norm"]:.3e} | '
                 f'{noise:.3e} | {g["mean_batch_grad_norm"]:.3e} | {g["cosine_to_exact"]:.3f} |')
  return '\n'.join(lines)


def plot(summary: dict, path: str, title: str = ''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  colors = {'opd': 'tab:blue', 'exact': 'tab:red', 'topk': 'tab:green',
            'student_topk': 'tab:purple'}
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
  for m, r in summary['rows'].items():
    pts = [(f, a) for f, a, _ in r['curve'] if f > 0]
    start = [a for f, a, _ in r['curve'] if f == 0]
    if not pts:
      continue
    xs, ys = zip(*pts)
    if start:  # step 0 drawn at a third of the first point's FLOPs
      xs, ys = (xs[0] / 3,) + xs, (start[0],) + ys
    ax.plot(xs, ys, 'o-', ms=3, color=colors.get(m),
            label=f'{METHOD_NAMES.get(m, m)} (lr {r["best_lr"]:g})')
  ax.axhline(summary['teacher_accuracy'], color='gray', ls='--', label='teacher')
  ax.set_xscale('log')
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel('cumulative training FLOPs (analytic)')
  ax.set_ylabel('held-out accuracy (greedy)')
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7, loc='upper left')
  gv = summary['grad']
  names = list(METHODS)
  bx.bar(range(len(names)), [gv[m]['mean_param_variance'] for m in names],
         color=[colors[m] for m in names])
  bx.set_xticks(range(len(names)))
  bx.set_xticklabels([m.replace('_', '\n') for m in names], fontsize=8)
  bx.set_yscale('log')
  bx.set_ylabel('mean per-parameter gradient variance')
  bx.set_title(f'{gv["batches"]} rollout batches at the student checkpoint', fontsize=9)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------ driver
def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False,
                   grad_batches: int | None = None, lrs_override=None) -> dict:
  recipe = ce.load_recipe()
  lrs = tuple(recipe.QUICK_LRS if quick else recipe.LRS)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  if hasattr(ce, 'enable_compile_cache'):
    common.enable_compile_cache(workdir)
  paths = ce.write_data(os.path.join(workdir, 'data'), quick=quick)
  paths['teacher'] = os.path.join(workdir, 'teacher', 'export')
  paths['student'] = os.path.join(workdir, 'student', 'export')
  stages, walls = {}, {}
  for stage in ('teacher', 'student'):
    stages[stage] = common.run_stage(stage, stage_config(recipe, stage, paths, seed=seed,
                                                     quick=quick), workdir, need_export=True)
    walls[stage] = stages[stage]['wall_s']
  t0 = time.time()
  nb = grad_batches or (QUICK_GRAD_BATCHES if quick else GRAD_BATCHES)
  grad_path = os.path.join(workdir, f'grad_variance_{nb}.json')
  if os.path.exists(grad_path):
    with open(grad_path) as f:
      grad = json.load(f)
    print(f'=== gradient variance: reused ({grad_path})', flush=True)
  else:
    print('\n=== gradient variance ===', flush=True)
    grad = gradient_variance(recipe, paths, seed=seed, quick=quick, n_batches=nb)
    grad['wall_s'] = time.time() - t0
    with open(grad_path, 'w') as f:
      json.dump(grad, f, indent=1)
  walls['grad_variance'] = grad['wall_s']
  lrs = tuple(lrs_override or lrs)
  for lr in lrs:  # every method at one lr, then the next (a cut-short sweep stays balanced)
    for m in METHODS:
      name = f'{m}_lr{lr:g}'
      stages[name] = common.run_stage(name, method_config(recipe, m, paths, seed=seed, quick=quick,
                                                      lr=lr), workdir)
      walls[name] = stages[name]['wall_s']
  summary = ce.summarize(stages, METHODS, lrs)
  summary.update(seed=seed, quick=quick, grad=grad, stage_wall_s=walls,
                 wall_s=time.time() - t_start, lrs=list(lrs))
  text = table(summary)
  text += ('\n\nseed ' + str(seed) + '; stage wall times: '
           + ', '.join(f'{k} {v:.0f}s' for k, v in walls.items())
           + f'; this invocation {summary["wall_s"]:.0f} s')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  plot(summary, os.path.join(workdir, 'divergences.png'), title=f'seed {seed}')
  print('\n' + text, flush=True)
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/div/seed0')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true', help='a pipeline check (about a minute)')
  parser.add_argument('--grad-batches', type=int, default=None,
                      help=f'rollout batches for the gradient variance (default '
                           f'{GRAD_BATCHES}, --quick {QUICK_GRAD_BATCHES})')
  parser.add_argument('--lrs', type=float, nargs='+', default=None,
                      help='the learning-rate sweep (default: configs/compute_efficiency.py LRS)')
  args = parser.parse_args(argv)
  run_experiment(args.workdir, seed=args.seed, quick=args.quick, grad_batches=args.grad_batches,
                 lrs_override=args.lrs)


if __name__ == '__main__':
  main()
