"""Jitted rollout sampler: prefill, then one `lax.while_loop` of single-token decode steps
over a static-shape KV cache.

Legend: B rows, P prompt slots (bucketed), N max new tokens, S = P + N cache slots, V vocab.

Layout. Prompts are left-padded to P, so every row's next token goes to the same cache slot
P + i at decode step i (one `dynamic_update_slice` for the whole batch) while positions
stay per-row (the count of real tokens before it). The cache (one k and one v array
[B, K, S, E] per layer) is created by `prefill` (a scan over the stacked layers), then
donated to `decode` (layers unrolled), whose loop updates each layer's arrays in place; no
Python runs per token.

Draws. Request r (its index in the prompt list; on several processes, its global row) draws
its response step i with the key fold_in(fold_in(call key, r), i) and its own Gumbel noise
(one draw per row), so what it samples depends only on its key and its prompt, never on the
batch around it: the continuous-batching sampler (`opd_jax.rollout.continuous`, `Sampler(...,
slots=R)`) returns the same tokens and logprobs as this static one.

Behaviour logprobs. `logprobs[:, i]` is the log-probability of the sampled token under the
exact distribution it was drawn from, the policy of `opd_jax.policy` (tempered, then top-k,
then top-p, renormalised over what is kept). The update differentiates the same policy, so on
fresh rollouts ρ = 1 whatever the truncation. Greedy decoding (temperature 0, used by
evaluation only) is a point mass; for it we report the untempered model logprob
log_softmax(logits)[token] instead of 0.

Bucketing. P is rounded up to the next entry of `prompt_buckets` and B to the next power of
two that the data axes divide, so prompts of other lengths in the same bucket reuse the
compiled functions. Padded rows start finished and are dropped from the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.buckets import DEFAULT_PROMPT_BUCKETS, batch_bucket, bucket, left_pad
from opd_jax import sharding as shd
from opd_jax.rollout.continuous import ContinuousBatcher
from opd_jax.rollout.decode import (AbstractCall, DecodeState, SamplingParams, abstract_key,
                                    abstract_prefill_outputs, decode_layers, decode_step,
                                    prefill, row_keys, stop_hit)



@dataclasses.dataclass
class Rollout:
  """A batch of sampled responses (device arrays; rows = the prompts given).

  prompt_ids/prompt_mask [B, P] left-padded; tokens/mask/logprobs [B, N]: the response,
  its mask (1 up to and including the stop token) and behaviour logprobs (0 where masked).
  """
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  decode_steps: jax.Array | None = None  # iterations the decode loop ran (early exit < N)
  host_count: int | None = None          # this process's real rows (the first ones it holds)

  def host_rows(self, x) -> np.ndarray:
    """This process's real rows of one of the arrays, as numpy."""
    return shd.local_rows(x)[:self.host_count]

  @property
  def lengths(self) -> jax.Array:
    return self.mask.sum(axis=-1)

  def sequences(self) -> tuple[jax.Array, jax.Array]:
    """(ids, mask) [B, P + N] of prompt + response, for scoring and the update."""
    return (jnp.concatenate([self.prompt_ids, self.tokens], axis=1),
            jnp.concatenate([self.prompt_mask, self.mask], axis=1))


jax.tree_util.register_dataclass(
    Rollout, data_fields=['prompt_ids', 'prompt_mask', 'tokens', 'mask', 'logprobs',
                          'decode_steps'], meta_fields=['host_count'])


def _decode(graphdef, params, cache, logits_BxV, prompt_mask_BxP, done_B, key, *,
            sp: SamplingParams, pad_id: int, logits_fn=None):
  model = nnx.merge(graphdef, params)
  layers = decode_layers(model)
  b, p = prompt_mask_BxP.shape
  n = sp.max_new_tokens
  kv_mask_BxS = jnp.concatenate([prompt_mask_BxP, jnp.ones((b, n), prompt_mask_BxP.dtype)], 1)
  prompt_len_B = prompt_mask_BxP.sum(axis=-1)
  request_B = jnp.arange(b, dtype=jnp.int32)  # row r is request r

  def cond(st: DecodeState):
    return (st.step < n) & ~jnp.all(st.done)

  def body(st: DecodeState):
    # every row writes its response step `step` at cache slot P + step
    token, logp, live, logits, cache = decode_step(
        model, layers, st.logits, st.cache, row_keys(key, request_B, jnp.broadcast_to(
            st.step, (b,))), st.done, prompt_len_B + st.step, kv_mask_BxS, p + st.step,
        sp=sp, pad_id=pad_id, logits_fn=logits_fn)
    at = (0, st.step)
    return DecodeState(
        st.step + 1, cache, st.done | stop_hit(token, sp), logits,
        jax.lax.dynamic_update_slice(st.tokens, token[:, None], at),
        jax.lax.dynamic_update_slice(st.mask, live[:, None].astype(jnp.int32), at),
        jax.lax.dynamic_update_slice(st.logps, logp[:, None], at))

  init = DecodeState(jnp.int32(0), cache, done_B, logits_BxV,
                     jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.int32),
                     jnp.zeros((b, n), jnp.float32))
  out = jax.lax.while_loop(cond, body, init)
  # Returning the cache lets XLA alias it to the donated input: the loop runs in place.
  return out.tokens, out.mask, out.logps, out.step, out.cache


class Sampler:
  """Samples responses from a model; compiled once per (batch bucket, prompt bucket, params).

  Usage:
    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, mesh=mesh, pad_id=tok.pad_token_id)
    rollout = sampler(params, prompts, key, SamplingParams(max_new_tokens=256, stop_ids=(eos,)))
  `prompts` is a list of token-id lists, or a pair (ids [B, P], mask [B, P]) already
  left-padded. With a mesh, rows are split over the data axes and the cache's kv heads over
  'tensor'. With a `layout` (sharding.RolloutLayout over the mesh's devices) the sampler
  decodes there: parameters not already on it are resharded once per call (the trainer's
  cast puts them there), and the returned Rollout is batch-sharded on `mesh` again. Without
  one, parameters keep whatever sharding they were created with.

  `slots` R (None or 0: off) turns on continuous batching (`opd_jax.rollout.continuous`): R cache
  rows decode at once and a row that stops takes the next pending prompt; same draws and
  the same Rollout layout as without it. It is used when there are more prompts than slots
  on one process; otherwise (or on several processes) the static path runs, which draws the
  same samples. `refill_min` (default max(1, R // 8)) and `cache_slack` (default 32) tune it
  (see opd_jax/rollout/continuous.py). `logits_fn` (benchmarks and tests only, never training)
  transforms each step's logits [B, V] before the policy.
  """

  def __init__(self, graphdef: nnx.GraphDef, *, mesh: jax.sharding.Mesh | None = None,
               pad_id: int = 0, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               cache_dtype=None, slots: int | None = None, refill_min: int | None = None,
               cache_slack: int | None = None, logits_fn=None,
               layout: shd.RolloutLayout | None = None):
    self.graphdef = graphdef
    self.mesh = mesh           # where the caller's arrays live (the Rollout is returned here)
    self.layout = layout
    self.run_mesh = layout.mesh if layout is not None else mesh  # where decoding runs
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self._prefill = jax.jit(functools.partial(prefill, graphdef), static_argnames=(
        'max_new_tokens', 'cache_dtype'))
    self._decode = jax.jit(functools.partial(_decode, graphdef, logits_fn=logits_fn),
                           static_argnames=('sp', 'pad_id'), donate_argnums=(1,))
    self.cache_dtype = cache_dtype
    self.slots = int(slots or 0)
    if self.slots < 0:
      raise ValueError(f'slots must be >= 0 (0 or None: static batching), got {slots}')
    self.continuous = None
    if self.slots:
      self.continuous = ContinuousBatcher(graphdef, slots=self.slots, mesh=self.run_mesh,
                                          pad_id=self.pad_id, cache_dtype=cache_dtype,
                                          refill_min=refill_min, cache_slack=cache_slack,
                                          logits_fn=logits_fn)

  def abstract_calls(self, params, rows: int, prompt_len: int, sp: SamplingParams):
    """The jitted calls one `__call__` on `rows` prompts of `prompt_len` slots makes, on
    abstract inputs (rollout.engine.AbstractCall; `params` abstract, on the layout the
    sampler decodes with): prefill and decode, or, when the rows would be batched
    continuously, the continuous batcher's calls. The driver sends back each call's abstract
    outputs (None: it did not compile)."""
    mesh = self.run_mesh
    mult = shd.batch_size_multiple(mesh) if mesh is not None else 1
    bb = batch_bucket(rows, mult)
    if self.continuous is not None and rows > self.continuous.num_slots(mult):
      yield from self.continuous.abstract_calls(params, rows, prompt_len, sp)
      return
    sds = lambda shape, dtype, n: jax.ShapeDtypeStruct(shape, dtype, sharding=(
        shd.batch_sharding(mesh, n) if mesh is not None else None))
    ids = sds((bb, prompt_len), jnp.int32, 2)
    shapes = f'B={bb} P={prompt_len} N={sp.max_new_tokens}'
    out = yield AbstractCall('prefill', self._prefill, (params, ids, ids), dict(
        max_new_tokens=sp.max_new_tokens, cache_dtype=self.cache_dtype), shapes)
    if out is not None:
      cache, logits = out
    else:  # the prefill does not compile; the decode still can, with the prefill's layout
      cache, logits = abstract_prefill_outputs(self.graphdef, params, bb, prompt_len,
                                               prompt_len + sp.max_new_tokens,
                                               self.cache_dtype, mesh)
    key = abstract_key(mesh)
    done = sds((bb,), jnp.bool_, 1)
    yield AbstractCall('decode', self._decode, (params, cache, logits, ids, done, key),
                       dict(sp=sp, pad_id=self.pad_id), shapes)

  def compiled_variants(self) -> int:
    """How many shapes the prefill has been compiled for (bucketing keeps this small)."""
    return self._prefill._cache_size()

  def _shard(self, x):
    if self.run_mesh is None:
      return jnp.asarray(x)
    if jax.process_count() > 1:
      return shd.shard_local_batch(x, self.run_mesh)
    return shd.shard_batch(x, self.run_mesh)

  def _batch_multiple(self) -> int:
    pcount = jax.process_count()
    return 1 if self.run_mesh is None else max(
        1, shd.batch_size_multiple(self.run_mesh) // pcount)

  def _to_caller(self, x):
    """A [B, ...] result moved from the rollout layout to the caller's mesh."""
    if self.layout is None or self.mesh is None:
      return x
    return jax.device_put(x, shd.rows_sharding(self.mesh, x.shape[0], x.ndim))

  def _host_prompts(self, prompts):
    """(ids [B, P], mask [B, P]) int32 host arrays, left-padded to the prompt bucket."""
    pcount = jax.process_count()
    if isinstance(prompts, tuple):
      ids, mask = (np.asarray(x) for x in prompts)
      b = ids.shape[0]
      longest = ids.shape[1]
    else:
      b = len(prompts)
      if b == 0:
        raise ValueError('no prompts to sample from')
      longest = max(len(x) for x in prompts)
      if longest == 0:
        raise ValueError('every prompt is empty; a prompt needs at least one token')
    if pcount > 1:  # every process must compile the same shapes
      sizes = shd.allgather_host(np.asarray([b, longest]))
      if len(set(sizes[:, 0].tolist())) != 1:
        raise ValueError(f'processes sample different numbers of prompts: {sizes[:, 0]}')
      longest = int(sizes[:, 1].max())
    p = bucket(longest, self.prompt_buckets)
    if isinstance(prompts, tuple):
      pad = p - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=self.pad_id)
      mask = np.pad(mask, ((0, 0), (pad, 0)))
    else:
      ids, mask = left_pad(prompts, p, self.pad_id)
    if np.any(mask.sum(-1) == 0):
      raise ValueError(f'prompt rows {np.nonzero(mask.sum(-1) == 0)[0].tolist()} are empty')
    return ids.astype(np.int32), mask.astype(np.int32)

  def __call__(self, params, prompts, key, sp: SamplingParams) -> Rollout:
    """Samples one response per prompt.

    On several processes each passes its own prompts (the same number on every process);
    the returned arrays are global, with each process's rows contiguous, and when rows had
    to be padded up to a bucket the padding stays in place (finished, all-zero masks):
    read this process's rows with `rollout.host_rows(x)`.
    """
    pcount = jax.process_count()
    ids, mask = self._host_prompts(prompts)
    b = ids.shape[0]
    mult = self._batch_multiple()
    bb = batch_bucket(b, mult)
    done = np.zeros((bb,), bool)
    if bb != b:  # padded rows hold one pad token and start finished
      ids = np.concatenate([ids, np.full((bb - b, ids.shape[1]), self.pad_id, np.int32)])
      extra = np.zeros((bb - b, mask.shape[1]), np.int32)
      extra[:, -1] = 1
      mask = np.concatenate([mask, extra])
      done[b:] = True
    use_continuous = (self.continuous is not None and pcount == 1
                      and b > self.continuous.num_slots(mult))
    if self.layout is not None:  # parameters and key on the rollout layout's mesh
      params = self.layout.put(params)
      key = self.layout.put_key(key)
    ctx = (jax.set_mesh(self.run_mesh) if self.run_mesh is not None
           else contextlib.nullcontext())
    with ctx:
      if use_continuous:
        tokens, rmask, logps, steps = self.continuous.run(params, ids[:b], mask[:b], key, sp,
                                                          rows=bb, multiple=mult)
        ids, mask = (self._shard(x) for x in (ids, mask))
      else:
        ids, mask, done = (self._shard(x) for x in (ids, mask, done))
        cache, logits = self._prefill(params, ids, mask, max_new_tokens=sp.max_new_tokens,
                                      cache_dtype=self.cache_dtype)
        tokens, rmask, logps, steps, _ = self._decode(params, cache, logits, mask, done, key,
                                                      sp=sp, pad_id=self.pad_id)
    fields = (ids, mask, tokens, rmask, logps)
    if bb != b and pcount == 1:
      fields = tuple(x[:b] for x in fields)
    fields = tuple(self._to_caller(x) for x in fields)
    return Rollout(*fields, decode_steps=steps, host_count=b)
