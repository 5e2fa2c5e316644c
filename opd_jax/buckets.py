"""Static shapes: the buckets that prompt lengths and batch sizes are rounded up to (so few
programs compile), and host-side left padding. Used by the sampler, scoring, teachers, the
teacher server and the AOT check."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PROMPT_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 ... 32768


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (error if n exceeds the largest)."""
  for b in sorted(buckets):
    if b >= n:
      return b
  raise ValueError(f'length {n} exceeds the largest bucket {max(buckets)}')


def batch_bucket(n: int, multiple: int = 1) -> int:
  """The next power of two >= n that is also a multiple of `multiple`."""
  b = 1 << max(0, (n - 1).bit_length())
  return -(-b // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """Host-side left padding: (ids [B, length] int32, mask [B, length] int32)."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f'prompt {i} has {len(p)} tokens, more than the {length} slots')
    if len(p):
      ids[i, length - len(p):] = p
      mask[i, length - len(p):] = 1
  return ids, mask
