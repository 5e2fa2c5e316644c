"""Rollout sampler throughput.

  python -m opd_jax.bench.sampler --model DIR --batch 16 --prompt-len 32 --new-tokens 64

Loads a HF checkpoint directory, samples `--new-tokens` tokens per row (no stop token, so
every row generates all of them) with per-token behaviour logprobs, and prints the compile
time, per-run times, and finally `tokens_per_s=<median>` over `--runs` timed runs after one
warm-up. `--make-model DIR` first writes the ~4M-parameter random Qwen3 used in
docs/benchmarks.md (hidden 256, 4 layers, vocab 2048) if DIR has no config.json.
"""

import argparse
import statistics
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', required=True)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--prompt-len', type=int, default=32)
  ap.add_argument('--new-tokens', type=int, default=64)
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--temperature', type=float, default=1.0)
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--mesh', default='',
                  help="e.g. 'data=2': rows split over that many devices (on a CPU, run with "
                       'XLA_FLAGS=--xla_force_host_platform_device_count=N: one device per '
                       'core runs its rows in parallel)')
  ap.add_argument('--make-model', action='store_true',
                  help='write the benchmark Qwen3 (hidden 256, 4 layers) to --model first')
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from opd_jax.models import load_pretrained
  from opd_jax.rollout.decode import SamplingParams
  from opd_jax.rollout.sampler import Sampler

  if args.make_model:
    make_bench_model(args.model)
  mesh = None
  if args.mesh:
    from opd_jax import sharding as shd
    mesh = shd.make_mesh({k: int(v) for k, v in (kv.split('=') for kv in args.mesh.split(','))})
  model = load_pretrained(args.model, mesh=mesh, dtype=jnp.dtype(args.dtype))
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, mesh=mesh, pad_id=0)
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(1, model.cfg.vocab_size, args.prompt_len))
             for _ in range(args.batch)]
  sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)

  def run(seed):
    out = sampler(params, prompts, jax.random.key(seed), sp)
    jax.block_until_ready(out.logprobs)
    return out

  t0 = time.perf_counter()
  out = run(0)
  compile_s = time.perf_counter() - t0
  n_tokens = int(np.asarray(out.mask).sum())
  print(f'model={args.model} params={model.cfg.num_params:,} devices={jax.device_count()} '
        f'mesh={dict(mesh.shape) if mesh is not None else None} '
        f'({jax.devices()[0].platform}) batch={args.batch} prompt_len={args.prompt_len} '
        f'new_tokens={args.new_tokens} dtype={args.dtype}')
  print(f'compile_and_first_run_s={compile_s:.2f}')
  times = []
  for i in range(args.runs):
    t0 = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - t0)
  print('run_s=' + ','.join(f'{t:.4f}' for t in times))
  print(f'tokens_per_s={n_tokens / statistics.median(times):.1f}')


def make_bench_model(path):
  from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
  tok = build_char_tokenizer(vocab_size=2048)
  return make_tiny_checkpoint(path, family='qwen3', hidden_size=256, num_layers=4,
                              num_heads=4, num_kv_heads=2, head_dim=64,
                              intermediate_size=768, tokenizer=tok, seed=0)


if __name__ == '__main__':
  main()
