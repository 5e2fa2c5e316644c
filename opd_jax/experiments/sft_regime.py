"""OPD vs SFT in the regime where SFT's returns diminish (the on-policy distillation claim:
from a student SFT'd on N teacher samples, OPD reaches a target for a fraction of the
compute continued SFT would need), in miniature on a CPU:

  python -m opd_jax.experiments.sft_regime --workdir runs/regime/seed0 --seed 0
  python -m opd_jax.experiments.sft_regime --workdir runs/regime/seed0 --seed 0 --gate-only
  python -m opd_jax.experiments.sft_regime --workdir /tmp/regime_quick --quick
  python -m opd_jax.experiments.sft_regime --workdir runs/regime/agg \\
      --aggregate runs/regime/seed0 runs/regime/seed1 ...

Stages (the ordinary trainer `opd_jax.train.run` on configs/sft_regime.py:STAGE; a stage
whose result.json exists is reused, so an interrupted run continues):
  data      keyed codes with Zipf key frequencies (opd_jax/tasks/keyed.py): the
            teacher's set (keys uniform), the pool of Zipf prompts, validation and held-out
            eval, pairwise disjoint prompts;
  teacher   SFT of the teacher on ground-truth solutions (every key frequent);
  samples   the teacher samples one response at T=1 for each of the first max(GATE_NS) pool
            prompts (its generation FLOPs per example recorded): the SFT data;
  gate_N    for each N in GATE_NS, SFT of the student from its init on the first N teacher
            samples (nested sets), GATE_EPOCHS passes (at least GATE_MIN_STEPS steps), cosine
            schedule: one point of the SFT-vs-data curve; then the gate (see `gate_check`);
  methods   from the gate's SFT-N checkpoint (N = SFT_N), the pool prompts, the same steps x
            training sequences per step and the same learning-rate sweep for each of
              opd          sampled-token OPD (teacher kl_coef 1),
              opd_topk     OPD on the teacher's top-20 tokens + a tail at each position,
              sft_teacher  continued SFT on fresh teacher samples (T=1),
              grpo         GRPO on the exact-match reward,
              negadv       constant advantage −1 on every sampled token, no teacher;
            each method's lr is chosen by final greedy accuracy on validation.

The ratio (`ratios`): FLOPs each method needs to reach the target (halfway from the SFT-N
checkpoint to the teacher, on held-out), over OPD's, in two accountings: SFT data free
(teacher sampling FLOPs excluded) and the teacher's generation counted. Continued SFT is
measured (its own run) and, where it does not reach the target, extrapolated log-linearly
from the gate's curve (N* = the data size where the fitted line crosses the target; FLOPs =
the gate recipe's update FLOPs at N* minus at SFT_N, plus the teacher's generation of the
N* − SFT_N new samples in the second accounting), marked as extrapolated.
Outputs in WORKDIR: gate.md, gate.json, gate.png, results.md, results.json,
accuracy_vs_flops.png; `--aggregate` writes aggregate.md, gate_seeds.png and
accuracy_vs_flops_seeds.png. `--num-keys 256 --teacher-steps 800` reruns the second design.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from opd_jax.experiments.common import enable_compile_cache, load_recipe, mean_std, run_stage
from opd_jax.experiments.common import seeded_model

HELD_OUT = 'keyed'
VAL = 'val'
MID_FRACTION = 0.5
GATE_R2 = 0.9            # log-linear: R^2 of accuracy vs log2 N over the fitted points
GATE_MIN_DOUBLINGS = 3   # ... over at least this many doublings (4 points)
GATE_GAP = 0.15          # the curve's last point is at least this far below the teacher
METHOD_NAMES = {'opd': 'OPD (sampled-token)', 'opd_topk': 'OPD (teacher top-20 + tail)',
                'sft_teacher': 'continued SFT on teacher samples',
                'grpo': 'RL (GRPO)', 'negadv': 'constant −1 advantage, no teacher'}


def recipe():
  return load_recipe('sft_regime')


# ------------------------------------------------------------------------------- data
def write_data(directory: str, rc, *, quick: bool) -> dict:
  from opd_jax.tasks import keyed
  if os.path.exists(os.path.join(directory, 'paths.json')):
    with open(os.path.join(directory, 'paths.json')) as f:
      return json.load(f)
  gate_ns = rc.QUICK_GATE_NS if quick else rc.GATE_NS
  paths = keyed.write_dataset(
      directory, num_keys=rc.QUICK_NUM_KEYS if quick else rc.NUM_KEYS, exponent=rc.ZIPF,
      n_teacher=2000 if quick else rc.TEACHER_EXAMPLES, n_pool=max(gate_ns) + rc.EXTRA_POOL,
      n_val=32 if quick else rc.N_VAL, n_eval=32 if quick else rc.N_EVAL, seed=0)
  recs = keyed.read_jsonl(paths['val'])
  paths['val_tagged'] = os.path.join(directory, 'val_tagged.jsonl')
  keyed.write_jsonl(paths['val_tagged'], [{**r, 'tag': VAL} for r in recs])
  with open(os.path.join(directory, 'paths.json'), 'w') as f:
    json.dump(paths, f)
  return paths


def teacher_samples(teacher_dir: str, pool_path: str, n: int, out_path: str, *, seed: int,
                    temperature: float, max_new_tokens: int, max_prompt_len: int,
                    batch: int = 256) -> dict:
  """One response per record of the first `n` of `pool_path`, sampled by the teacher (the
  trainer's sampler, chat template and stop ids), written as the record's 'response';
  returns the generation FLOPs (analytic, prefill + decode of the real rows) and the
  share of correct samples."""
  import jax
  import numpy as np
  import transformers
  from flax import nnx
  from opd_jax import data as data_lib
  from opd_jax.models import hf_io
  from opd_jax.rewards import registry as rewards
  from opd_jax.rollout.decode import SamplingParams
  from opd_jax.rollout.sampler import Sampler
  from opd_jax.tasks import keyed
  from opd_jax.training import builder, evaluation
  from opd_jax.training import flops as compute
  tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  enc = data_lib.PromptEncoder(tok, template='default', max_prompt_len=max_prompt_len)
  cfg, hf = hf_io.read_hf_config(teacher_dir)
  graphdef, params = nnx.split(hf_io.load_pretrained(teacher_dir))
  sampler = Sampler(graphdef, pad_id=int(tok.pad_token_id or 0))
  sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                      stop_ids=builder.stop_ids(hf, tok))
  key = jax.random.key(seed)
  recs = data_lib.read_jsonl(pool_path)[:n]
  dicts = keyed.read_jsonl(pool_path)[:n]
  total_flops, correct, out = 0, 0.0, []
  for i in range(0, len(recs), batch):
    ro = sampler(params, enc.encode_batch(recs[i:i + batch]), jax.random.fold_in(key, i), sp)
    k = len(recs[i:i + batch])
    texts = evaluation.decode_responses(tok, ro.host_rows(ro.tokens), ro.host_rows(ro.mask))
    plen = np.asarray(ro.prompt_mask).sum(-1)[:k]
    rlen = np.asarray(ro.mask).sum(-1)[:k]
    total_flops += compute.rollout_flops(cfg, plen, rlen)
    ok = rewards.compute_rewards(texts[:k], dicts[i:i + k], {dicts[i]['tag']: 'exact_match'})
    correct += float(np.sum(ok))
    out += [{**r, 'response': t, 'teacher_correct': bool(o)}
            for r, t, o in zip(dicts[i:i + k], texts, ok)]
  keyed.write_jsonl(out_path, out)
  return {'flops': float(total_flops), 'flops_per_example': float(total_flops) / len(out),
          'accuracy': correct / len(out), 'n': len(out)}


# ----------------------------------------------------------------------------- stages
def stage_config(rc, stage: str, paths: dict, *, seed: int, quick: bool, lr=None,
                 train=None, steps=None, eval_every=0):
  c = rc.get_config(stage + (',quick' if quick else ''))
  c.unlock()
  c.seed = seed
  c.data.eval = {HELD_OUT: paths['eval'], VAL: paths['val_tagged']}
  c.rl.tag_to_reward = {HELD_OUT: 'exact_match', VAL: 'exact_match'}
  if stage == 'teacher':
    c.data.train = {HELD_OUT: paths['teacher']}
    c.student.model = seeded_model(c.student.model, seed)
  elif stage == 'gate':
    c.data.train = {HELD_OUT: train}
    c.student.model = seeded_model(c.student.model, seed)
    c.total_steps = steps
    c.eval_every = eval_every
    c.log_every = math.gcd(c.log_every, eval_every) if eval_every else c.log_every
  else:
    c.data.train = {HELD_OUT: paths['pool']}
    c.student.model = paths['sft_n']
  if 'teacher' in c.teachers:
    c.teachers.teacher.model = paths['teacher_export']
  if lr is not None:
    c.optim.lr = lr
  c.lock()
  return c


def gate_steps(rc, n: int, quick: bool) -> int:
  if quick:
    return rc.get_config('gate,quick').total_steps
  return max(rc.GATE_MIN_STEPS, math.ceil(rc.GATE_EPOCHS * n / rc.GATE_BATCH))


def fit_loglinear(ns, accs):
  """Least squares acc = a + b log2 N; returns (a, b, R^2)."""
  xs = [math.log2(n) for n in ns]
  k = len(xs)
  mx, my = sum(xs) / k, sum(accs) / k
  sxx = sum((x - mx) ** 2 for x in xs)
  sxy = sum((x - mx) * (y - my) for x, y in zip(xs, accs))
  b = sxy / sxx if sxx else 0.0
  a = my - b * mx
  ss_tot = sum((y - my) ** 2 for y in accs)
  ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, accs))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
  return a, b, r2


def gate_check(ns, accs, teacher_acc) -> dict:
  """The regime gate: some run of >= GATE_MIN_DOUBLINGS consecutive doublings whose
  accuracies fit a line in log2 N with R^2 >= GATE_R2 and a positive slope, and the curve's
  last point at least GATE_GAP below the teacher. Returns the best such window (the
  longest, then the best fit) and the verdict."""
  best = None
  for i in range(len(ns)):
    for j in range(i + GATE_MIN_DOUBLINGS, len(ns)):
      a, b, r2 = fit_loglinear(ns[i:j + 1], accs[i:j + 1])
      cand = (j - i, r2, i, j, a, b)
      if b > 0 and r2 >= GATE_R2 and (best is None or cand[:2] > best[:2]):
        best = cand
  gap = teacher_acc - accs[-1]
  a_all, b_all, r2_all = fit_loglinear(ns, accs)
  out = {'ns': list(ns), 'accuracy': list(accs), 'teacher_accuracy': teacher_acc,
         'gap_at_largest_n': gap, 'fit_all': {'a': a_all, 'b': b_all, 'r2': r2_all},
         'loglinear': best is not None, 'gap_ok': gap >= GATE_GAP}
  if best is not None:
    _, r2, i, j, a, b = best
    out['window'] = {'from_n': ns[i], 'to_n': ns[j], 'doublings': j - i, 'a': a,
                     'slope_per_doubling': b, 'r2': r2}
  out['passed'] = out['loglinear'] and out['gap_ok']
  return out


def gate_text(g: dict) -> str:
  rows = ['| N (distinct SFT examples) | held-out accuracy | validation accuracy | update FLOPs '
          '| steps |', '|---|---|---|---|---|']
  for p in g['points']:
    rows.append(f'| {p["n"]} | {p["accuracy"]:.1%} | {p["val_accuracy"]:.1%} | '
                f'{p["flops"]:.3g} | {p["steps"]} |')
  w = g.get('window')
  fit = (f'log-linear window N={w["from_n"]}..{w["to_n"]} ({w["doublings"]} doublings): '
         f'{w["slope_per_doubling"]:+.1%} per doubling, R^2 {w["r2"]:.3f}' if w else
         f'no window of >= {GATE_MIN_DOUBLINGS} doublings fits a rising line with R^2 >= '
         f'{GATE_R2}')
  check = (f'GATE {"PASS" if g["passed"] else "FAIL"}: {fit}; teacher '
           f'{g["teacher_accuracy"]:.1%}, largest N {g["ns"][-1]} at {g["accuracy"][-1]:.1%} '
           f'({g["gap_at_largest_n"]:.1%} below the teacher, needs >= {GATE_GAP:.0%}); all '
           f'points: {g["fit_all"]["b"]:+.1%} per doubling, R^2 {g["fit_all"]["r2"]:.3f}')
  return '\n'.join(rows) + '\n\n' + check


def plot_gate(gates: list[dict], path: str, title: str = ''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for k, g in enumerate(gates):
    ax.plot(g['ns'], g['accuracy'], 'o-', color='tab:orange', alpha=0.8,
            label='student SFT on N teacher samples' if k == 0 else None)
    ax.axhline(g['teacher_accuracy'], color='gray', ls='--', alpha=0.7,
               label='teacher' if k == 0 else None)
    w = g.get('window')
    if w:
      xs = [n for n in g['ns'] if w['from_n'] <= n <= w['to_n']]
      ax.plot(xs, [w['a'] + w['slope_per_doubling'] * math.log2(n) for n in xs], ':',
              color='black', alpha=0.6, label='log-linear fit' if k == 0 else None)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('distinct SFT examples N (teacher samples)')
  ax.set_ylabel('held-out accuracy (greedy)')
  ax.set_ylim(0, 1.05)
  ax.set_title(title or 'regime gate')
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------- analysis
def _series(history, key):
  return [(int(s), float(v)) for s, v in history.get(key, [])]


def curve(history, data_free: bool) -> list[tuple[float, float, int]]:
  """[(cumulative FLOPs, held-out accuracy, step)]; `data_free` leaves teacher sampling
  out of the FLOPs (SFT data given)."""
  tot = {0: 0.0, **dict(_series(history, 'compute/flops/total'))}
  samp = {0: 0.0, **dict(_series(history, 'compute/flops/teacher_sampling'))}
  out = []
  for step, acc in _series(history, f'eval/accuracy/{HELD_OUT}'):
    f = tot[step] - (samp.get(step, 0.0) if data_free else 0.0)
    out.append((f, acc, step))
  return out


def flops_to_reach(cv, target):
  prev = None
  for f, a, _ in cv:
    if a >= target:
      if prev is None or prev[1] >= target:
        return f
      f0, a0 = prev
      return f0 + (target - a0) / (a - a0) * (f - f0)
    prev = (f, a)
  return None


def sft_extrapolation(gate: dict, rc, start_n: int, target: float, gen_flops_per_example,
                      quick: bool) -> dict | None:
  """Continued SFT's cost to `target` read off the gate's log-linear fit (see module doc)."""
  w = gate.get('window')
  fit = w if w else None
  if fit is None or fit['slope_per_doubling'] <= 0:
    return None
  n_star = 2 ** ((target - fit['a']) / fit['slope_per_doubling'])
  pts = {p['n']: p for p in gate['points']}
  per_step = pts[start_n]['flops'] / pts[start_n]['steps']  # update FLOPs per step
  steps_star = max(rc.GATE_MIN_STEPS, math.ceil(rc.GATE_EPOCHS * n_star / rc.GATE_BATCH))
  steps_star = steps_star if not quick else pts[start_n]['steps']
  extra = max(0.0, (steps_star - pts[start_n]['steps']) * per_step)
  gen = max(0.0, n_star - start_n) * gen_flops_per_example
  return {'n_star': n_star, 'flops_data_free': extra, 'flops_teacher_counted': extra + gen}


def summarize(stages, gate, rc, lrs, methods, start_n, gen, quick) -> dict:
  teacher_acc = stages['teacher']['final'][f'eval/accuracy/{HELD_OUT}']
  start_acc = next(p['accuracy'] for p in gate['points'] if p['n'] == start_n)
  target = start_acc + MID_FRACTION * (teacher_acc - start_acc)
  rows = {}
  for m in methods:
    cands = []
    for lr in lrs:
      r = stages[f'{m}_lr{lr:g}']
      vc = _series(r['history'], f'eval/accuracy/{VAL}')
      cands.append((r['final'][f'eval/accuracy/{VAL}'], sum(v for _, v in vc) / max(len(vc), 1),
                    -lr, lr))
    best_lr = max(cands)[3]
    r = stages[f'{m}_lr{best_lr:g}']
    row = {'best_lr': best_lr, 'val_accuracy': {f'{lr:g}': c[0] for c, lr in zip(cands, lrs)},
           'accuracy': r['final'][f'eval/accuracy/{HELD_OUT}'],
           'best_accuracy': max(a for _, a, _ in curve(r['history'], False)),
           'curve': curve(r['history'], False), 'curve_data_free': curve(r['history'], True),
           'wall_s': r['wall_s']}
    for acct, free in (('data_free', True), ('teacher_counted', False)):
      row[f'flops_to_target_{acct}'] = flops_to_reach(curve(r['history'], free), target)
      row[f'total_flops_{acct}'] = row['curve' + ('_data_free' if free else '')][-1][0]
    row['extrapolated'] = False
    rows[m] = row
  extra = sft_extrapolation(gate, rc, start_n, target, gen['flops_per_example'], quick)
  if 'sft_teacher' in rows and rows['sft_teacher']['flops_to_target_data_free'] is None \
      and extra is not None:
    rows['sft_teacher'].update(extrapolated=True, n_star=extra['n_star'],
                               flops_to_target_data_free=extra['flops_data_free'],
                               flops_to_target_teacher_counted=extra['flops_teacher_counted'])
  ratios = {}
  for acct in ('data_free', 'teacher_counted'):
    opd = rows.get('opd', {}).get(f'flops_to_target_{acct}')
    for m, row in rows.items():
      f = row[f'flops_to_target_{acct}']
      if f is not None and opd:
        row[f'ratio_{acct}'] = f / opd
      elif f is None and opd:
        row[f'ratio_{acct}'] = None
        row[f'ratio_lb_{acct}'] = row[f'total_flops_{acct}'] / opd
      else:
        row[f'ratio_{acct}'] = None
        if f is not None and m != 'opd':  # OPD never reached it: an upper bound
          opd_total = rows['opd'][f'total_flops_{acct}'] if 'opd' in rows else None
          if opd_total:
            row[f'ratio_ub_{acct}'] = f / opd_total
  own = own_target_ratios(rows, gate, rc, start_n, start_acc, gen['flops_per_example'], quick)
  return {'teacher_accuracy': teacher_acc, 'start_accuracy': start_acc, 'target': target,
          'start_n': start_n, 'extrapolation': extra, 'rows': rows, 'ratios': ratios,
          'own_target': own}


def own_target_ratios(rows, gate, rc, start_n, start_acc, gen_per_example, quick) -> dict:
  """TM's other target: each OPD variant's own final held-out accuracy. Continued SFT's
  FLOPs to reach it (its measured curve; else the gate's log-linear extrapolation) over the
  variant's total FLOPs, in both accountings. A target at or below the starting checkpoint
  has no ratio (the variant lost accuracy)."""
  out = {}
  sft = rows.get('sft_teacher')
  for m in ('opd', 'opd_topk'):
    if m not in rows or sft is None:
      continue
    tgt = rows[m]['accuracy']
    res = {'target': tgt, 'opd_flops': rows[m]['total_flops_teacher_counted']}
    if tgt <= start_acc:
      out[m] = {**res, 'below_start': True}
      continue
    for acct, free in (('data_free', True), ('teacher_counted', False)):
      f = flops_to_reach(sft['curve_data_free' if free else 'curve'], tgt)
      ext = None
      if f is None:
        ext = sft_extrapolation(gate, rc, start_n, tgt, gen_per_example, quick)
        f = None if ext is None else ext[f'flops_{acct}']
      res[f'sft_flops_{acct}'] = f
      res[f'extrapolated_{acct}'] = ext is not None
      res[f'ratio_{acct}'] = None if f is None else f / res['opd_flops']
    out[m] = res
  return out


def own_target_text(s: dict) -> list[str]:
  lines = []
  for m, r in s.get('own_target', {}).items():
    if r.get('below_start'):
      lines.append(f'{METHOD_NAMES.get(m, m)} ended at {r["target"]:.1%}, at or below the '
                   f'start ({s["start_accuracy"]:.1%}): no ratio at its own accuracy.')
      continue
    cells = []
    for acct, name in (('data_free', 'SFT data free'), ('teacher_counted', 'generation counted')):
      f = r[f'sft_flops_{acct}']
      cells.append(f'{name} {"—" if f is None else format(f, ".3g")}'
                   f'{" (extrapolated)" if r[f"extrapolated_{acct}"] else ""} = '
                   f'{"—" if r[f"ratio_{acct}"] is None else format(r[f"ratio_{acct}"], ".2f")}x')
    lines.append(f'target = {METHOD_NAMES.get(m, m)}\'s final {r["target"]:.1%} '
                 f'({r["opd_flops"]:.3g} FLOPs): continued SFT / it: ' + '; '.join(cells))
  return lines


def _ratio_txt(row, acct):
  if row.get(f'ratio_{acct}') is not None:
    return f'{row[f"ratio_{acct}"]:.2f}x'
  if row.get(f'ratio_lb_{acct}') is not None:
    return f'> {row[f"ratio_lb_{acct}"]:.2f}x'
  if row.get(f'ratio_ub_{acct}') is not None:
    return f'< {row[f"ratio_ub_{acct}"]:.2f}x'
  return '—'


def table(s: dict) -> str:
  lines = [f'teacher held-out {s["teacher_accuracy"]:.1%}; SFT-{s["start_n"]} checkpoint '
           f'{s["start_accuracy"]:.1%}; target (halfway) {s["target"]:.1%}. lr chosen per '
           'method on validation.', '',
           '| method | best lr | final held-out | best held-out on curve | FLOPs to target, '
           'SFT data free (ratio to OPD) | FLOPs to target, teacher generation counted (ratio '
           'to OPD) | wall (s) |', '|---|---|---|---|---|---|---|']
  for m, r in s['rows'].items():
    cells = []
    for acct in ('data_free', 'teacher_counted'):
      f = r[f'flops_to_target_{acct}']
      txt = 'not reached' if f is None else f'{f:.3g}'
      if r.get('extrapolated') and m == 'sft_teacher':
        txt += f' (extrapolated, N*={r["n_star"]:.0f})'
      cells.append(f'{txt} ({_ratio_txt(r, acct)})')
    lines.append(f'| {METHOD_NAMES.get(m, m)} | {r["best_lr"]:g} | {r["accuracy"]:.1%} | '
                 f'{r["best_accuracy"]:.1%} | {cells[0]} | {cells[1]} | {r["wall_s"]:.0f} |')
  own = own_target_text(s)
  return '\n'.join(lines + ([''] + own if own else []))


COLORS = {'opd': 'tab:blue', 'opd_topk': 'tab:purple', 'sft_teacher': 'tab:orange',
          'grpo': 'tab:green', 'negadv': 'tab:red'}


def plot_methods_seeds(sums: list[dict], path: str):
  """Held-out accuracy vs cumulative FLOPs, mean ± std over seeds at each evaluation (the
  seeds' evaluation steps coincide; their FLOPs differ by the sampled lengths: the mean is
  plotted)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for m in dict.fromkeys(m for s in sums for m in s['rows']):
    curves = [s['rows'][m]['curve'] for s in sums if m in s['rows']]
    k = min(len(c) for c in curves)
    f = np.array([[c[i][0] for i in range(k)] for c in curves]).mean(0)
    a = np.array([[c[i][1] for i in range(k)] for c in curves])
    mu, sd = a.mean(0), (a.std(0, ddof=1) if len(curves) > 1 else np.zeros(k))
    keep = f > 0
    ax.plot(f[keep], mu[keep], 'o-', ms=3, color=COLORS.get(m),
            label=f'{METHOD_NAMES.get(m, m)} ({len(curves)} seeds)')
    ax.fill_between(f[keep], (mu - sd)[keep], (mu + sd)[keep], color=COLORS.get(m), alpha=0.2)
  for key, style, label in (('teacher_accuracy', '--', 'teacher'),
                            ('target', ':', 'target (halfway), mean'),
                            ('start_accuracy', '-.', 'start checkpoint, mean')):
    ax.axhline(float(np.mean([s[key] for s in sums])), color='gray', ls=style, label=label)
  ax.set_xscale('log')
  ax.set_xlabel('cumulative FLOPs (student + teacher, analytic)')
  ax.set_ylabel('held-out accuracy (greedy), mean ± std')
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_methods(s: dict, path: str, title=''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for m, r in s['rows'].items():
    pts = [(f, a) for f, a, _ in r['curve'] if f > 0]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, 'o-', ms=3, color=COLORS.get(m), label=f'{METHOD_NAMES.get(m, m)} '
              f'(lr {r["best_lr"]:g})')
  ax.axhline(s['teacher_accuracy'], color='gray', ls='--', label='teacher')
  ax.axhline(s['target'], color='gray', ls=':', label='target (halfway)')
  ax.axhline(s['start_accuracy'], color='black', ls=':', alpha=0.4,
             label=f'SFT-{s["start_n"]} start')
  ax.set_xscale('log')
  ax.set_xlabel('cumulative FLOPs (student + teacher, analytic)')
  ax.set_ylabel('held-out accuracy (greedy)')
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7, loc='lower right')
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------ driver
def run_gate(workdir, rc, paths, *, seed, quick, stages, walls) -> dict:
  from opd_jax.tasks import keyed
  gate_ns = tuple(rc.QUICK_GATE_NS if quick else rc.GATE_NS)
  samples_path = os.path.join(workdir, 'samples', 'sft_samples.jsonl')
  meta_path = os.path.join(workdir, 'samples', 'meta.json')
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      gen = json.load(f)
  else:
    t0 = time.time()
    os.makedirs(os.path.dirname(samples_path), exist_ok=True)
    c = rc.get_config('gate')
    gen = teacher_samples(paths['teacher_export'], paths['pool'], max(gate_ns), samples_path,
                          seed=seed, temperature=1.0,
        max_new_tokens=c.rollout.max_new_tokens, max_prompt_len=c.data.max_prompt_len)
    gen['wall_s'] = time.time() - t0
    with open(meta_path, 'w') as f:
      json.dump(gen, f)
  walls['samples'] = gen['wall_s']
  samples = keyed.read_jsonl(samples_path)
  points = []
  for n in gate_ns:
    name = f'gate_N{n}'
    train = os.path.join(workdir, 'samples', f'sft_{n}.jsonl')
    keyed.write_jsonl(train, samples[:n])
    steps = gate_steps(rc, n, quick)
    ev = max(steps // 4, 1)
    stages[name] = run_stage(name, stage_config(rc, 'gate', paths, seed=seed, quick=quick,
                                                train=train, steps=steps, eval_every=ev),
                             workdir, need_export=True)
    walls[name] = stages[name]['wall_s']
    fin = stages[name]['final']
    points.append({'n': n, 'accuracy': fin[f'eval/accuracy/{HELD_OUT}'],
                   'val_accuracy': fin[f'eval/accuracy/{VAL}'], 'steps': steps,
                   'flops': _series(stages[name]['history'], 'compute/flops/total')[-1][1],
                   'curve': _series(stages[name]['history'], f'eval/accuracy/{HELD_OUT}')})
  teacher_acc = stages['teacher']['final'][f'eval/accuracy/{HELD_OUT}']
  g = gate_check([p['n'] for p in points], [p['accuracy'] for p in points], teacher_acc)
  g['points'] = points
  g['teacher_samples'] = gen
  g['seed'] = seed
  text = gate_text(g) + (f'\nteacher samples: {gen["accuracy"]:.1%} correct, '
                         f'{gen["flops_per_example"]:.3g} generation FLOPs per example')
  with open(os.path.join(workdir, 'gate.json'), 'w') as f:
    json.dump(g, f, indent=1)
  with open(os.path.join(workdir, 'gate.md'), 'w') as f:
    f.write(text + '\n')
  plot_gate([g], os.path.join(workdir, 'gate.png'), title=f'regime gate, seed {seed}')
  print('\n' + text, flush=True)
  return g


def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False,
                   gate_only: bool = False, teacher: str | None = None,
                   methods=None, num_keys: int | None = None,
                   teacher_steps: int | None = None) -> dict:
  rc = recipe()
  if num_keys is not None:  # the task's tail length (configs/sft_regime.py:NUM_KEYS)
    rc.NUM_KEYS = num_keys
  if teacher_steps is not None:
    rc.TEACHER_STEPS = teacher_steps
  lrs = tuple(rc.QUICK_LRS if quick else rc.LRS)
  methods = tuple(methods or rc.METHODS)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  enable_compile_cache(workdir)
  paths = write_data(os.path.join(workdir, 'data'), rc, quick=quick)
  stages, walls = {}, {}
  if teacher:  # a teacher trained elsewhere (an HF directory): evaluated here, unchanged
    c = stage_config(rc, 'teacher', paths, seed=seed, quick=quick, lr=0.0)
    c.unlock()
    c.student.model = teacher
    c.total_steps, c.optim.warmup_steps, c.export.hf_dir = 1, 0, ''
    c.lock()
    stages['teacher'] = run_stage('teacher_eval', c, workdir)
    paths['teacher_export'] = teacher
  else:
    stages['teacher'] = run_stage('teacher', stage_config(rc, 'teacher', paths, seed=seed,
                                                          quick=quick), workdir,
                                  need_export=True)
    paths['teacher_export'] = os.path.join(workdir, 'teacher', 'export')
  walls['teacher'] = stages['teacher']['wall_s']
  g = run_gate(workdir, rc, paths, seed=seed, quick=quick, stages=stages, walls=walls)
  out = {'gate': g, 'seed': seed, 'quick': quick}
  if gate_only:
    return out
  start_n = rc.QUICK_SFT_N if quick else rc.SFT_N
  paths['sft_n'] = os.path.join(workdir, f'gate_N{start_n}', 'export')
  for m in methods:
    for lr in lrs:
      name = f'{m}_lr{lr:g}'
      stages[name] = run_stage(name, stage_config(rc, m, paths, seed=seed, quick=quick, lr=lr),
                               workdir)
      walls[name] = stages[name]['wall_s']
  s = summarize(stages, g, rc, lrs, methods, start_n, g['teacher_samples'], quick)
  s.update(seed=seed, quick=quick, stage_wall_s=walls, wall_s=time.time() - t_start,
           gate_passed=g['passed'],
           budget={'steps': int(stages[f'{methods[0]}_lr{lrs[0]:g}']['step']),
                   'rows_per_step': rc.ROWS_PER_STEP, 'group': rc.GROUP, 'lrs': list(lrs)})
  text = table(s) + '\n\nstage wall times: ' + ', '.join(f'{k} {v:.0f}s'
                                                          for k, v in walls.items())
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(s, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  plot_methods(s, os.path.join(workdir, 'accuracy_vs_flops.png'), title=f'seed {seed}')
  print('\n' + text, flush=True)
  out['summary'] = s
  return out


def aggregate(workdirs, out_dir: str | None = None) -> str:
  gates, sums = [], []
  for w in workdirs:
    with open(os.path.join(w, 'gate.json')) as f:
      gates.append(json.load(f))
    p = os.path.join(w, 'results.json')
    if os.path.exists(p):
      with open(p) as f:
        sums.append(json.load(f))

  def ms(xs, fmt):
    m, s, k = mean_std(xs)
    return '—' if m is None else f'{format(m, fmt)} ± {format(s, fmt)} ({k})'

  lines = [f'gate over {len(gates)} seeds: ' + ', '.join(
      f'seed {g["seed"]} {"PASS" if g["passed"] else "FAIL"}' for g in gates), '',
      '| N | held-out accuracy (mean ± std (seeds)) |', '|---|---|']
  for i, n in enumerate(gates[0]['ns']):
    lines.append(f'| {n} | {ms([g["accuracy"][i] for g in gates], ".1%")} |')
  lines.append(f'| teacher | {ms([g["teacher_accuracy"] for g in gates], ".1%")} |')
  if sums:
    lines += ['', f'comparison over {len(sums)} seeds (' + ', '.join(
        str(s['seed']) for s in sums) + ')', '',
        '| method | best lr per seed | final held-out | ratio to OPD, SFT data free | ratio '
        'to OPD, teacher generation counted |', '|---|---|---|---|---|']
    methods = list(dict.fromkeys(m for s in sums for m in s['rows']))  # a row of any seed
    for m in methods:
      rows = [s['rows'][m] for s in sums if m in s['rows']]
      cells = []
      for acct in ('data_free', 'teacher_counted'):
        per = ', '.join(_ratio_txt(r, acct) for r in rows)
        cells.append(per + ' → ' + ms([r.get(f'ratio_{acct}') for r in rows], '.2f'))
      lines.append(f'| {METHOD_NAMES.get(m, m)} | '
                   f'{", ".join(format(r["best_lr"], "g") for r in rows)} | '
                   f'{ms([r["accuracy"] for r in rows], ".1%")} | {cells[0]} | {cells[1]} |')
    for m in ('opd', 'opd_topk'):
      owns = [s.get('own_target', {}).get(m) for s in sums]
      if not any(owns):
        continue
      lines += ['', f'continued SFT / {METHOD_NAMES.get(m, m)}, target = its own final '
                'accuracy, per seed (x = ended at or below the start):']
      for acct in ('data_free', 'teacher_counted'):
        vals = [None if o is None or o.get('below_start') else o[f'ratio_{acct}'] for o in owns]
        lines.append(f'  {acct}: ' + ', '.join('x' if v is None else f'{v:.2f}' for v in vals)
                     + f' → {ms(vals, ".2f")}')
  text = '\n'.join(lines)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'aggregate.md'), 'w') as f:
      f.write(text + '\n')
    plot_gate(gates, os.path.join(out_dir, 'gate_seeds.png'),
              title=f'regime gate, {len(gates)} seeds')
    if sums:
      plot_methods_seeds(sums, os.path.join(out_dir, 'accuracy_vs_flops_seeds.png'))
  print(text, flush=True)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/regime/seed0')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true', help='the shrunk pipeline check')
  parser.add_argument('--gate-only', action='store_true',
                      help='stop after the gate (teacher, samples, SFT-vs-N curve)')
  parser.add_argument('--teacher', default=None,
                      help='an exported teacher (HF directory, e.g. another seed\'s '
                           'WORKDIR/teacher/export) instead of training one; it is only '
                           'evaluated here (one step at lr 0)')
  parser.add_argument('--methods', nargs='+', default=None)
  parser.add_argument('--num-keys', type=int, default=None,
                      help='keys of the task (default configs/sft_regime.py:NUM_KEYS); '
                           'a longer tail lowers the SFT curve\'s slope per doubling')
  parser.add_argument('--teacher-steps', type=int, default=None,
                      help='SFT steps of the teacher (default TEACHER_STEPS)')
  parser.add_argument('--aggregate', nargs='+', metavar='WORKDIR')
  args = parser.parse_args(argv)
  if args.aggregate:
    aggregate(args.aggregate, args.workdir)
  else:
    run_experiment(args.workdir, seed=args.seed, quick=args.quick, gate_only=args.gate_only,
                   teacher=args.teacher, methods=args.methods, num_keys=args.num_keys,
                   teacher_steps=args.teacher_steps)


if __name__ == '__main__':
  main()
