"""Multi-turn OPD on the tool environment, in miniature on a CPU: OPD against a tool-using
teacher vs SFT on more teacher transcripts, at equal student FLOPs, from a student that
already solves part of the task.

  python -m opd_jax.experiments.agentic_tool --workdir runs/agentic/seed0 --seed 0 \
      [--gate-only] [--long-opd 1e-3:400] [--quick]
  python -m opd_jax.experiments.agentic_tool --workdir runs/agentic/agg \
      --aggregate runs/agentic/seed0 runs/agentic/seed1 runs/agentic/seed2

Task: 'A*B=?' with two-digit A, B (ground truth the product); the environment is 'tool'
(opd_jax/envs/tool.py): `<calc>EXPR</calc>` runs in the sandbox and is answered
`<result>N</result>`, `<answer>N</answer>` ends the episode (reward 1 if N is the product).
A tiny model cannot multiply two-digit numbers, so the reward measures whether it calls the
calculator with the right operands and copies the result.

Stages (a stage whose output exists in WORKDIR is reused; every seed owns its data split,
teacher, student init and shuffles):
  data      TRAIN, VAL and HELD-OUT problems, disjoint;
  teacher   SFT of the larger model on replayed transcripts (`multiturn.replay`: the call,
            the sandbox's real result, the answer), loss on the student turns only;
  student   SFT of the smaller model on the same transcripts, evaluated on VAL every few
            steps (greedy episodes); the student init is the first checkpoint whose VAL
            reward reaches the selection band (SELECT); `GATE PASS/FAIL` then states its
            HELD-OUT reward against the issue's band (GATE) — held-out never selects;
  opd       from that init, per lr of LRS: the ordinary trainer (`opd_jax.train.run`,
            configs/opd_agentic.py) with this task; its FlopCounter gives the FLOPs;
  sft       from the same init, per lr of LRS: SFT on fresh episodes the teacher sampled
            (T = 1) on TRAIN problems, loss on the student turns, run until its update FLOPs
            reach the student FLOPs (rollout + update) of the chosen OPD run: equal FLOPs;
  opd_obs   (unless --no-obs-variant) OPD at the chosen OPD lr with `errors_end_episode=
            False` in training (a failing call is answered `<error>...</error>`), an extra
            row that was not tuned; evaluation always uses the default environment.
  opd_long  (with --long-opd LR:STEPS) one more OPD run, longer than equal FLOPs: a
            diagnostic row, not tuned and not in the comparison.
Each method's lr is chosen on VAL reward at its end. Prints (and writes WORKDIR/results.md,
results.json, reward_vs_flops.png) held-out episode reward, right calls, copies of the
result given the call and tool errors per method, and the tool errors of OPD's training
episodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

from opd_jax.experiments.common import mean_std

TEACHER = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed={s}'
STUDENT = 'tiny:qwen3:hidden_size={h},num_layers=2,num_heads={nh},num_kv_heads={kv},seed={s}'
BUDGETS = dict(max_turns=3, max_tokens_per_turn=24, max_episode_tokens=96, max_obs_tokens=48)
GATE = (0.10, 0.60)     # the band for the student's held-out reward before OPD
SELECT = (0.20, 0.60)   # the validation band that picks the student-init checkpoint
LRS = (1e-4, 3e-4, 1e-3)  # 1e-3 already undoes a strong student's SFT in OPD (tried)
WARMUP = 10             # linear warmup steps, OPD and continued SFT alike
BATCH = 32              # episodes per step, OPD and SFT alike
METRICS = ('reward', 'right_call', 'copied_given_call', 'tool_errors', 'turns')


def teacher_spec(seed: int) -> str:
  return TEACHER.format(s=21 + 100 * seed)


def student_spec(seed: int, hidden: int = 32) -> str:
  heads = max(1, hidden // 16)
  return STUDENT.format(h=hidden, nh=heads, kv=max(1, heads // 2), s=22 + 100 * seed)


# ------------------------------------------------------------------------------- data
def write_data(workdir: str, n_train: int, n_val: int, n_eval: int, seed: int) -> dict:
  """Disjoint splits of the 8100 problems A*B, A, B in 10..99: train, val, eval."""
  rng = random.Random(seed)
  pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
  rng.shuffle(pairs)
  cuts = {'train': pairs[:n_train], 'val': pairs[n_train:n_train + n_val],
          'eval': pairs[n_train + n_val:n_train + n_val + n_eval]}
  paths = {}
  for split, chunk in cuts.items():
    path = os.path.join(workdir, 'data', f'{split}.jsonl')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      for i, (a, b) in enumerate(chunk):
        f.write(json.dumps({'id': f'{split}-{i}', 'prompt': f'{a}*{b}=?', 'tag': 'tool',
                            'ground_truth': str(a * b)}) + '\n')
    paths[split] = path
  return paths


def transcript(record) -> list[str]:
  expr = record.messages[-1]['content'].rstrip('=?')
  return [f'<calc>{expr}</calc>', f'<answer>{record.ground_truth}</answer>']


# ------------------------------------------------------------------------ episodes
def sampler_for(model_path: str, env_kwargs: dict | None = None):
  """(MultiTurnSampler, params, model config) for the HF checkpoint at `model_path`."""
  import transformers
  from flax import nnx
  from opd_jax import data as data_lib
  from opd_jax.models import hf_io
  from opd_jax.rollout import multiturn
  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  cfg, _ = hf_io.read_hf_config(model_path)
  graphdef, params = nnx.split(hf_io.load_pretrained(model_path))
  encoder = data_lib.PromptEncoder(tok, max_prompt_len=64)
  mt = multiturn.MultiTurnSampler(graphdef, tokenizer=tok, encoder=encoder,
                                  stop_ids=(tok.eos_token_id,), tag_to_env={'tool': 'tool'},
                                  env_kwargs={'tool': dict(env_kwargs or {})},
                                  budgets=multiturn.Budgets(**BUDGETS))
  return mt, params, cfg


def score_episodes(records, ep) -> dict:
  """Episode reward, the right call (first turn exactly `<calc>A*B</calc>`), the answer
  copying the result given the right call, tool errors (episodes ended by a failing call)
  and turns, from finished episodes of `records`."""
  import numpy as np
  call_ok = [bool(t) and t[0].strip() == transcript(r)[0] for r, t in zip(records, ep.turn_texts)]
  copied = [ok and len(t) > 1 and t[1].strip() == transcript(r)[1]
            for r, t, ok in zip(records, ep.turn_texts, call_ok)]
  return {'reward': float(np.mean(ep.reward)), 'turns': float(np.mean(ep.turns)),
          'tool_errors': float(sum(e == 'tool_error' for e in ep.end)),
          'right_call': float(np.mean(call_ok)),
          'copied_given_call': float(np.sum(copied) / max(1, np.sum(call_ok)))}


def greedy_eval(mt, params, splits: dict) -> dict:
  """{'<split>/<metric>'} of greedy episodes on each split's records."""
  import jax
  out = {}
  for name, records in splits.items():
    ep = mt(params, records, jax.random.key(0), temperature=0.0)
    out.update({f'{name}/{k}': v for k, v in score_episodes(records, ep).items()})
  return out


# ----------------------------------------------------------------------------- SFT
def gate_check(heldout_reward: float, band=GATE) -> dict:
  lo, hi = band
  return {'reward': float(heldout_reward), 'band': list(band),
          'pass': bool(lo <= heldout_reward <= hi)}


def gate_text(g: dict, seed: int) -> str:
  lo, hi = g['band']
  return (f"GATE {'PASS' if g['pass'] else 'FAIL'}: seed {seed}: the student's held-out "
          f"episode reward before OPD is {g['reward']:.3f} "
          f"({'inside' if g['pass'] else 'outside'} [{lo:.2f}, {hi:.2f}]; checkpoint at "
          f"SFT step {g['step']}, chosen on validation reward {g['val_reward']:.3f})")


def sft_flops(cfg, attn) -> float:
  """The student's update FLOPs on one SFT batch: forward + backward (no remat) on each
  row's real tokens, the trainer's accounting (`flops.update_flops`)."""
  import numpy as np
  from opd_jax.training import flops as compute
  return float(compute.update_flops(cfg, np.asarray(attn).sum(-1), remat=False))


def sft(init: str, out: str, arrays, *, lr: float, steps: int, batch: int, seed: int,
        evaluate, eval_every: int, fresh: bool = False, stop=None, budget=None,
        warmup: int = 20, schedule: str = 'cosine', log=print) -> dict:
  """SFT (loss on the student turns) of `init` on `arrays` = (tokens, attn, loss mask) rows.

  Batches are random rows (`fresh=False`) or consecutive rows of the shuffled rows, each row
  used once (`fresh=True`, wrapping around when the rows run out). Every `eval_every` steps
  (and at steps 0 and the last) `evaluate(params)` gives metrics; `stop(metrics)` True ends
  the run there; `budget` ends it at the first step whose cumulative update FLOPs reach it.
  The schedule is `schedule` over `steps` with `warmup`. Writes the HF checkpoint of the last
  step to `out` and {'history': [{step, flops, **metrics}], 'steps', 'flops', 'rows_used'}
  to out/history.json; a finished `out` is reused."""
  done = os.path.join(out, 'history.json')
  if os.path.exists(done):
    log(f'  reused {out}')
    with open(done) as f:
      return json.load(f)
  import jax
  import numpy as np
  from flax import nnx
  from opd_jax.config_lib import base_config
  from opd_jax.models import save_pretrained
  from opd_jax.training.update import LossSpec, UpdateBatch, make_optimizer, \
      make_train_state, make_update_fn
  mt, params, cfg = sampler_for(init)
  tokens, attn, lmask = arrays
  optim = base_config().optim
  optim.lr, optim.warmup_steps, optim.schedule = lr, min(warmup, max(0, steps - 1)), schedule
  tx, schedule = make_optimizer(optim, steps)
  update = make_update_fn(mt.graphdef, tx, schedule, LossSpec(kind='nll', remat=False))
  state = make_train_state(params, tx)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(tokens))
  hist, flops, t0, used = [], 0.0, time.time(), 0
  hist.append({'step': 0, 'flops': 0.0, **evaluate(state['params'])})
  step = 0
  for step in range(1, steps + 1):
    if fresh:
      idx = order[np.arange(used, used + batch) % len(order)]
      used += batch
    else:
      idx = rng.choice(len(tokens), batch, replace=False)
    state, m = update(state, UpdateBatch(*(jax.numpy.asarray(x[idx]) for x in (
        tokens, attn, lmask))))
    flops += sft_flops(cfg, attn[idx])
    last = step == steps or (budget is not None and flops >= budget)
    if step % eval_every == 0 or last:
      hist.append({'step': step, 'flops': flops, 'nll': float(m['loss']),
                   **evaluate(state['params'])})
      h = hist[-1]
      log(f'  sft {os.path.basename(out)} step {step}/{steps} nll {h["nll"]:.4f} '
          f'val reward {h.get("val/reward", float("nan")):.3f} ({time.time() - t0:.0f} s)')
      if last or (stop is not None and stop(h)):
        break
  save_pretrained(nnx.merge(mt.graphdef, state['params']), out)
  mt.tokenizer.save_pretrained(out)
  res = {'history': hist, 'steps': step, 'flops': flops, 'rows_used': used,
         'wall_s': time.time() - t0}
  with open(done, 'w') as f:
    json.dump(res, f)
  return res


def replay_arrays(model_path: str, records):
  from opd_jax.rollout import multiturn
  mt, _, _ = sampler_for(model_path)
  ep = multiturn.replay(mt, records, [transcript(r) for r in records], prompt_len=32)
  assert (ep.reward == 1).all(), 'the replayed transcripts must solve their problems'
  return ep.host_arrays()[:3]


def teacher_pool(teacher: str, records, n: int, out: str, *, seed: int, log=print) -> dict:
  """`n` episodes the teacher samples at T = 1 on `records` (cycled, shuffled), saved as
  arrays with the generation FLOPs per episode (the trainer's rollout accounting with the
  teacher's config) and the episode rewards; a finished `out` is reused."""
  import jax
  import numpy as np
  from opd_jax.training import flops as compute
  path = os.path.join(out, 'pool.npz')
  if not os.path.exists(path):
    mt, params, cfg = sampler_for(teacher)
    rng = random.Random(seed)
    rows, width, t0 = [], 0, time.time()
    for i, lo in enumerate(range(0, n, 64)):
      chunk = [records[j % len(records)] for j in range(lo, min(n, lo + 64))]
      rng.shuffle(chunk)
      ep = mt(params, chunk, jax.random.fold_in(jax.random.key(seed + 7), i), temperature=1.0)
      tok, attn, lm = ep.host_arrays()[:3]
      gen = [compute.rollout_flops(cfg, ep.prompt_mask.sum(-1)[k:k + 1], ep.attn.sum(-1)[k:k + 1])
             for k in range(len(chunk))]
      rows.append((tok, attn, lm, np.asarray(gen, np.float64), ep.reward.astype(np.float32)))
      width = max(width, tok.shape[1])
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
    os.makedirs(out, exist_ok=True)
    np.savez(path, tokens=np.concatenate([pad(r[0]) for r in rows]),
             attn=np.concatenate([pad(r[1]) for r in rows]),
             lmask=np.concatenate([pad(r[2]) for r in rows]),
             gen_flops=np.concatenate([r[3] for r in rows]),
             reward=np.concatenate([r[4] for r in rows]))
    log(f'  teacher pool: {n} episodes in {time.time() - t0:.0f} s')
  z = np.load(path)
  return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- OPD
def opd_config(paths, teacher, student, *, steps, lr, seed, eval_every, env_kwargs=None):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))))
  from configs import opd_agentic
  c = opd_agentic.get_config('runlocal')
  c.unlock()
  c.seed = seed
  c.student.model = student
  c.student.remat = False
  c.teachers.teacher.model = teacher
  c.data.train = dict(tool=paths['train'])
  c.data.eval = dict(tool=paths['val'])  # the trainer's own evaluation: validation only
  c.data.max_prompt_len = 64
  c.agent.tag_to_env = dict(tool='tool')
  c.agent.env_kwargs = {'tool': dict(env_kwargs or {})}
  for k, v in BUDGETS.items():
    c.agent[k] = v
  c.total_steps = steps
  c.eval_at_start = True
  c.eval_every = eval_every
  c.eval.num_prompts = 0
  c.eval.batch_size = 64
  c.eval.num_text_samples = 0
  c.rollout.prompts_per_step = BATCH
  c.rollout.n_samples = 1
  c.optim.lr = lr
  c.optim.warmup_steps = WARMUP
  c.checkpoint.every = 0
  c.export.hf_dir = 'export'
  c.log_every = 1
  c.lock()
  return c


def student_flops(history) -> dict:
  """{step: cumulative student FLOPs (rollout + update)} from a trainer history."""
  out = {0: 0.0}
  for key in ('compute/flops/rollout', 'compute/flops/update'):
    for s, v in history.get(key, []):
      out[int(s)] = out.get(int(s), 0.0) + float(v)
  return out


def opd(paths, teacher, init, out, *, steps, lr, seed, eval_every, splits,
        env_kwargs=None, log=print) -> dict:
  """One OPD run through the trainer; {'history': [{step, flops, teacher_flops, **metrics}],
  'steps', 'flops', 'teacher_flops'} (also out/summary.json, reused when present)."""
  done = os.path.join(out, 'summary.json')
  if os.path.exists(done):
    log(f'  reused {out}')
    with open(done) as f:
      return json.load(f)
  from opd_jax.train import run
  mt, _, _ = sampler_for(init)
  t0 = time.time()
  result = run(opd_config(paths, teacher, init, steps=steps, lr=lr, seed=seed,
                          eval_every=eval_every, env_kwargs=env_kwargs), out,
               on_eval=lambda step, params: greedy_eval(mt, params, splits))
  h = result['history']
  sf = student_flops(h)
  tf = {0: 0.0, **{int(s): float(v) for s, v in h.get('compute/flops/scoring/teacher', [])}}
  evals = {}
  for key, series in h.items():
    if key.startswith(('val/', 'eval/', 'heldout/')):
      for s, v in series:
        evals.setdefault(int(s), {})[key] = float(v)
  hist = [{'step': s, 'flops': sf[s], 'teacher_flops': tf.get(s, 0.0), **evals[s]}
          for s in sorted(evals) if 'val/reward' in evals[s]]
  errs = [float(v) for _, v in h.get('agent/tool_errors', [])]
  res = {'history': hist, 'steps': int(result['step']), 'flops': sf[max(sf)],
         'teacher_flops': tf[max(tf)], 'train_tool_errors_per_step': errs,
         'wall_s': time.time() - t0}
  with open(done, 'w') as f:
    json.dump(res, f)
  return res


# ---------------------------------------------------------------------- experiment
def pick(runs: dict) -> float:
  """The lr whose run ends with the highest validation reward (ties: the smaller lr)."""
  return max(sorted(runs), key=lambda lr: (runs[lr]['history'][-1]['val/reward'], -lr))


def final(run: dict) -> dict:
  return {k: run['history'][-1][f'heldout/{k}'] for k in METRICS}


def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False, hidden: int = 64,
                   student_lr: float = 1e-3, student_steps: int = 600, teacher_steps: int = 600,
                   opd_steps: int = 100, obs_variant: bool = True, gate_only: bool = False,
                   lrs=LRS, long_opd: tuple[float, int] | None = None, log=print) -> dict:
  from opd_jax import data as data_lib
  t_start = time.time()
  w = workdir
  os.makedirs(w, exist_ok=True)
  if quick:
    teacher_steps, student_steps, opd_steps, lrs = 30, 20, 4, (1e-3,)
  n = (48, 16, 16) if quick else (256, 64, 64)
  paths = write_data(w, *n, seed)
  train, val, heldout = (data_lib.read_jsonl(paths[k]) for k in ('train', 'val', 'eval'))
  splits = {'val': val, 'heldout': heldout}
  gate_every, eval_every = (2, 2) if quick else (10, 20)

  log('=== teacher (SFT on replayed transcripts)')
  arrays = replay_arrays(_resolve(teacher_spec(seed)), train)
  teacher_dir = os.path.join(w, 'teacher')
  sft(_resolve(teacher_spec(seed)), teacher_dir, arrays, lr=3e-3, steps=teacher_steps,
      batch=BATCH, seed=seed, evaluate=lambda p: {}, eval_every=teacher_steps, log=log)
  t_mt, t_params, _ = sampler_for(teacher_dir)
  teacher_eval = greedy_eval(t_mt, t_params, splits)
  log(f"teacher: held-out reward {teacher_eval['heldout/reward']:.3f}, val "
      f"{teacher_eval['val/reward']:.3f}")

  log('=== student (SFT on replayed transcripts, init chosen on validation)')
  s_spec = _resolve(student_spec(seed, hidden))
  s_mt, _, _ = sampler_for(s_spec)
  student_dir = os.path.join(w, 'student')
  st = sft(s_spec, student_dir, arrays, lr=student_lr, steps=student_steps, batch=BATCH,
           seed=seed + 1, evaluate=lambda p: greedy_eval(s_mt, p, splits),
           eval_every=gate_every, stop=lambda h: h['val/reward'] >= SELECT[0], log=log)
  init = st['history'][-1]
  gate = {**gate_check(init['heldout/reward'], GATE), 'step': st['steps'],
          'val_reward': init['val/reward'],
          'val_in_select': bool(SELECT[0] <= init['val/reward'] <= SELECT[1])}
  log(gate_text(gate, seed))
  summary = {'seed': seed, 'quick': quick, 'hidden': hidden, 'student_lr': student_lr,
             'teacher': teacher_eval, 'gate': gate, 'student_sft': st,
             'init': {k: init[f'heldout/{k}'] for k in METRICS}, 'lrs': list(lrs)}
  if gate_only:
    _write(w, summary)
    return summary

  log('=== OPD (the trainer), per lr')
  runs = {'opd': {}, 'sft': {}}
  for lr in lrs:
    runs['opd'][lr] = opd(paths, teacher_dir, student_dir, os.path.join(w, f'opd_lr{lr:g}'),
                          steps=opd_steps, lr=lr, seed=seed, eval_every=eval_every,
                          splits=splits, log=log)
  opd_lr = pick(runs['opd'])
  budget = runs['opd'][opd_lr]['flops']
  log(f'OPD lr {opd_lr:g} (validation); its student FLOPs {budget:.3g} = the SFT budget')

  log('=== SFT on fresh teacher episodes, per lr, to equal student FLOPs')
  per_row = sft_flops(_cfg(student_dir), arrays[1][:1])
  n_rows = BATCH * (math.ceil(budget / (per_row * BATCH) * 1.15) + 1)
  pool = teacher_pool(teacher_dir, train, n_rows, os.path.join(w, 'teacher_pool'),
                      seed=seed, log=log)
  for lr in lrs:
    r = sft(student_dir, os.path.join(w, f'sft_lr{lr:g}'),
            (pool['tokens'], pool['attn'], pool['lmask']), lr=lr,
            steps=10 ** 6, batch=BATCH, seed=seed + 2, fresh=True,
            evaluate=lambda p: greedy_eval(s_mt, p, splits), eval_every=eval_every,
            budget=budget, warmup=WARMUP, schedule='constant', log=log)
    r['teacher_flops'] = float(pool['gen_flops'][:r['rows_used']].sum()) if r[
        'rows_used'] <= len(pool['gen_flops']) else float(
        pool['gen_flops'].mean() * r['rows_used'])
    runs['sft'][lr] = r
  sft_lr = pick(runs['sft'])

  if obs_variant:
    log('=== OPD with errors as observations (errors_end_episode=False), at the OPD lr')
    runs['opd_obs'] = {opd_lr: opd(
        paths, teacher_dir, student_dir, os.path.join(w, f'opd_obs_lr{opd_lr:g}'),
        steps=opd_steps, lr=opd_lr, seed=seed, eval_every=eval_every, splits=splits,
        env_kwargs={'errors_end_episode': False}, log=log)}
  if long_opd is not None:  # a diagnostic beyond equal FLOPs: not tuned, not compared
    lr, steps = long_opd
    log(f'=== OPD for {steps} steps at lr {lr:g} (diagnostic, beyond equal FLOPs)')
    runs['opd_long'] = {lr: opd(
        paths, teacher_dir, student_dir, os.path.join(w, f'opd_long_lr{lr:g}_steps{steps}'),
        steps=steps, lr=lr, seed=seed, eval_every=eval_every, splits=splits, log=log)}
  summary.update(
      chosen={'opd': opd_lr, 'sft': sft_lr, **({'opd_obs': opd_lr} if obs_variant else {}),
              **({'opd_long': long_opd[0]} if long_opd is not None else {})},
      runs={m: {f'{lr:g}': r for lr, r in rs.items()} for m, rs in runs.items()},
      pool_reward=float(pool['reward'].mean()), wall_s=time.time() - t_start)
  summary['rows'] = rows_of(summary)
  _write(w, summary)
  plot_runs(summary, os.path.join(w, 'reward_vs_flops.png'), title=f'seed {seed}')
  text = table(summary)
  with open(os.path.join(w, 'results.md'), 'w') as f:
    f.write(gate_text(gate, seed) + '\n\n' + text + '\n')
  log(gate_text(gate, seed))
  log(text)
  return summary


def _resolve(spec: str) -> str:
  from opd_jax.models import tiny
  return tiny.resolve_model(spec)


def _cfg(path: str):
  from opd_jax.models import hf_io
  return hf_io.read_hf_config(path)[0]


def _write(w: str, summary: dict):
  with open(os.path.join(w, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)


NAMES = {'opd': 'OPD (trainer)', 'sft': 'SFT on teacher episodes',
         'opd_obs': 'OPD, errors as observations', 'opd_long': 'OPD, longer (diagnostic)'}


def rows_of(s: dict) -> dict:
  out = {'teacher': {k: s['teacher'][f'heldout/{k}'] for k in METRICS},
         'init': dict(s['init'])}
  for m, lr in s['chosen'].items():
    r = s['runs'][m][f'{lr:g}']
    out[m] = {**final(r), 'lr': lr, 'steps': r['steps'], 'flops': r['flops'],
              'teacher_flops': r['teacher_flops'], 'val_reward': r['history'][-1]['val/reward']}
    errs = r.get('train_tool_errors_per_step')
    if errs:
      out[m]['train_tool_errors'] = sum(errs) / len(errs)
  return out


def table(s: dict) -> str:
  r = s['rows']
  lines = ['| model | lr (val) | steps | student FLOPs | teacher FLOPs | held-out reward | '
           'right call | copied given call | tool errors / 64 | turns |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for key, name in (('teacher', 'teacher'), ('init', 'student init (before)'),
                    *((m, NAMES[m]) for m in ('opd', 'sft', 'opd_obs', 'opd_long') if m in r)):
    x = r[key]
    lr = f"{x['lr']:g}" if 'lr' in x else '—'
    st = str(x.get('steps', '—'))
    fl = f"{x['flops']:.3g}" if 'flops' in x else '—'
    tf = f"{x['teacher_flops']:.3g}" if 'teacher_flops' in x else '—'
    lines.append(f"| {name} | {lr} | {st} | {fl} | {tf} | {x['reward']:.3f} | "
                 f"{x['right_call']:.3f} | {x['copied_given_call']:.3f} | "
                 f"{x['tool_errors']:.0f} | {x['turns']:.2f} |")
  lines.append('')
  if 'train_tool_errors' in r.get('opd', {}):
    lines.append(f"{NAMES['opd']}: {r['opd']['train_tool_errors']:.2f} of {BATCH} training "
                 'episodes per step end with a tool error (sampled at T = 1)')
  if 'opd' in r and 'sft' in r:
    lines.append(f"OPD − SFT held-out reward at equal student FLOPs: "
                 f"{r['opd']['reward'] - r['sft']['reward']:+.3f}")
  return '\n'.join(lines)


def plot_runs(s: dict, path: str, title: str = ''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {'opd': 'C0', 'sft': 'C1', 'opd_obs': 'C2', 'opd_long': 'C3'}
  for m, rs in s['runs'].items():
    for lr, r in rs.items():
      best = float(lr) == s['chosen'][m]
      xs = [h['flops'] for h in r['history']]
      for ax, key in zip(axes, ('heldout/reward', 'heldout/right_call')):
        ax.plot(xs, [h[key] for h in r['history']], color=colors[m], alpha=1 if best else 0.3,
                lw=2 if best else 1, label=f'{NAMES[m]} lr {lr}' + (' (val)' if best else ''))
  for ax, lab in zip(axes, ('held-out episode reward (greedy)',
                            'held-out right calls (first turn <calc>A*B</calc>)')):
    ax.set_xlabel('cumulative student FLOPs (rollout + update)')
    ax.set_ylabel(lab)
  axes[0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------- aggregate
def flops_to_reach(history, target: float, key: str = 'heldout/reward'):
  """The cumulative FLOPs of the first evaluation whose `key` reaches `target` (None if
  none does): a description of a curve, never a selection."""
  return next((h['flops'] for h in history if h[key] >= target), None)


def aggregate(workdirs, out_dir: str | None = None) -> str:
  ss = []
  for w in workdirs:
    with open(os.path.join(w, 'results.json')) as f:
      ss.append(json.load(f))
  fmt = lambda xs, f='.3f': '{:{f}} ± {:{f}}'.format(*mean_std(xs)[:2], f=f)
  lines = [gate_text(s['gate'], s['seed']) for s in ss] + [
      '', f'{len(ss)} seeds ({", ".join(str(s["seed"]) for s in ss)}), mean ± sample std', '',
      '| model | held-out reward | right call | copied given call | tool errors / 64 | '
      'student FLOPs | teacher FLOPs | lr per seed |', '|---|---|---|---|---|---|---|---|']
  names = {'teacher': 'teacher', 'init': 'student init (before)', **NAMES}
  for key in ('teacher', 'init', 'opd', 'sft', 'opd_obs', 'opd_long'):
    if not all(key in s['rows'] for s in ss):
      continue
    rs = [s['rows'][key] for s in ss]
    fl = fmt([r['flops'] for r in rs], '.3g') if 'flops' in rs[0] else '—'
    tf = fmt([r['teacher_flops'] for r in rs], '.3g') if 'teacher_flops' in rs[0] else '—'
    lrs = ', '.join(f"{r['lr']:g}" for r in rs) if 'lr' in rs[0] else '—'
    lines.append(f'| {names[key]} | {fmt([r["reward"] for r in rs])} | '
                 f'{fmt([r["right_call"] for r in rs])} | '
                 f'{fmt([r["copied_given_call"] for r in rs])} | '
                 f'{fmt([r["tool_errors"] for r in rs], ".1f")} | {fl} | {tf} | {lrs} |')
  if all('train_tool_errors' in s['rows'].get('opd', {}) for s in ss):
    lines.append(f"{names['opd']}: training episodes per step (of {BATCH}) ended by a tool "
                 f"error {fmt([s['rows']['opd']['train_tool_errors'] for s in ss], '.2f')}")
  gains = {}
  for a, b in (('opd', 'sft'), ('opd', 'init'), ('sft', 'init'), ('opd_obs', 'sft')):
    if all(a in s['rows'] and b in s['rows'] for s in ss):
      g = [s['rows'][a]['reward'] - s['rows'][b]['reward'] for s in ss]
      gains[f'{a}-{b}'] = g
      lines.append(f'{names[a]} − {names[b]}, held-out reward: {fmt(g)} '
                   f'(per seed {", ".join(f"{x:+.3f}" for x in g)})')
  for key in ('sft', 'opd', 'opd_long'):
    if all(key in s.get('chosen', {}) for s in ss):
      xs = [flops_to_reach(s['runs'][key][f"{s['chosen'][key]:g}"]['history'], 0.9) for s in ss]
      lines.append(f'{names[key]}: student FLOPs to a held-out reward >= 0.9 (first evaluation; '
                   f'per seed) {", ".join("not reached" if x is None else f"{x:.3g}" for x in xs)}')
  text = '\n'.join(lines)
  print(text)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'aggregate.md'), 'w') as f:
      f.write(text + '\n')
    with open(os.path.join(out_dir, 'aggregate.json'), 'w') as f:
      json.dump({'gains': gains, 'seeds': [s['seed'] for s in ss]}, f)
    plot_aggregate(ss, os.path.join(out_dir, 'reward_vs_flops.png'))
  return text


def plot_aggregate(ss, path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  colors = {'opd': 'C0', 'sft': 'C1', 'opd_obs': 'C2', 'opd_long': 'C3'}
  for i, s in enumerate(ss):
    for m, lr in s.get('chosen', {}).items():
      h = s['runs'][m][f'{lr:g}']['history']
      ax.plot([x['flops'] for x in h], [x['heldout/reward'] for x in h], color=colors[m],
              ls=('-', '--', ':')[i % 3], label=f'{NAMES[m]}, seed {s["seed"]}')
  ax.set_xlabel('cumulative student FLOPs (rollout + update)')
  ax.set_ylabel('held-out episode reward (greedy)')
  ax.set_title('agentic tool task: OPD vs SFT on teacher episodes (lr chosen on val)')
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--quick', action='store_true', help='a pipeline check (minutes)')
  ap.add_argument('--hidden', type=int, default=64, help="the student's hidden size")
  ap.add_argument('--student-lr', type=float, default=1e-3)
  ap.add_argument('--student-steps', type=int, default=600,
                  help='the SFT schedule length (it stops at the validation band)')
  ap.add_argument('--opd-steps', type=int, default=100)
  ap.add_argument('--gate-only', action='store_true')
  ap.add_argument('--no-obs-variant', action='store_true')
  ap.add_argument('--long-opd', metavar='LR:STEPS', help='an extra, untuned OPD run beyond '
                  'equal FLOPs (a diagnostic row, e.g. 1e-3:400)')
  ap.add_argument('--aggregate', nargs='+', metavar='WORKDIR')
  args = ap.parse_args(argv)
  if args.aggregate:
    aggregate(args.aggregate, args.workdir)
    return
  long_opd = None
  if args.long_opd:
    lr, _, steps = args.long_opd.partition(':')
    try:
      long_opd = (float(lr), int(steps))
    except ValueError:
      ap.error(f'--long-opd {args.long_opd!r}: expected LR:STEPS, e.g. 1e-3:400')
  run_experiment(args.workdir, seed=args.seed, quick=args.quick, hidden=args.hidden,
                 student_lr=args.student_lr, student_steps=args.student_steps,
                 opd_steps=args.opd_steps, obs_variant=not args.no_obs_variant,
                 gate_only=args.gate_only, log=lambda *a: print(*a, flush=True),
                 long_opd=long_opd)


if __name__ == '__main__':
  main()
