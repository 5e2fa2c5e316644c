"""Per-token log-probabilities of given tokens under a model (teacher, reference, student).

Legend: B sequences, T positions, C positions per chunk, D hidden, V vocabulary, K top-k.

The final hidden states [B, T, D] are computed once; the output projection and the
softmax over V then run chunk by chunk over T inside `lax.scan`, so `[B, T, V]` logits never
exist at once (a 151,936-token vocabulary at B=8, T=1024 would be 5 GB in fp32). With
`remat=True` each chunk is recomputed in the backward pass instead of being stored, which is
how the update step differentiates through the same code.

Alignment: `logprobs[:, t]` is log p(tokens[t] | tokens[:t]); position 0 (no context) and
masked positions are 0. `top_logprobs[:, t]` / `top_ids[:, t]` describe the distribution
that predicted position t (also zero at t = 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.sharding import BATCH_AXES, constrain

DEFAULT_LOGITS_BUDGET = 2**28  # bytes of fp32 logits per chunk (256 MiB)


def auto_chunk_size(batch: int, length: int, vocab: int,
                    budget_bytes: int = DEFAULT_LOGITS_BUDGET) -> int:
  """The largest power-of-two chunk whose [B, C, V] fp32 logits fit in `budget_bytes`."""
  c = max(1, budget_bytes // max(1, batch * vocab * 4))
  c = 1 << (c.bit_length() - 1)
  return int(min(c, max(1, length)))


def map_vocab_chunks(hidden_BxTxD, unembed_VxD, fn: Callable[..., Any], extras=None, *,
                     chunk_size: int | None = None, temperature: float = 1.0,
                     remat: bool = False):
  """Applies `fn(logp_BxCxV, extras_chunk) -> pytree of [B, C, ...]` chunk by chunk over T.

  `logp` is log_softmax(hidden @ unembed.T / temperature) in float32. `extras` is a pytree
  of [B, T, ...] arrays sliced along T alongside. Returns fn's outputs concatenated to T.
  """
  b, t, _ = hidden_BxTxD.shape
  vocab = unembed_VxD.shape[0]
  # The projection, gathered over the data axes once (sharded only over 'tensor'), before
  # the chunk loop. Left to itself XLA:TPU sinks an FSDP-sharded projection's all-gather
  # into the loop and gathers [V, D] again for every chunk (opd_single_teacher on v5e-16:
  # 742 GiB per teacher micro-batch, and the update's gradient all-reduced per chunk too);
  # the barrier keeps the gathered copy outside.
  unembed_VxD = jax.lax.optimization_barrier(constrain(unembed_VxD, 'tensor', None))
  c = chunk_size or auto_chunk_size(b, t, vocab)
  n = -(-t // c)
  pad = n * c - t

  def to_chunks(x):  # [B, T, ...] -> [W, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

  def body(_, xs):
    h_BxCxD, ex = xs
    logits = jnp.einsum('bcd,vd->bcv', h_BxCxD, unembed_VxD,
                        preferred_element_type=jnp.float32)
    logits = constrain(logits, BATCH_AXES, None, 'tensor')
    if temperature != 1.0:
      logits = logits / temperature
    return None, fn(jax.nn.log_softmax(logits, axis=-1), ex)

  if remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  _, out = jax.lax.scan(body, None, (to_chunks(hidden_BxTxD), jax.tree.map(to_chunks, extras)))
  return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape((b, n * c) + y.shape[3:])[:, :t],
                      out)


def _token_stats(logp_BxCxV, ex, *, top_k: int, with_entropy: bool):
  target_BxC = ex['target']
  out = {'logprobs': jnp.take_along_axis(logp_BxCxV, target_BxC[..., None], axis=-1)[..., 0]}
  if top_k:
    top, ids = jax.lax.top_k(logp_BxCxV, top_k)
    out['top_logprobs'], out['top_ids'] = top, ids
    # The mass outside the top-k, summed directly (log(1 - sum) would cancel catastrophically
    # when the top-k hold almost everything).
    in_top = logp_BxCxV >= top[..., -1:]
    out['tail_logprob'] = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, logp_BxCxV), axis=-1)
  if with_entropy:
    out['entropy'] = -jnp.sum(jnp.exp(logp_BxCxV) * logp_BxCxV, axis=-1)
  return out


def score_model(model, tokens_BxT, mask_BxT, *, positions_BxT=None, temperature: float = 1.0,
                top_k: int = 0, with_entropy: bool = False, chunk_size: int | None = None,
                remat: bool = False, with_hidden: bool = False) -> dict[str, jax.Array]:
  """Per-token logprobs of `tokens` under a (merged) Decoder; differentiable.

  Returns {'logprobs' [B, T]} plus 'top_logprobs' / 'top_ids' [B, T, K] and 'tail_logprob'
  [B, T] (log of the mass outside the top-k; -inf when K = V) when top_k > 0, and
  'entropy' [B, T] (nats) when asked. All float32 (ids int32), zero at t = 0 and where mask is 0.
  `with_hidden` adds 'hidden' [B, T, D] (the model's dtype): the final hidden state that
  predicts position t (the exact full-vocabulary losses recompute logits from it).
  """
  hidden, _ = model.hidden(tokens_BxT, mask_BxT, positions_BxT, remat=remat)
  # hidden[t - 1] predicts tokens[t]; the last hidden state predicts nothing here.
  out = map_vocab_chunks(
      hidden[:, :-1], model.unembed_weight(),
      functools.partial(_token_stats, top_k=top_k, with_entropy=with_entropy),
      {'target': tokens_BxT[:, 1:].astype(jnp.int32)},
      chunk_size=chunk_size, temperature=temperature, remat=remat)
  if with_hidden:
    out['hidden'] = hidden[:, :-1]
  valid = mask_BxT[:, 1:].astype(bool) & mask_BxT[:, :-1].astype(bool)

  def align(x):  # [B, T-1, ...] -> [B, T, ...], zero where invalid
    v = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    x = jnp.where(v, x, jnp.zeros_like(x))
    return jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))
  return {k: align(v) for k, v in out.items()}


def make_score_fn(graphdef: nnx.GraphDef, *, temperature: float = 1.0, top_k: int = 0,
                  with_entropy: bool = False, chunk_size: int | None = None,
                  micro_batches: int = 1, with_hidden: bool = False):
  """A jitted `(params, tokens_BxT, mask_BxT) -> dict` for a frozen model (teacher,
  reference, or the student without gradients). Compiled once per (B, T) shape; callers
  bucket their shapes (see `opd_jax.buckets`).

  `micro_batches` > 1 runs the forward on that many groups of rows one after another
  (`lax.map`), so activation memory is that of B / micro_batches rows; fewer groups are used
  when B is not divisible into groups that span the data axes (see `row_groups`)."""

  @jax.jit
  def score(params, tokens_BxT, mask_BxT):
    model = nnx.merge(graphdef, params)
    fn = functools.partial(score_model, model, temperature=temperature, top_k=top_k,
                           with_entropy=with_entropy, chunk_size=chunk_size,
                           with_hidden=with_hidden)
    m = row_groups(tokens_BxT.shape[0], micro_batches)
    if m == 1:
      return fn(tokens_BxT, mask_BxT)
    return unsplit_rows(jax.lax.map(lambda xs: fn(*xs), split_rows((tokens_BxT, mask_BxT), m)))
  return score


def row_groups(rows: int, micro_batches: int) -> int:
  """The largest m <= micro_batches such that `rows` splits into m groups whose size is a
  multiple of the data-parallel extent (of the mesh set by `jax.set_mesh`)."""
  dp = math.prod(shd.mesh_axis_size(a) for a in shd.BATCH_AXES)
  m = max(1, int(micro_batches))
  while m > 1 and rows % (m * dp):
    m -= 1
  return m


def split_rows(tree, m: int):
  """[B, ...] -> [m, B / m, ...] with group g holding rows g, m + g, 2m + g, ... (strided, so
  each group keeps the batch's row sharding instead of landing on a few devices)."""
  return jax.tree.map(lambda x: jnp.swapaxes(
      x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1), tree)


def unsplit_rows(tree):
  """The inverse of `split_rows`: [m, B / m, ...] -> [B, ...]."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(
      (x.shape[0] * x.shape[1],) + x.shape[2:]), tree)
