"""Rollout throughput, static vs continuous batching, on geometric response lengths.

  python -m opd_jax.bench.rollout --model DIR --requests 64 --slots 16 --new-tokens 256 \\
      --eos-prob 0.01 [--make-model]

Samples `--requests` prompts (random ids, lengths uniform in [prompt_len/2, prompt_len]) two
ways: the static sampler in batches of `--slots` (each batch decodes until its longest row
stops) and the continuous sampler (`Sampler(..., slots=R)`: a stopped row takes the next
prompt). Response lengths are made geometric by a benchmark-only `logits_fn` that sets the
stop token's logit so that p(stop) = `--eos-prob` at every step (temperature 1, no
truncation); the training path never sets `logits_fn`. Runs alternate static / continuous
after one warm-up of each and print, per run, useful (unmasked) tokens/s and the mean
response length; then the medians and, last, `continuous_over_static=<ratio of medians>`.
`--make-model DIR` first writes bench/sampler.py's ~4M-parameter random Qwen3 if DIR has no
config.json.
"""

import argparse
import os
import statistics
import time


def stop_bias_fn(stop: int, eos_prob: float):
  """A benchmark-only Sampler `logits_fn`: p(stop) = eos_prob exactly at every step (the
  stop logit becomes logsumexp(others) + log odds), so lengths are geometric; eos_prob 0
  removes the stop token (every row runs to the budget)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  log_odds = float(np.log(eos_prob / (1 - eos_prob))) if eos_prob else None

  def stop_bias(logits_BxV):
    if log_odds is None:
      return logits_BxV.at[:, stop].set(-jnp.inf)
    others = jax.nn.logsumexp(logits_BxV.at[:, stop].set(-jnp.inf), axis=-1)
    return logits_BxV.at[:, stop].set(others + log_odds)
  return stop_bias


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', required=True)
  ap.add_argument('--requests', type=int, default=64)
  ap.add_argument('--slots', type=int, default=16)
  ap.add_argument('--prompt-len', type=int, default=32)
  ap.add_argument('--new-tokens', type=int, default=256)
  ap.add_argument('--eos-prob', type=float, default=0.01)
  ap.add_argument('--runs', type=int, default=3, help='timed runs of each (alternating)')
  ap.add_argument('--refill-min', type=int, default=None)
  ap.add_argument('--cache-slack', type=int, default=None)
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--make-model', action='store_true',
                  help='write the benchmark Qwen3 (hidden 256, 4 layers) to --model first')
  args = ap.parse_args(argv)
  if not 0.0 <= args.eos_prob < 1.0:
    ap.error('--eos-prob must be in [0, 1)')

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from opd_jax.bench.sampler import make_bench_model
  from opd_jax.models import load_pretrained
  from opd_jax.rollout.decode import SamplingParams
  from opd_jax.rollout.sampler import Sampler

  if args.make_model and not os.path.exists(os.path.join(args.model, 'config.json')):
    make_bench_model(args.model)
  model = load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
  graphdef, params = nnx.split(model)
  vocab = model.cfg.vocab_size
  stop = 1  # any id; the bias below fixes its probability
  stop_bias = stop_bias_fn(stop, args.eos_prob)

  static = Sampler(graphdef, pad_id=0, logits_fn=stop_bias)
  cont = Sampler(graphdef, pad_id=0, logits_fn=stop_bias, slots=args.slots,
                 refill_min=args.refill_min, cache_slack=args.cache_slack)
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(2, vocab, rng.randint(args.prompt_len // 2, args.prompt_len + 1)))
             for _ in range(args.requests)]
  sp = SamplingParams(max_new_tokens=args.new_tokens, stop_ids=(stop,))

  def run_static(seed):
    masks = []
    for i in range(0, len(prompts), args.slots):
      out = static(params, prompts[i:i + args.slots], jax.random.fold_in(
          jax.random.key(seed), i), sp)
      masks.append(out.mask)
    return np.concatenate([np.asarray(m) for m in masks])

  def run_cont(seed):
    out = cont(params, prompts, jax.random.key(seed), sp)
    return np.asarray(out.mask)

  def timed(fn, seed):
    t0 = time.perf_counter()
    mask = fn(seed)
    dt = time.perf_counter() - t0
    return mask.sum() / dt, mask.sum(1).mean(), dt

  print(f'model={args.model} params={model.cfg.num_params:,} ({jax.devices()[0].platform}) '
        f'requests={args.requests} slots={args.slots} prompt_len<={args.prompt_len} '
        f'new_tokens={args.new_tokens} eos_prob={args.eos_prob} dtype={args.dtype}')
  t0 = time.perf_counter()
  run_static(1000)
  run_cont(1000)
  run_cont(1001)  # the refill row buckets a run needs vary with the lengths
  print(f'compile_and_warmup_s={time.perf_counter() - t0:.1f}')
  rates = {'static': [], 'continuous': []}
  for r in range(args.runs):
    for name, fn in (('static', run_static), ('continuous', run_cont)):
      tps, mean_len, dt = timed(fn, r)
      rates[name].append(tps)
      extra = ''
      if name == 'continuous':
        extra = ' ' + ' '.join(f'{k}={v}' for k, v in cont.continuous.last_stats.items()
                               if k != 'placements')
      print(f'run={r} {name}: useful_tokens_per_s={tps:.1f} mean_len={mean_len:.1f} '
            f'({mean_len / args.new_tokens:.0%} of budget) time_s={dt:.2f}{extra}')
  med = {k: statistics.median(v) for k, v in rates.items()}
  print(f'static_tokens_per_s={med["static"]:.1f}')
  print(f'continuous_tokens_per_s={med["continuous"]:.1f}')
  print(f'continuous_over_static={med["continuous"] / med["static"]:.2f}')


if __name__ == '__main__':
  main()
