"""pass@k: the unbiased estimator of Chen et al. 2021 (Codex), and per-tag means for logging."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Probability that at least one of k samples drawn without replacement from n, of which c
  are correct, is correct: 1 - C(n-c, k) / C(n, k).

  Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
  """
  if not (0 <= c <= n and 1 <= k <= n):
    raise ValueError(f'pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}')
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_by_tag(tags: Sequence[str], rewards_per_sample, k: int | Iterable[int], *,
                     threshold: float = 1.0) -> dict[str, float]:
  """{'eval/pass@K': mean over prompts, 'eval/pass@K/<tag>': mean over that tag's prompts}.

  tags: [num_prompts] the tag of each prompt.
  rewards_per_sample: [num_prompts, n] rewards of n samples per prompt; a sample is correct
    when its reward >= threshold (1.0: a code answer must pass every test).
  k: one k or several (one key pair each); each must be <= n.
  """
  rewards = np.asarray(rewards_per_sample, dtype=np.float64)
  if rewards.ndim != 2 or rewards.shape[0] != len(tags):
    raise ValueError(f'pass_at_k_by_tag: rewards_per_sample has shape {rewards.shape}; '
                     f'expected [num_prompts={len(tags)}, n]')
  n = rewards.shape[1]
  correct = (rewards >= threshold).sum(axis=1)
  tags = [str(t) for t in tags]
  out = {}
  for kk in ([k] if isinstance(k, int) else list(k)):
    per_prompt = np.array([pass_at_k(n, int(c), kk) for c in correct])
    out[f'eval/pass@{kk}'] = float(per_prompt.mean()) if len(per_prompt) else float('nan')
    for tag in sorted(set(tags)):
      mask = np.array([t == tag for t in tags])
      out[f'eval/pass@{kk}/{tag}'] = float(per_prompt[mask].mean())
  return out
