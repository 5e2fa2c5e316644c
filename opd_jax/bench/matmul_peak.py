"""This machine's measured matmul peak: a jitted fp32 n x n x n matmul, best of several runs.

  python -m opd_jax.bench.matmul_peak [--size 1024]
"""

import argparse
import time


def matmul_peak(n: int = 1024, runs: int = 10, dtype='float32') -> float:
  """FLOP/s of the best of `runs` jitted [n, n] @ [n, n] matmuls."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


if __name__ == '__main__':
  ap = argparse.ArgumentParser()
  ap.add_argument('--size', type=int, default=1024)
  ap.add_argument('--dtype', default='float32')
  a = ap.parse_args()
  print(f'matmul_peak_gflops={matmul_peak(a.size, dtype=a.dtype) / 1e9:.2f}')
