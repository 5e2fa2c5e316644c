"""Whole OPD steps through the trainer's own functions.

  python -m opd_jax.bench.step --student DIR --teacher DIR --batch 16 --prompt-len 32 \
      --new-tokens 64 [--eos-prob P] [--slots R] [--steps K] [--make-models]

Builds a config (base_config + one teacher), `builder.build_run`, a `train.Loop`, then runs
`train.opd_batch` + `train.apply_update` per step on synthetic prompts of exactly
--prompt-len tokens (JSONL in a temp dir, template 'raw'). One warm-up step compiles; K
timed steps follow. Prints per-phase wall time, per-phase analytic FLOPs (the Loop's
FlopCounter, `compute/step_flops/<phase>` style), GFLOP/s, the fraction of this machine's
measured fp32 matmul peak, and last `tokens_per_s=<x>` (generated tokens / whole-step time).
--eos-prob P: a benchmark-only logits_fn on the rollout sampler (as opd_jax/bench/rollout.py)
sets p(stop token) = P at every position, so lengths are geometric; without it the stop token
is masked and every row generates --new-tokens.
--slots R: the rollout sampler batches continuously over R slots, as the trainer does with
config.rollout.slots = R; like the trainer's, it takes the continuous path only when the batch
has more rows than slots (--batch > R rounded up to the data axes), else the static one.
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time


def make_models(student, teacher):
  from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
  from opd_jax.bench.sampler import make_bench_model
  if not os.path.exists(os.path.join(student, 'config.json')):
    make_bench_model(student)  # 3.7M-param Qwen3: hidden 256, 4 layers, vocab 2048
  if not os.path.exists(os.path.join(teacher, 'config.json')):
    tok = build_char_tokenizer(vocab_size=2048)
    make_tiny_checkpoint(teacher, family='qwen3', hidden_size=256, num_layers=6,
                         num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768,
                         tokenizer=tok, seed=1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--student', required=True)
  ap.add_argument('--teacher', required=True)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--prompt-len', type=int, default=32)
  ap.add_argument('--new-tokens', type=int, default=64)
  ap.add_argument('--eos-prob', type=float, default=0.0)
  ap.add_argument('--slots', type=int, default=0,
                  help='continuous batching over R slots (config.rollout.slots); 0: static')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--make-models', action='store_true')
  ap.add_argument('--peak-size', type=int, default=1024)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import transformers

  from opd_jax import config_lib, train, sharding as shd
  from opd_jax.training import builder
  from opd_jax.training import flops as compute
  from opd_jax.bench.matmul_peak import matmul_peak
  from opd_jax.rollout.sampler import Sampler

  if args.make_models:
    make_models(args.student, args.teacher)
  tok = transformers.AutoTokenizer.from_pretrained(args.student)
  tmp = tempfile.mkdtemp(prefix='opd_bench_')
  rng = np.random.RandomState(0)
  alphabet = [c for c in 'abcdefghijklmnopqrstuvwxyz0123456789'
              if len(tok.encode(c, add_special_tokens=False)) == 1]
  path = os.path.join(tmp, 'train.jsonl')
  with open(path, 'w') as f:
    for i in range(max(64, args.batch * 4)):
      text = ''.join(rng.choice(alphabet, args.prompt_len))
      f.write(json.dumps({'id': str(i), 'prompt': text, 'tag': 'bench'}) + '\n')

  c = config_lib.base_config()
  c.total_steps = args.steps + 1
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = args.student
  c.student.compute_dtype = args.dtype
  c.teachers.teacher = config_lib.teacher(args.teacher, kl_coef=1.0, tags=[], dtype=args.dtype)
  c.teachers.teacher.devices = None
  c.data.train = dict(bench=path)
  c.data.eval = {}
  c.data.template = 'raw'
  c.data.max_prompt_len = args.prompt_len + 8
  c.rollout.prompts_per_step = args.batch
  c.rollout.n_samples = 1
  c.rollout.max_new_tokens = args.new_tokens
  c.rollout.slots = args.slots
  c.batch.mini_batches = 1
  c.batch.micro_batches = 1
  c.optim.warmup_steps = 0
  c.checkpoint.async_save = False

  mesh = shd.make_mesh(dict(c.mesh))
  data = train.load_data(c)
  r = builder.build_run(c, mesh, tokenizer=data.tokenizer)
  n_prompt = len(data.encoder.encode_batch(data.prompts.next_batch(1))[0])
  if n_prompt != args.prompt_len:
    print(f'warning: prompts encode to {n_prompt} tokens, not {args.prompt_len}')

  stop = int(r.stop_ids[0]) if r.stop_ids else 1
  from opd_jax.bench.rollout import stop_bias_fn
  stop_bias = stop_bias_fn(stop, args.eos_prob)  # benchmark only; 0: fixed lengths

  # the builder's sampler (same mesh, pad id, cache dtype, slots), plus the stop bias
  sampler = Sampler(r.graphdef, mesh=mesh, pad_id=r.pad_id,
                    cache_dtype=jnp.dtype(args.dtype), slots=args.slots or None,
                    logits_fn=stop_bias)
  cont = sampler.continuous
  rows = args.batch * int(c.rollout.n_samples)
  use_cont = cont is not None and rows > cont.num_slots(sampler._batch_multiple())
  r = dataclasses.replace(r, sampler=sampler, rollout_sp=dataclasses.replace(
      r.rollout_sp, stop_ids=(stop,)))

  class _NoCkpt:
    def wait(self): pass
    def latest_step(self): return None
    directory = None

  from opd_jax.training import episodes
  loop = train.Loop(c, r, data, None, compute.FlopCounter(), _NoCkpt(),
                    jax.random.key(0), r.cast_fn(),
                    episodes.rollout_engine(c, r, data.tokenizer, data.encoder))
  state = r.init_state()

  def step(state, i):
    before = dict(loop.flops.totals)
    t0 = time.perf_counter()
    batch, m = train.opd_batch(loop, state, jax.random.fold_in(loop.base_key, i))
    t1 = time.perf_counter()
    state, upd = train.apply_update(loop, state, batch, i)
    t2 = time.perf_counter()
    m.update(upd)
    gen = float(m['rollout/response_len']) * args.batch
    t_roll = gen / m['perf/tokens_per_s/rollout']
    t_score = t1 - t0 - t_roll  # the rest of opd_batch: scoring, advantages, metrics
    flops = {k: v - before.get(k, 0) for k, v in loop.flops.totals.items()}
    return state, dict(rollout=t_roll, scoring=t_score, update=t2 - t1, total=t2 - t0,
                       gen=gen, flops=flops)

  t0 = time.perf_counter()
  state, _ = step(state, 0)
  print(f'compile_and_first_step_s={time.perf_counter() - t0:.2f}')
  runs = []
  for i in range(args.steps):
    state, res = step(state, i + 1)
    runs.append(res)
  peak = matmul_peak(args.peak_size)
  print(f'student={args.student} params={r.student_cfg.num_params:,} teacher={args.teacher} '
        f'({jax.devices()[0].platform}, {jax.device_count()} devices) batch={args.batch} '
        f'prompt_len={args.prompt_len} new_tokens={args.new_tokens} eos_prob={args.eos_prob} '
        f'dtype={args.dtype} steps={args.steps}')
  print(f'matmul_peak_gflops={peak / 1e9:.2f} (jitted fp32 {args.peak_size}^3, best of runs)')
  if use_cont:
    print('rollout_path=continuous ' + ' '.join(
        f'{k}={v}' for k, v in cont.last_stats.items() if k != 'placements') +
        ' (last step)')
  else:
    print('rollout_path=static' + (f' (--slots {args.slots}: {rows} rows do not exceed '
                                   f'{cont.num_slots(sampler._batch_multiple())} slots)'
                                   if cont is not None else ''))
  print('mean_response_len=' + ','.join(f'{x["gen"] / rows:.1f}' for x in runs))

  def med(key):
    return statistics.median(x[key] for x in runs)

  phases = {'rollout': ['rollout'], 'scoring': None, 'update': ['update']}
  all_keys = sorted({k for x in runs for k in x['flops']} - {'total'})
  phases['scoring'] = [k for k in all_keys if k not in ('rollout', 'update')]
  tot_f = 0.0
  out = {'peak': peak, 'runs': runs, 'cfg': r.student_cfg, 'args': args}
  for ph, keys in phases.items():
    f = statistics.median(sum(x['flops'].get(k, 0) for k in keys) for x in runs)
    t = med(ph)
    tot_f += f
    out[ph] = (t, f)
    print(f'phase={ph} s={t:.4f} flops={f:.4g} gflops_per_s={f / t / 1e9:.2f} '
          f'frac_peak={f / t / peak:.3f}')
  t = med('total')
  print(f'phase=step s={t:.4f} flops={tot_f:.4g} gflops_per_s={tot_f / t / 1e9:.2f} '
        f'frac_peak={tot_f / t / peak:.3f}')
  print('step_s=' + ','.join(f'{x["total"]:.4f}' for x in runs))
  print(f'tokens_per_s={sum(x["gen"] for x in runs) / sum(x["total"] for x in runs):.1f}')
  return out


if __name__ == '__main__':
  main()
