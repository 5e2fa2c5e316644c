"""Continuous batching for rollouts: R cache rows ("slots") decode together, and a slot whose
request stopped (stop token or max_new_tokens) takes the next pending prompt.

Legend: R slots, B requests, P prompt slots (bucketed, as in sampler.py), N max new tokens,
S = P + N + slack cache slots per slot, r refill rows (a batch bucket), V vocab.

Used through `Sampler(graphdef, ..., slots=R)`; the result is the static sampler's Rollout
(request order, padded to N) with the same draws: request q's step i uses the key
fold_in(fold_in(call key, q), i) and its own Gumbel noise in both paths.

Layout: one shared write pointer. Every decode step writes all slots' new keys/values at
the same cache slot g (`DecodeState.step`), so the model's single-`start` cached call is
used unchanged. A request placed into a slot when the pointer is at g has its left-padded
prompt block at [g - P, g) and its response step i at g + i; the slot's `kv_mask` row is
reset to (0 before g - P, the prompt mask, 1 from g on), which hides whatever the slot's
previous requests left in the cache; positions are per slot (prompt length + i), so the
RoPE phases, hence logits, are the static sampler's. When the pointer reaches S, the host
calls `_compact`: every slot's cache and mask shift left by the same amount (the oldest live
request's start goes to slot 0), one copy of the cache per `slack` steps at least.

Segments: the compiled `_segment` while_loop decodes until at least `need` slots are done
(or the pointer hits S); Python runs once per segment: it reads the done flags, then one
`_refill` call harvests finished slots' responses into the [B, N] outputs (scatter by
request index), prefills the next prompts as one batch at a bucketed row count (r = the
next power of two that the data axes divide) and writes their prompt keys/values, first
logits and reset state into the freed slots. `need` = min(refill_min, pending) while
prompts are pending, else R (run to the end).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.models.decoder import init_cache
from opd_jax.buckets import batch_bucket
from opd_jax.rollout.decode import (AbstractCall, DecodeState, SamplingParams, abstract_key,
                                    cache_spec, decode_layers, decode_step, mesh_context,
                                    prefill, row_keys, stop_hit)


@dataclasses.dataclass
class SlotState:
  """The continuous loop's carry: `dec` (DecodeState over R slots; dec.step = the shared
  cache write slot g, dec.tokens/mask/logps = each slot's current response [R, N]), and
  per slot: `i` its request's response step, `req` its request index (-1: empty or
  harvested), `kv_mask` [R, S] its valid cache slots, `prompt_len`; `iters` loop iterations
  run in total."""
  dec: DecodeState
  i: jax.Array
  req: jax.Array
  kv_mask: jax.Array
  prompt_len: jax.Array
  iters: jax.Array


jax.tree_util.register_dataclass(
    SlotState, data_fields=['dec', 'i', 'req', 'kv_mask', 'prompt_len', 'iters'],
    meta_fields=[])


def _rows(x):
  return shd.constrain(x, shd.BATCH_AXES)


def _init(graphdef, params, *, slots: int, prompt_len: int, cache_len: int, n: int,
          rows: int, pad_id: int, cache_dtype):
  model = nnx.merge(graphdef, params)
  cache = init_cache(model.cfg, slots, cache_len, cache_dtype or model.dtype)
  cache = jax.tree.map(lambda c: shd.constrain(c, *cache_spec()), cache)
  v = model.cfg.vocab_size
  dec = DecodeState(jnp.int32(prompt_len), cache, _rows(jnp.ones((slots,), bool)),
                    _rows(jnp.zeros((slots, v), jnp.float32)),
                    _rows(jnp.full((slots, n), pad_id, jnp.int32)),
                    _rows(jnp.zeros((slots, n), jnp.int32)),
                    _rows(jnp.zeros((slots, n), jnp.float32)))
  st = SlotState(dec, _rows(jnp.zeros((slots,), jnp.int32)),
                 _rows(jnp.full((slots,), -1, jnp.int32)),
                 _rows(jnp.zeros((slots, cache_len), jnp.int32)),
                 _rows(jnp.ones((slots,), jnp.int32)), jnp.int32(0))
  out = {'tokens': _rows(jnp.full((rows, n), pad_id, jnp.int32)),
         'mask': _rows(jnp.zeros((rows, n), jnp.int32)),
         'logps': _rows(jnp.zeros((rows, n), jnp.float32))}
  return st, out


def _harvest(st: SlotState, out):
  """Copies finished slots' responses into the request-ordered outputs [B, N]."""
  rows = out['tokens'].shape[0]
  idx = jnp.where(st.dec.done & (st.req >= 0), st.req, rows)  # out of range: dropped
  return {'tokens': out['tokens'].at[idx].set(st.dec.tokens, mode='drop'),
          'mask': out['mask'].at[idx].set(st.dec.mask, mode='drop'),
          'logps': out['logps'].at[idx].set(st.dec.logps, mode='drop')}


def _refill(graphdef, params, st: SlotState, out, ids_rxP, mask_rxP, src_R, req_R, *,
            pad_id: int, cache_dtype):
  """Harvests finished slots, prefills r new prompts in one call and places prompt
  `src_R[s]` (-1: none) into slot s as request `req_R[s]`."""
  out = _harvest(st, out)
  p = ids_rxP.shape[1]
  pre_cache, pre_logits = prefill(graphdef, params, ids_rxP, mask_rxP, max_new_tokens=0,
                                   cache_dtype=cache_dtype)
  d = st.dec
  slots, cache_len = st.kv_mask.shape
  fill = src_R >= 0
  src = jnp.maximum(src_R, 0)
  lo = d.step - p  # the new prompts occupy [g - P, g)

  def put(c, new):  # c [R, K, S, E], new [r, K, P, E]
    rows = jnp.take(new, src, axis=0).astype(c.dtype)
    old = jax.lax.dynamic_slice(c, (0, 0, lo, 0), (slots, c.shape[1], p, c.shape[3]))
    return jax.lax.dynamic_update_slice(c, jnp.where(fill[:, None, None, None], rows, old),
                                        (0, 0, lo, 0))
  cache = {n: [put(c, new) for c, new in zip(d.cache[n], pre_cache[n])] for n in ('k', 'v')}
  pm = jnp.take(mask_rxP, src, axis=0).astype(jnp.int32)  # [R, P]
  fresh = jnp.broadcast_to((jnp.arange(cache_len) >= d.step).astype(jnp.int32),
                           (slots, cache_len))
  fresh = jax.lax.dynamic_update_slice(fresh, pm, (0, lo))
  col = fill[:, None]
  harvested = d.done & (st.req >= 0)
  dec = DecodeState(d.step, cache, jnp.where(fill, False, d.done),
                    jnp.where(col, jnp.take(pre_logits, src, axis=0), d.logits),
                    jnp.where(col, pad_id, d.tokens), jnp.where(col, 0, d.mask),
                    jnp.where(col, 0.0, d.logps))
  st = SlotState(dec, jnp.where(fill, 0, st.i),
                 jnp.where(fill, req_R, jnp.where(harvested, -1, st.req)),
                 jnp.where(col, fresh, st.kv_mask), jnp.where(fill, pm.sum(-1), st.prompt_len),
                 st.iters)
  return st, out


def _segment(graphdef, params, st: SlotState, need, key, *, sp: SamplingParams, pad_id: int,
             logits_fn=None):
  """Decodes every slot until at least `need` slots are done or the write slot reaches S."""
  model = nnx.merge(graphdef, params)
  layers = decode_layers(model)
  n = sp.max_new_tokens
  cache_len = st.kv_mask.shape[1]
  col_N = jnp.arange(n)[None, :]

  def cond(st: SlotState):
    return (st.dec.step < cache_len) & (jnp.sum(st.dec.done) < need)

  def body(st: SlotState):
    # every slot writes at the shared cache slot `step`; its request's step i goes to column i
    d = st.dec
    token, logp, live, logits, cache = decode_step(
        model, layers, d.logits, d.cache, row_keys(key, jnp.maximum(st.req, 0), st.i), d.done,
        st.prompt_len + st.i, st.kv_mask, d.step, sp=sp, pad_id=pad_id, logits_fn=logits_fn)
    hit = (col_N == st.i[:, None]) & live[:, None]
    stop = stop_hit(token, sp) | (st.i + 1 >= n)
    dec = DecodeState(d.step + 1, cache, d.done | (live & stop), logits,
                      jnp.where(hit, token[:, None], d.tokens), jnp.where(hit, 1, d.mask),
                      jnp.where(hit, logp[:, None], d.logps))
    return SlotState(dec, jnp.where(live, st.i + 1, st.i), st.req, st.kv_mask, st.prompt_len,
                     st.iters + 1)

  return jax.lax.while_loop(cond, body, st)


def _compact(st: SlotState, delta):
  """Shifts every slot's cache and kv mask left by `delta` slots (the write slot too)."""
  d = st.dec
  cache_len = st.kv_mask.shape[1]
  step = d.step - delta
  cache = jax.tree.map(lambda c: jnp.roll(c, -delta, axis=2), d.cache)
  kv_mask = jnp.where(jnp.arange(cache_len)[None] >= step, 1, jnp.roll(st.kv_mask, -delta, 1))
  return dataclasses.replace(st, dec=dataclasses.replace(d, step=step, cache=cache),
                             kv_mask=kv_mask)


class ContinuousBatcher:
  """The continuous path of `Sampler` (one process). See the module docstring."""

  def __init__(self, graphdef, *, slots: int, mesh=None, pad_id: int = 0, cache_dtype=None,
               refill_min: int | None = None, cache_slack: int | None = None, logits_fn=None):
    if slots < 1:
      raise ValueError(f'slots must be >= 1, got {slots}')
    self.slots = int(slots)
    self.mesh = mesh
    self.pad_id = int(pad_id)
    self.cache_dtype = cache_dtype
    self.refill_min = int(refill_min or max(1, slots // 8))
    self.cache_slack = int(32 if cache_slack is None else cache_slack)
    if self.cache_slack < 1:
      raise ValueError(f'cache_slack must be >= 1, got {cache_slack}')
    g = graphdef
    self._init = jax.jit(functools.partial(_init, g), static_argnames=(
        'slots', 'prompt_len', 'cache_len', 'n', 'rows', 'pad_id', 'cache_dtype'))
    self._refill = jax.jit(functools.partial(_refill, g), static_argnames=(
        'pad_id', 'cache_dtype'), donate_argnums=(1, 2))
    self._segment = jax.jit(functools.partial(_segment, g, logits_fn=logits_fn),
                            static_argnames=('sp', 'pad_id'), donate_argnums=(1,))
    self._compact = jax.jit(_compact, donate_argnums=(0,))
    self._harvest = jax.jit(_harvest, donate_argnums=(1,))
    self.last_stats: dict = {}

  def num_slots(self, multiple: int = 1) -> int:
    """R: `slots` rounded up to a multiple of the data axes' extent."""
    return -(-self.slots // multiple) * multiple

  def _put(self, x):
    return jnp.asarray(x) if self.mesh is None else shd.shard_batch(x, self.mesh)

  def abstract_calls(self, params, rows: int, prompt_len: int, sp: SamplingParams):
    """The jitted calls `run` makes for `rows` prompts of `prompt_len` slots, on abstract
    inputs (decode.AbstractCall): `refill` at the first fill's row bucket (the bucket of R
    new prompts, the largest prefill a run makes), `segment` (the decode loop over R slots)
    and `compact` (the cache shift). The [rows, N] outputs stay resident during the segment
    and the compaction. The initial carry (zeros) is only traced for its shapes."""
    mesh = self.mesh
    mult = shd.batch_size_multiple(mesh) if mesh is not None else 1
    slots = self.num_slots(mult)
    n = sp.max_new_tokens
    bb = batch_bucket(rows, mult)
    cache_len = prompt_len + n + self.cache_slack
    rb = batch_bucket(min(slots, rows), mult)
    shapes = f'B={bb} R={slots} P={prompt_len} N={n} S={cache_len}'
    with mesh_context(mesh):
      init = self._init.lower(params, slots=slots, prompt_len=prompt_len, cache_len=cache_len,
                              n=n, rows=bb, pad_id=self.pad_id,
                              cache_dtype=self.cache_dtype).compile()
    st, out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                           init.out_info)
    sds = lambda shape, dtype, n_dims: jax.ShapeDtypeStruct(shape, dtype, sharding=(
        shd.batch_sharding(mesh, n_dims) if mesh is not None else None))
    ids = sds((rb, prompt_len), jnp.int32, 2)
    src = sds((slots,), jnp.int32, 1)
    yield AbstractCall('refill', self._refill, (params, st, out, ids, ids, src, src),
                       dict(pad_id=self.pad_id, cache_dtype=self.cache_dtype),
                       f'{shapes} r={rb}')
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=(
        shd.replicated(mesh) if mesh is not None else None))
    resident = {'outputs': out}
    yield AbstractCall('segment', self._segment, (params, st, scalar, abstract_key(mesh)),
                       dict(sp=sp, pad_id=self.pad_id), shapes, resident)
    yield AbstractCall('compact', self._compact, (st, scalar), {}, shapes, resident)

  def run(self, params, ids_BxP: np.ndarray, mask_BxP: np.ndarray, key, sp: SamplingParams,
          *, rows: int, multiple: int = 1):
    """Responses (tokens, mask, logps [rows, N], request order; rows >= B are padding) and
    the number of decode iterations run. Host arrays in; call under the mesh context."""
    b, p = ids_BxP.shape
    slots = self.num_slots(multiple)
    n = sp.max_new_tokens
    cache_len = p + n + self.cache_slack
    st, out = self._init(params, slots=slots, prompt_len=p, cache_len=cache_len, n=n,
                         rows=rows, pad_id=self.pad_id, cache_dtype=self.cache_dtype)
    pending = collections.deque(range(b))
    done = np.ones((slots,), bool)
    step_i = np.zeros((slots,), np.int64)
    g = p
    segments = refills = compactions = 0
    placements = []  # (refill number, slot, request), for tests and debugging
    while True:
      free = np.nonzero(done)[0]
      take = min(len(free), len(pending))
      if take:
        reqs = [pending.popleft() for _ in range(take)]
        rb = batch_bucket(take, multiple)
        new_ids = np.full((rb, p), self.pad_id, np.int32)
        new_mask = np.zeros((rb, p), np.int32)
        new_mask[:, -1] = 1  # padding rows: one pad token
        new_ids[:take], new_mask[:take] = ids_BxP[reqs], mask_BxP[reqs]
        src = np.full((slots,), -1, np.int32)
        req = np.full((slots,), -1, np.int32)
        src[free[:take]] = np.arange(take)
        req[free[:take]] = reqs
        st, out = self._refill(params, st, out, *(self._put(x) for x in (
            new_ids, new_mask, src, req)), pad_id=self.pad_id, cache_dtype=self.cache_dtype)
        done[free[:take]] = False
        step_i[free[:take]] = 0
        placements += [(refills, int(s), q) for s, q in zip(free[:take], reqs)]
        refills += 1
      if done.all():
        break
      if g >= cache_len:  # no room for another step: shift everything left
        delta = g - p - int(step_i[~done].max())
        st = self._compact(st, jnp.int32(delta))
        g -= delta
        compactions += 1
      need = min(self.refill_min, len(pending)) if pending else slots
      st = self._segment(params, st, jnp.int32(need), key, sp=sp, pad_id=self.pad_id)
      done, g, step_i = jax.device_get((st.dec.done, st.dec.step, st.i))
      done, g, step_i = np.array(done), int(g), np.array(step_i)
      segments += 1
    out = self._harvest(st, out)
    self.last_stats = {'iters': int(st.iters), 'segments': segments, 'refills': refills, 'compactions': compactions,
                       'slots': slots, 'cache_len': cache_len, 'placements': placements}
    return out['tokens'], out['mask'], out['logps'], st.iters
