"""Batch glue of the trainer: the KL metrics of a batch, SFT batches. (A rollout as [B, T]
arrays: `opd_jax.rollout.engine.rollout_arrays`.)
(The per-token advantages: `opd_jax.objectives.advantages`.)

Legend (docs/design.md §7): B rows, P prompt slots, N response slots, T = P + N, J teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from opd_jax import sharding as shd
from opd_jax.buckets import bucket, left_pad


def kl_metrics(kl_sum_JxB: np.ndarray, kl_count_JxB: np.ndarray, tags: Sequence[str],
               names: Sequence[str], prefix: str = 'opd/reverse_kl') -> dict[str, float]:
  """Token-weighted mean reverse KL: overall, per teacher and per tag."""
  out = {}
  total_c = kl_count_JxB.sum()
  if total_c == 0:
    return out
  out[prefix] = float(kl_sum_JxB.sum() / total_c)
  for j, n in enumerate(names):
    if kl_count_JxB[j].sum():
      out[f'{prefix}/{n}'] = float(kl_sum_JxB[j].sum() / kl_count_JxB[j].sum())
  tags = np.asarray(tags)
  for t in sorted(set(tags.tolist())):
    c = kl_count_JxB[:, tags == t].sum()
    if c:
      out[f'{prefix}/tag/{t}'] = float(kl_sum_JxB[:, tags == t].sum() / c)
  return out


def sft_batch(encoder, tokenizer, records, *, response_field: str, eos_id: int,
              prompt_buckets: Sequence[int], response_buckets: Sequence[int]):
  """[B, P + N] numpy arrays for supervised training on `record.extra[response_field]`:
  left-padded prompt, right-padded response + EOS; the loss mask covers the response."""
  prompts = encoder.encode_batch(records)
  responses = []
  for r, p in zip(records, prompts):
    if p is None:
      raise ValueError(f'{r.where}: prompt of record {r.id!r} is over data.max_prompt_len; '
                       'SFT batches cannot skip rows')
    if response_field not in r.extra or not isinstance(r.extra[response_field], str):
      raise ValueError(f"{r.where}: field '{response_field}': record {r.id!r} has no "
                       'string response for SFT (config.sft.response_field)')
    ids = tokenizer(r.extra[response_field], add_special_tokens=False)['input_ids']
    responses.append(list(ids) + [eos_id])
  longest = np.asarray([max(len(p) for p in prompts), max(len(x) for x in responses)])
  longest = shd.allgather_host(longest).max(0)  # every process must build the same shapes
  p_len = bucket(int(longest[0]), prompt_buckets)
  r_len = bucket(int(longest[1]), response_buckets)
  p_ids, p_mask = left_pad(prompts, p_len, tokenizer.pad_token_id or 0)
  r_ids = np.full((len(records), r_len), tokenizer.pad_token_id or 0, np.int32)
  r_mask = np.zeros((len(records), r_len), np.int32)
  for i, x in enumerate(responses):
    r_ids[i, :len(x)] = x
    r_mask[i, :len(x)] = 1
  return {'tokens': np.concatenate([p_ids, r_ids], 1),
          'attention_mask': np.concatenate([p_mask, r_mask], 1),
          'loss_mask': np.concatenate([np.zeros_like(p_mask), r_mask], 1)}
