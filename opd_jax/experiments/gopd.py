"""G-OPD / ExOPD claims in miniature on a CPU: extrapolating beyond the teacher, merging
domain teachers, and reward correction with a larger teacher.

  python -m opd_jax.experiments.gopd --workdir runs/gopd/seed0 --seed 0 [--gate-only]
      [--no-claim3]   (--gate-only: stop after the experts gate; --no-claim3: claims 1, 2)
  python -m opd_jax.experiments.gopd --workdir /tmp/gopd_quick --quick
  python -m opd_jax.experiments.gopd --workdir runs/gopd/agg --aggregate runs/gopd/seed0 ...

G-OPD's advantage per student token is A = λ (t − r) − (s_b − r) with t the teacher's, r the
reference's and s_b the behaviour logprob; λ = 1 is pure OPD, λ > 1 is ExOPD (reward
extrapolation: t − r is the teacher's implicit reward when the teacher is the reference
plus RL). Stages (each the ordinary trainer on configs/gopd.py:STAGE; a stage whose
result.json exists is reused, so an interrupted run continues):

  data        2-digit addition ('add') and subtraction ('sub') written out column by column
              (opd_jax/tasks/arithmetic.py); noisy training solutions (a share
              CARRY_ERROR_RATE forget their carries / borrows), clean validation sets (tag
              DOMAIN_val) and clean held-out sets, pairwise disjoint.
  base        the small model (2x64) after SFT on the noisy solutions of both domains: the
              shared pre-RL base and every distillation run's student init.
  rl_add_lrX, rl_sub_lrX   domain teachers: GRPO from `base` on one domain's exact-match
              reward, one run per learning rate X in RL_LRS; each domain's expert is the
              run with the best final VALIDATION pass@1 on its domain.
  gate        before any distillation, the experts gate (a table and PASS / FAIL): each
              expert's held-out pass@1 at least GATE_OVER_BASE above the base on its own
              domain and GATE_OVER_OTHER above the other expert there. rl_curves.png: the
              experts' validation pass@1, training reward and share of GRPO groups with
              unequal rewards vs step. A full run stops here when the gate fails (and
              always with --gate-only); --quick continues (a pipeline check).
  large_base  (after the gate) the same SFT of a larger model (3x96).
  rl_large    the larger teacher: GRPO from `large_base` on 'add' at the add expert's rate.
  claim 1     single domain ('add'), teacher rl_add, reference = base (the student's init):
              G-OPD for λ in {0, 0.5, 1, 1.25, 1.5, 2}.
  claim 2     both domains, teachers rl_add / rl_sub routed by tag: SFT on the teachers'
              samples, OPD (λ = 1), ExOPD (λ = 1.25).
  claim 3     'add', the larger teacher rl_large, the small student: OPD, ExOPD (λ = 1.25,
              reference = the student's init), ExOPD + reward correction (reference =
              large_base, the teacher's pre-RL base).

Every distillation run has the same student init, prompt stream, steps, training sequences
per step and learning-rate grid (configs/gopd.py:DISTILL_LRS), each method's rate chosen
alike on the validation split (one stage per rate, NAME_lrX). Held-out accuracy is pass@1 at T=1 (4
samples per prompt; the paper's sampled accuracy), with greedy exact match beside it (it
saturates near 100% here); response length is of the greedy held-out responses; entropy is
the policy's mean per-token entropy on its own training samples (T=1) over the last quarter
of the run. The
reference's scoring FLOPs are counted like a teacher's (compute/flops/reference).
Outputs in WORKDIR: results.md (the gate and the tables, also printed as the last lines),
results.json, rl_curves.png, accuracy_vs_lambda.png, per_domain.png.
"""

from __future__ import annotations

import functools
import json
import os
import time

from opd_jax.experiments.common import (cli, enable_compile_cache, fmt_seeds as _fmt,
                                        load_recipe as _load, run_stage, seeded_model)

DOMAINS = ('add', 'sub')
EXOPD_LAMBDA = 1.25


def load_recipe():
  return _load('gopd')


def write_data(directory: str, recipe, *, quick: bool) -> dict:
  """Per domain: noisy training set, clean validation set (tag DOMAIN_val: the RL learning
  rate is chosen on it) and clean held-out set, pairwise disjoint (asserted); the same for
  every seed."""
  from opd_jax.tasks import arithmetic, chain
  os.makedirs(directory, exist_ok=True)
  n_train, n_val, n_eval = (1000, 16, 32) if quick else (recipe.N_TRAIN, recipe.N_VAL,
                                                         recipe.N_EVAL)
  k = recipe.DIGITS
  paths = {}
  for d, op, s in (('add', '+', 0), ('sub', '-', 10)):
    ev = arithmetic.make_records(n_eval, seed=s + 1, prefix=f'{d}-eval', op=op, tag=d,
                                 min_digits=k, max_digits=k)
    held = {r['prompt'] for r in ev}
    va = arithmetic.make_records(n_val, seed=s + 2, prefix=f'{d}-val', op=op, tag=f'{d}_val',
                                 exclude=held, min_digits=k, max_digits=k)
    val = {r['prompt'] for r in va}
    tr = arithmetic.make_records(n_train, seed=s, prefix=f'{d}-train', op=op, tag=d,
                                 exclude=held | val, carry_error_rate=recipe.CARRY_ERROR_RATE,
                                 sub_error=recipe.SUB_ERROR, min_digits=k, max_digits=k)
    train = {r['prompt'] for r in tr}
    assert not held & train and not val & train and not held & val, \
        f'{d}: train, validation and held-out overlap'
    for name, recs in (('train', tr), ('val', va), ('eval', ev)):
      paths[f'{d}_{name}'] = os.path.join(directory, f'{d}_{name}.jsonl')
      chain.write_jsonl(paths[f'{d}_{name}'], recs)
  return paths


def _config(recipe, stage: str, paths: dict, *, seed: int, quick: bool, student: str,
            data: dict, teachers: dict | None = None, lam: float | None = None,
            reference: str | None = None, eval_domains=DOMAINS, lr: float | None = None,
            validation: bool = False):
  c = recipe.get_config(stage + (',quick' if quick else ''))
  c.unlock()
  c.seed = seed
  c.student.model = student
  c.data.train = data
  c.data.eval = {d: paths[f'{d}_eval'] for d in eval_domains}
  if validation:  # metrics under the tag DOMAIN_val
    c.data.eval.update({f'{d}_val': paths[f'{d}_val'] for d in eval_domains})
  if lr is not None:
    c.optim.lr = float(lr)
  if teachers is not None:
    from opd_jax.config_lib import teacher
    c.teachers = {}
    for name, (path, tags) in teachers.items():
      c.teachers[name] = teacher(path, kl_coef=1.0, tags=list(tags))
  if lam is not None:
    c.gopd.enabled = True
    c.gopd.reward_scale = float(lam)
    c.gopd.reference = reference or 'student_init'
  c.lock()
  return c


def _acc(stage: dict, domain: str, kind: str = 'pass1') -> float | None:
  """Final held-out accuracy: 'pass1' (pass@1 at T=1, 4 samples per prompt) or 'greedy'."""
  key = f'eval/pass@1/{domain}' if kind == 'pass1' else f'eval/accuracy/{domain}'
  return stage['final'].get(key)


def _at_start(stage: dict, domain: str, kind: str = 'pass1') -> float | None:
  """The step-0 evaluation of a run (its init), from the history."""
  key = f'eval/pass@1/{domain}' if kind == 'pass1' else f'eval/accuracy/{domain}'
  return dict((int(s), v) for s, v in stage['history'].get(key, [])).get(0)


def _last_quarter(history: dict, key: str):
  xs = [v for _, v in history.get(key, [])]
  if not xs:
    return None
  k = max(1, len(xs) // 4)
  return sum(xs[-k:]) / k


def _row(stage: dict, domains) -> dict:
  h, f = stage['history'], stage['final']
  fl = h.get('compute/flops/total', [])
  return {'pass1': {d: _acc(stage, d) for d in domains},
          'greedy': {d: _acc(stage, d, 'greedy') for d in domains},
          'response_len': {d: f.get(f'eval/response_len/{d}') for d in domains},
          'entropy': _last_quarter(h, 'policy/entropy'),
          'train_response_len': _last_quarter(h, 'rollout/response_len'),
          'flops': fl[-1][1] if fl else None,
          'flops_reference': (h.get('compute/flops/reference') or [[0, 0.0]])[-1][1],
          'lr': stage.get('lr'),
          'curve': {d: [(int(s), float(v)) for s, v in h.get(f'eval/pass@1/{d}', [])]
                    for d in domains},
          'wall_s': stage['wall_s']}


def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False,
                   gate_only: bool = False, claim3: bool = True) -> dict:
  recipe = load_recipe()
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  enable_compile_cache(workdir)
  paths = write_data(os.path.join(workdir, 'data'), recipe, quick=quick)
  exp = lambda name: os.path.join(workdir, name, 'export')  # noqa: E731
  both = {d: paths[f'{d}_train'] for d in DOMAINS}
  add = {'add': paths['add_train']}
  cfg = lambda stage, **kw: _config(recipe, stage, paths, seed=seed, quick=quick,  # noqa: E731
                                    **kw)
  small = recipe.QUICK_SMALL if quick else recipe.SMALL
  large = recipe.QUICK_LARGE if quick else recipe.LARGE
  st = {}
  # ------------------------------------------------------------ bases and teachers
  st['base'] = run_stage('base', cfg('base', student=seeded_model(small, seed), data=both),
                         workdir, need_export=True)
  # the experts: GRPO from the base on one domain, one run per learning rate; the rate is
  # chosen on the validation split's pass@1 (held-out is only reported)
  lrs = recipe.QUICK_RL_LRS if quick else recipe.RL_LRS
  chosen = {}
  for d in DOMAINS:
    runs = {lr: run_stage(f'rl_{d}_lr{lr:g}', cfg('rl', student=exp('base'),
                                                  data={d: paths[f'{d}_train']}, lr=lr,
                                                  validation=True), workdir, need_export=True)
            for lr in lrs}
    chosen[d] = select_lr(runs, d)
    st[f'rl_{d}'] = runs[chosen[d]]
    st[f'rl_{d}_sweep'] = runs
  rl_dir = {d: f'rl_{d}_lr{chosen[d]:g}' for d in DOMAINS}
  gate = expert_gate(st, chosen, recipe)
  curves = rl_curves(st, chosen)
  plot_rl_curves(curves, workdir)
  print('\n' + gate_table([{'seed': seed, 'gate': gate}]), flush=True)
  if gate_only or (not gate['pass'] and not quick):
    summary = {'seed': seed, 'quick': quick, 'gate': gate, 'rl_curves': curves,
               'wall_s': time.time() - t_start,
               'stage_wall_s': _walls(st)}
    summary['stage_wall_sum_s'] = sum(summary['stage_wall_s'].values())
    text = gate_table([summary]) + (
        '\n\nstopped after the gate (' + ('--gate-only' if gate_only else
                                           'the gate failed: no distillation') + ')')
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(workdir, 'results.md'), 'w') as f:
      f.write(text + '\n')
    print('\n' + text, flush=True)
    return summary
  # every distillation method: one run per learning rate in DISTILL_LRS, the rate chosen on
  # the validation pass@1 (mean over the run's domains), the held-out numbers of that run
  dlrs = recipe.QUICK_DISTILL_LRS if quick else recipe.DISTILL_LRS

  def distill(name, stage, domains=DOMAINS, **kw):
    runs = {lr: run_stage(f'{name}_lr{lr:g}', cfg(stage, student=exp('base'), lr=lr,
                                                  validation=True, eval_domains=domains, **kw),
                          workdir) for lr in dlrs}
    st[name], st[f'{name}_sweep'] = runs[select_lr(runs, domains)], runs

  # ------------------------------------------------------ claim 1: the λ sweep on 'add'
  lambdas = recipe.QUICK_LAMBDAS if quick else recipe.LAMBDAS
  for lam in lambdas:
    distill(f'lambda{lam:g}', 'opd', ('add',), data=add,
            teachers={'teacher': (exp(rl_dir['add']), ())}, lam=lam)
  # --------------------------------------------- claim 2: two domain teachers, merged
  experts = {'add_expert': (exp(rl_dir['add']), ('add',)),
             'sub_expert': (exp(rl_dir['sub']), ('sub',))}
  distill('multi_sft', 'sft', data=both, teachers=experts)
  distill('multi_opd', 'opd', data=both, teachers=experts)
  distill('multi_exopd', 'opd', data=both, teachers=experts, lam=EXOPD_LAMBDA)
  # ---------------------------------- claim 3: a larger teacher, reward correction
  if claim3:
    st['large_base'] = run_stage('large_base', cfg('base', student=seeded_model(large, seed),
                                                   data=both), workdir, need_export=True)
    st['rl_large'] = run_stage('rl_large', cfg('rl', student=exp('large_base'), data=add,
                                               lr=chosen['add'], validation=True), workdir,
                               need_export=True)
    big = {'teacher': (exp('rl_large'), ())}
    distill('rc_opd', 'opd', ('add',), data=add, teachers=big)
    distill('rc_exopd', 'opd', ('add',), data=add, teachers=big, lam=EXOPD_LAMBDA)
    distill('rc_exopd_corrected', 'opd', ('add',), data=add, teachers=big, lam=EXOPD_LAMBDA,
            reference=exp('large_base'))
  summary = summarize(st, lambdas)
  summary.update(seed=seed, quick=quick, wall_s=time.time() - t_start, gate=gate,
                 rl_curves=curves,
                 stage_wall_s=_walls(st))
  summary['stage_wall_sum_s'] = sum(summary['stage_wall_s'].values())
  text = gate_table([summary]) + '\n\n' + tables(summary) + (
      f'\n\nseed {seed}; sum of stage wall times {summary["stage_wall_sum_s"]:.0f} s (reused '
      f'stages count their original run); this invocation {summary["wall_s"]:.0f} s')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  plot([summary], workdir)
  print('\n' + text, flush=True)
  return summary


# ------------------------------------------------------------------------- the experts
def _walls(st: dict) -> dict:
  """Wall seconds per stage run (every RL learning rate once)."""
  out = {}
  for k, v in st.items():
    if k.endswith('_sweep'):
      out.update({f'{k[:-6]}_lr{lr:g}': r['wall_s'] for lr, r in v.items()})
    elif f'{k}_sweep' not in st:  # not the chosen run of a sweep (counted there)
      out[k] = v['wall_s']
  return out


def select_lr(runs: dict, domains) -> float:
  """The learning rate whose run ends with the best validation pass@1 (mean over `domains`,
  one name or several; the first of the rates in order on a tie); held-out is never looked
  at."""
  domains = (domains,) if isinstance(domains, str) else tuple(domains)
  return max(runs, key=lambda lr: sum(_acc(runs[lr], f'{d}_val') or 0.0 for d in domains))


def expert_gate(st: dict, chosen: dict, recipe) -> dict:
  """Each expert's held-out pass@1 (T=1) on its own domain against the base (the step-0
  evaluation of its run) and against the other expert; PASS when every margin clears
  recipe.GATE_OVER_BASE / GATE_OVER_OTHER."""
  rows = {}
  for d, other in (('add', 'sub'), ('sub', 'add')):
    e, o = st[f'rl_{d}'], st[f'rl_{other}']
    mine, base, theirs = _acc(e, d), _at_start(e, d), _acc(o, d)
    over_base = None if mine is None or base is None else mine - base
    over_other = None if mine is None or theirs is None else mine - theirs
    ok = (over_base is not None and over_other is not None
          and over_base >= recipe.GATE_OVER_BASE - 1e-9
          and over_other >= recipe.GATE_OVER_OTHER - 1e-9)
    rows[d] = {'lr': chosen[d], 'base': base, 'expert': mine, 'other_expert': theirs,
               'over_base': over_base, 'over_other': over_other, 'pass': bool(ok),
               'val': _acc(e, f'{d}_val'), 'val_base': _at_start(e, f'{d}_val')}
  return {'rows': rows, 'pass': all(r['pass'] for r in rows.values()),
          'over_base': recipe.GATE_OVER_BASE, 'over_other': recipe.GATE_OVER_OTHER}


def gate_table(sums) -> str:
  """The experts gate, one line per seed and expert, then PASS / FAIL."""
  g0 = sums[0]['gate']
  out = [f'Experts gate (before any distillation): held-out pass@1 at T=1 on the expert\'s '
         f'own domain, at least +{100 * g0["over_base"]:.0f} points over the base and '
         f'+{100 * g0["over_other"]:.0f} over the other expert. GRPO learning rate chosen on '
         'validation pass@1.', '',
         '| seed | expert | lr (validation) | validation pass@1, base → expert | base | expert '
         '| other expert | over base (points) | over other (points) | gate |',
         '|---|---|---|---|---|---|---|---|---|---|']
  pct = lambda v: '—' if v is None else f'{v:.1%}'  # noqa: E731
  pts = lambda v: '—' if v is None else f'{100 * v:+.1f}'  # noqa: E731
  for x in sums:
    for d, r in x['gate']['rows'].items():
      out.append(f'| {x.get("seed")} | {d} expert | {r["lr"]:g} | {pct(r["val_base"])} → '
                 f'{pct(r["val"])} | {pct(r["base"])} | {pct(r["expert"])} | '
                 f'{pct(r["other_expert"])} | {pts(r["over_base"])} | '
                 f'{pts(r["over_other"])} | {"PASS" if r["pass"] else "FAIL"} |')
  ok = all(x['gate']['pass'] for x in sums)
  out += ['', f'GATE: {"PASS" if ok else "FAIL"} ('
          + ', '.join(f'seed {x.get("seed")} {"PASS" if x["gate"]["pass"] else "FAIL"}'
                      for x in sums) + ')']
  return '\n'.join(out)


def rl_curves(st: dict, chosen: dict) -> dict:
  """Per expert and learning rate: validation pass@1 on both domains, training reward and
  the share of groups with unequal rewards, vs step."""
  pairs = lambda h, k: [(int(a), float(b)) for a, b in h.get(k, [])]  # noqa: E731
  out = {}
  for d in DOMAINS:
    out[d] = {'chosen': chosen[d], 'runs': {}}
    for lr, r in st[f'rl_{d}_sweep'].items():
      h = r['history']
      out[d]['runs'][f'{lr:g}'] = {
          'val': {e: pairs(h, f'eval/pass@1/{e}_val') for e in DOMAINS},
          'reward': pairs(h, 'reward/mean'),
          'groups_with_signal': pairs(h, 'reward/groups_with_signal')}
  return out


def plot_rl_curves(curves: dict, out_dir: str, name: str = 'rl_curves.png') -> None:
  """Validation pass@1 vs GRPO step per learning rate (own domain solid, the other domain
  dashed), and the chosen runs' training reward and groups with signal."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if isinstance(curves, dict):
    curves = [curves]
  fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
  colors = ['tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple']
  for ax, d in zip(axes[:2], DOMAINS):
    other = [e for e in DOMAINS if e != d][0]
    lrs = list(curves[0][d]['runs'])
    for i, c in enumerate(curves):
      for j, lr in enumerate(lrs):
        run = c[d]['runs'][lr]
        lab = i == 0
        chosen = float(lr) == float(c[d]['chosen'])
        for e, ls in ((d, '-'), (other, '--')):
          xs = run['val'][e]
          if xs:
            ax.plot(*zip(*xs), ls, color=colors[j % len(colors)], alpha=0.9 if chosen else 0.45,
                    lw=2.0 if chosen else 1.0,
                    label=f'lr {lr}, {e}_val' if lab else None)
    ax.set_title(f'{d} expert (GRPO on {d}); bold: chosen lr', fontsize=9)
    ax.set_xlabel('GRPO step')
    ax.set_ylabel('validation pass@1 at T=1')
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
  ax = axes[2]
  for i, c in enumerate(curves):
    for k, d in enumerate(DOMAINS):
      run = c[d]['runs'][f'{c[d]["chosen"]:g}']
      for key, ls in (('reward', '-'), ('groups_with_signal', ':')):
        if run[key]:
          ax.plot(*zip(*run[key]), ls, color=colors[k], alpha=0.8,
                  label=f'{d} expert, {key.replace("_", " ")}' if i == 0 else None)
  ax.set_title('chosen runs: training reward (solid), groups with signal (dotted)',
               fontsize=9)
  ax.set_xlabel('GRPO step')
  ax.set_ylim(0, 1)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------- analysis
def summarize(st: dict, lambdas) -> dict:
  """Per seed: every model's held-out pass@1 at T=1 ('pass1') and greedy accuracy. The base
  models' pass@1 is the step-0 evaluation of runs that start from them."""
  both = lambda stage: {k: {d: _acc(stage, d, k) for d in DOMAINS}  # noqa: E731
                        for k in ('pass1', 'greedy')}
  teachers = {'add_expert': both(st['rl_add']), 'sub_expert': both(st['rl_sub'])}
  bases = {'base': {k: {d: _at_start(st['multi_opd'], d, k) for d in DOMAINS}
                    for k in ('pass1', 'greedy')}}
  sweep = {f'{lam:g}': _row(st[f'lambda{lam:g}'], ('add',)) for lam in lambdas}
  multi = {m: _row(st[f'multi_{m}'], DOMAINS) for m in ('sft', 'opd', 'exopd')}
  rc = None  # claim 3 not run (--no-claim3)
  if 'rl_large' in st:
    teachers['large'] = {k: {'add': _acc(st['rl_large'], 'add', k)} for k in ('pass1', 'greedy')}
    bases['large_base'] = {'pass1': {'add': _at_start(st['rl_large'], 'add')},
                           'greedy': {'add': _acc(st['large_base'], 'add', 'greedy')}}
    rc = {m: _row(st[f'rc_{m}'], ('add',)) for m in ('opd', 'exopd', 'exopd_corrected')}
  return {'teachers': teachers, 'bases': bases, 'sweep': sweep, 'multi': multi, 'rc': rc,
          'lambdas': [float(x) for x in lambdas], 'exopd_lambda': EXOPD_LAMBDA}


MULTI_NAMES = {'sft': 'SFT on the experts\' samples', 'opd': 'OPD (λ = 1)',
               'exopd': f'ExOPD (λ = {EXOPD_LAMBDA})'}
RC_NAMES = {'opd': 'OPD (λ = 1)', 'exopd': f'ExOPD (λ = {EXOPD_LAMBDA}, reference = student '
            'init)', 'exopd_corrected': f'ExOPD + reward correction (λ = {EXOPD_LAMBDA}, '
            'reference = the teacher\'s base)'}


def _mean(values) -> float:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else float('nan')


def _diff(a, b):
  return None if a is None or b is None else 100 * (a - b)


def tables(*sums) -> str:
  """The three tables (over one or several seeds' summaries)."""
  if len(sums) == 1 and isinstance(sums[0], (list, tuple)):
    sums = tuple(sums[0])
  g = lambda f: [f(x) for x in sums]  # noqa: E731
  both = lambda f: f'{_fmt(g(lambda x: f(x, "pass1")))} ({_fmt(g(lambda x: f(x, "greedy")))})'  # noqa
  out = [f'{len(sums)} seed(s): {", ".join(str(x.get("seed")) for x in sums)}. Held-out '
         'accuracy: pass@1 at T=1 (4 samples per prompt), greedy in parentheses; mean ± '
         'sample std over seeds.', '']
  t_add = lambda x, k: x['teachers']['add_expert'][k]['add']  # noqa: E731
  out += ['Claim 1: G-OPD on "add" from the base (2x64) with the add expert (base + GRPO) as '
          'teacher and the base as reference.', '',
          f'base {both(lambda x, k: x["bases"]["base"][k]["add"])}; teacher {both(t_add)}', '',
          '| λ | held-out pass@1 (greedy) | minus teacher, pass@1 points | greedy response '
          'length (tokens) | policy entropy (nats/token, training samples, last quarter) | '
          'training FLOPs, mean over seeds (of which reference) |', '|---|---|---|---|---|---|']
  for lam in sums[0]['lambdas']:
    k = f'{lam:g}'
    margin = g(lambda x: _diff(x['sweep'][k]['pass1']['add'], t_add(x, 'pass1')))
    out.append(f'| {k} | {both(lambda x, m: x["sweep"][k][m]["add"])} | '
               f'{_fmt(margin, "+.1f")} | '
               f'{_fmt(g(lambda x: x["sweep"][k]["response_len"]["add"]), ".1f")} | '
               f'{_fmt(g(lambda x: x["sweep"][k]["entropy"]), ".3f")} | '
               f'{_mean(g(lambda x: x["sweep"][k]["flops"])):.3g} '
               f'({_mean(g(lambda x: x["sweep"][k]["flops_reference"])):.2g}) |')
  out += ['', 'Claim 2: both domains from the base, the add expert and the sub expert routed '
          'by tag (pass@1 at T=1, greedy in parentheses).', '',
          '| model | add | sub |', '|---|---|---|',
          f'| base (student init) | {both(lambda x, k: x["bases"]["base"][k]["add"])} | '
          f'{both(lambda x, k: x["bases"]["base"][k]["sub"])} |']
  for e, name in (('add_expert', 'add expert (base + GRPO on add)'),
                  ('sub_expert', 'sub expert (base + GRPO on sub)')):
    out.append(f'| {name} | {both(lambda x, k: x["teachers"][e][k]["add"])} | '
               f'{both(lambda x, k: x["teachers"][e][k]["sub"])} |')
  for m, name in MULTI_NAMES.items():
    out.append(f'| {name} | {both(lambda x, k: x["multi"][m][k]["add"])} | '
               f'{both(lambda x, k: x["multi"][m][k]["sub"])} |')
  out += ['', '| method | add minus add expert (pass@1 points) | sub minus sub expert '
          '(pass@1 points) |', '|---|---|---|']
  for m, name in MULTI_NAMES.items():
    da = g(lambda x: _diff(x['multi'][m]['pass1']['add'],
                           x['teachers']['add_expert']['pass1']['add']))
    ds = g(lambda x: _diff(x['multi'][m]['pass1']['sub'],
                           x['teachers']['sub_expert']['pass1']['sub']))
    out.append(f'| {name} | {_fmt(da, "+.1f")} | {_fmt(ds, "+.1f")} |')
  def lr_line(group, names):
    per = lambda key: '/'.join(format(x[group][key]['lr'] or 0.0, 'g') for x in sums)  # noqa
    return ('learning rate chosen on validation, per seed: '
            + '; '.join(f'{name} {per(key)}' for key, name in names.items()))
  out += ['', lr_line('sweep', {f'{lam:g}': f'λ {lam:g}' for lam in sums[0]['lambdas']}),
          lr_line('multi', MULTI_NAMES)]
  if any(x.get('rc') is None for x in sums):
    out += ['', 'Claim 3: not run (--no-claim3).']
    return '\n'.join(out)
  out.append(lr_line('rc', RC_NAMES))
  t_big = lambda x, k: x['teachers']['large'][k]['add']  # noqa: E731
  out += ['', 'Claim 3: "add", the larger teacher (3x96 large_base + GRPO) into the small '
          'base.', '',
          f'larger teacher {both(t_big)}; its base '
          f'{both(lambda x, k: x["bases"]["large_base"][k]["add"])}; student init '
          f'{both(lambda x, k: x["bases"]["base"][k]["add"])}', '',
          '| method | held-out pass@1 (greedy) | minus teacher, pass@1 points | training FLOPs, '
          'mean over seeds (of which reference) |', '|---|---|---|---|']
  for m, name in RC_NAMES.items():
    margin = g(lambda x: _diff(x['rc'][m]['pass1']['add'], t_big(x, 'pass1')))
    out.append(f'| {name} | {both(lambda x, k: x["rc"][m][k]["add"])} | '
               f'{_fmt(margin, "+.1f")} | {_mean(g(lambda x: x["rc"][m]["flops"])):.3g} '
               f'({_mean(g(lambda x: x["rc"][m]["flops_reference"])):.2g}) |')
  return '\n'.join(out)


def plot(sums, out_dir: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  lams = sums[0]['lambdas']
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for i, x in enumerate(sums):
    ys = [x['sweep'][f'{lam:g}']['pass1']['add'] for lam in lams]
    ax.plot(lams, ys, 'o-', color='tab:blue', alpha=0.8, ms=4,
            label='G-OPD student' if i == 0 else None)
    ax.axhline(x['teachers']['add_expert']['pass1']['add'], color='gray', ls='--', alpha=0.7,
               label='teacher (base + GRPO)' if i == 0 else None)
    ax.axhline(x['bases']['base']['pass1']['add'], color='gray', ls=':', alpha=0.7,
               label='base (student init)' if i == 0 else None)
  ax.set_xlabel('λ (reward scale; 1 = OPD, > 1 = ExOPD)')
  ax.set_ylabel('held-out pass@1 at T=1 on add')
  ax.set_title(f'G-OPD λ sweep, {len(sums)} seed(s), one line per seed')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'accuracy_vs_lambda.png'), dpi=120)
  plt.close(fig)

  names = ['base', 'add expert', 'sub expert'] + [MULTI_NAMES[m] for m in MULTI_NAMES]
  vals = {d: [] for d in DOMAINS}
  for d in DOMAINS:
    per = [[x['bases']['base']['pass1'][d] for x in sums],
           [x['teachers']['add_expert']['pass1'][d] for x in sums],
           [x['teachers']['sub_expert']['pass1'][d] for x in sums]]
    per += [[x['multi'][m]['pass1'][d] for x in sums] for m in MULTI_NAMES]
    vals[d] = [(float(np.mean(p)), float(np.std(p, ddof=1)) if len(p) > 1 else 0.0)
               for p in per]
  fig, ax = plt.subplots(figsize=(7.5, 4.0))
  xs = np.arange(len(names))
  for k, d in enumerate(DOMAINS):
    ax.bar(xs + (k - 0.5) * 0.38, [m for m, _ in vals[d]], 0.38,
           yerr=[s for _, s in vals[d]], capsize=3, label=d)
  ax.set_xticks(xs)
  ax.set_xticklabels(names, rotation=20, ha='right', fontsize=8)
  ax.set_ylabel('held-out pass@1 at T=1')
  ax.set_ylim(0, 1.05)
  ax.set_title(f'Per-domain pass@1, merged experts ({len(sums)} seed(s), mean ± std)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'per_domain.png'), dpi=120)
  plt.close(fig)


def aggregate(workdirs, out_dir: str) -> str:
  sums = []
  for w in workdirs:
    with open(os.path.join(w, 'results.json')) as f:
      sums.append(json.load(f))
  text = gate_table(sums)
  os.makedirs(out_dir, exist_ok=True)
  plot_rl_curves([x['rl_curves'] for x in sums], out_dir, 'rl_curves_all.png')
  full = [x for x in sums if 'sweep' in x]
  if len(full) < len(sums):
    text += (f'\n\n{len(sums) - len(full)} of {len(sums)} seed(s) stopped at the gate; the '
             'claims tables below are over the others only' if full else
             '\n\nevery seed stopped at the gate: no claims tables')
  if full:
    text += '\n\n' + tables(full)
  walls = [x['stage_wall_sum_s'] for x in sums]
  text += f'\n\nwall time per seed (sum of its stages): {_fmt(walls, ".0f")} s'
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'aggregate.md'), 'w') as f:
    f.write(text + '\n')
  if full:
    plot(full, out_dir)
  print(text, flush=True)
  return text


def main(argv=None):
  import sys
  argv = list(sys.argv[1:] if argv is None else argv)
  gate_only = '--gate-only' in argv  # stop after the experts gate
  claim3 = '--no-claim3' not in argv  # claims 1 and 2 only (no larger teacher)
  argv = [a for a in argv if a not in ('--gate-only', '--no-claim3')]
  cli(__doc__, 'runs/gopd/seed0',
      functools.partial(run_experiment, gate_only=gate_only, claim3=claim3), aggregate, argv)


if __name__ == '__main__':
  main()
