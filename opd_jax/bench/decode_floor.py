"""The matmul floor of one decode step: the model's matmuls alone, nothing else.

  python -m opd_jax.bench.decode_floor --model DIR --batch 16 --steps 64

Times one jitted `fori_loop` of `--steps` steps, each running every layer's fused q/k/v,
output, fused gate/up and down projections and the unembedding on [batch, hidden]
activations (random weights of the checkpoint's shapes; no attention over a cache, no norms,
no sampling). Compared with `opd_jax.bench.sampler`'s time per decode step it says how much
of a step is matmul work and how much is everything else (docs/benchmarks.md).
"""

import argparse
import statistics
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', required=True, help='an HF checkpoint directory (its config.json)')
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--steps', type=int, default=64)
  ap.add_argument('--runs', type=int, default=7)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from opd_jax.models import read_hf_config

  cfg, _ = read_hf_config(args.model)
  d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * e
  keys = iter(jax.random.split(jax.random.key(0), 4 * cfg.num_layers + 1))

  def w(*shape):
    return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
  layers = [dict(qkv=w(qkv, d), o=w(d, cfg.num_heads * e), gate_up=w(2 * f, d), down=w(d, f))
            for _ in range(cfg.num_layers)]
  unembed = w(cfg.vocab_size, d)

  def lin(x, weight):
    return jnp.einsum('bi,oi->bo', x, weight)

  @jax.jit
  def run(layers, unembed, x):  # weights as arguments, as in the sampler
    def step(_, x):
      for p in layers:
        x = x + lin(lin(x, p['qkv'])[:, :cfg.num_heads * e], p['o'])
        gate, up = jnp.split(lin(x, p['gate_up']), 2, axis=-1)
        x = x + lin(jax.nn.silu(gate) * up, p['down'])
      return x + 1e-3 * jnp.mean(lin(x, unembed))  # keep the unembedding live
    return jax.lax.fori_loop(0, args.steps, step, x)

  x = jnp.ones((args.batch, d), jnp.float32)
  run(layers, unembed, x).block_until_ready()
  times = []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    run(layers, unembed, x).block_until_ready()
    times.append(time.perf_counter() - t0)
  ms = 1e3 * statistics.median(times) / args.steps
  print(f'model={args.model} batch={args.batch} steps={args.steps}')
  print(f'matmul_ms_per_step={ms:.3f}')


if __name__ == '__main__':
  main()
