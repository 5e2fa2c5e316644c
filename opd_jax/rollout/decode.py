"""The pieces every rollout engine shares: `SamplingParams`, per-request draw keys
(`row_keys`), one token drawn from the policy (`select`), the decode carry (`DecodeState`),
the KV-cache sharding (`cache_spec`), the prompt prefill (`prefill`), the one decode step
(`decode_layers`, then `decode_step` per generated token) and the abstract inputs every
engine's `abstract_calls` builds for the AOT check (`AbstractCall`, `abstract_key`,
`abstract_prefill_outputs`). The static sampler (`sampler`),
the continuous batcher (`continuous`) and the multi-turn sampler (`multiturn`) import them
from here; each runs `decode_step` in its own `while_loop`, which differs only in where a
row's token is stored and when a row stops.

Legend (docs/design.md §7): B rows, P prompt slots, S cache slots, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax import policy as policy_lib
from opd_jax import sharding as shd
from opd_jax.models.decoder import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static sampling settings (a change recompiles).

  temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; stop_ids end a row (the stop
  token itself is part of the response).
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    object.__setattr__(self, 'stop_ids', tuple(int(i) for i in self.stop_ids))


def argmax(x):
  """First index of the maximum along the last axis. Two plain reductions: XLA:CPU runs
  jnp.argmax's (value, index) reduction ~50x slower at V = 2048."""
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.minimum(jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def row_keys(key, request_B, step_B):
  """Per-row draw keys fold_in(fold_in(key, request), step) [B] (request, step int [B])."""
  fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  return jax.vmap(jax.random.fold_in)(fold(key, request_B.astype(jnp.uint32)),
                                      step_B.astype(jnp.uint32))


def select(logits_BxV, keys_B, sp: SamplingParams):
  """Draws one token per row, row b with its own key `keys_B[b]`; returns (token [B],
  logprob under the drawn-from distribution [B])."""
  if sp.temperature == 0.0:
    token = argmax(logits_BxV)
    logp = jax.nn.log_softmax(logits_BxV, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
  x = policy_lib.truncate(logits_BxV / sp.temperature, sp.top_k, sp.top_p)
  # Gumbel-max, as jax.random.categorical does (same first-index tie rule); each row's noise
  # comes from its own key, so a row's draw does not depend on the others.
  noise = jax.vmap(lambda k: jax.random.gumbel(k, x.shape[-1:], jnp.float32))(keys_B)
  token = argmax(x + noise)
  logp = jax.nn.log_softmax(x, axis=-1)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@dataclasses.dataclass
class DecodeState:
  """The decode loop's carry. `step`: loop iterations so far (the static sampler writes
  every row's response step `step` at cache slot P + step; the continuous one uses it as
  the shared cache write slot). cache: {'k', 'v'}: L arrays [B, K, S, E]; done [B]; logits
  [B, V] (of each row's last token); tokens / mask / logps [B, N] (the responses so far)."""
  step: jax.Array
  cache: dict
  done: jax.Array
  logits: jax.Array
  tokens: jax.Array
  mask: jax.Array
  logps: jax.Array


jax.tree_util.register_dataclass(
    DecodeState, data_fields=['step', 'cache', 'done', 'logits', 'tokens', 'mask', 'logps'],
    meta_fields=[])


def cache_spec():
  return (shd.BATCH_AXES, 'tensor', None, None)  # each layer's [B, K, S, E]


def prefill(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, *, max_new_tokens: int,
             cache_dtype):
  model = nnx.merge(graphdef, params)
  b, p = prompt_ids_BxP.shape
  # Per-layer cache arrays: the prefill (a scan over the stacked layers) fills their first P
  # slots, every decode step (layers unrolled) updates them in place.
  cache = init_cache(model.cfg, b, p + max_new_tokens, cache_dtype or model.dtype)
  cache = jax.tree.map(lambda c: shd.constrain(c, *cache_spec()), cache)
  kv_mask_BxS = jnp.concatenate(
      [prompt_mask_BxP, jnp.ones((b, max_new_tokens), prompt_mask_BxP.dtype)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1) - 1, 0)
  hidden, cache = model.hidden(prompt_ids_BxP, positions_BxT=positions, cache=cache,
                               kv_mask_BxS=kv_mask_BxS, start=0)
  logits = model.logits(hidden[:, -1:])[:, 0]
  return cache, logits


def decode_layers(model):
  """Per-layer decode weights for `decode_step`: sliced (and q/k/v, gate/up fused unless
  'tensor' splits them) once, outside the decode loop."""
  return model.split_layers(fuse=shd.mesh_axis_size('tensor') == 1)


def decode_step(model, layers, logits_BxV, cache, keys_B, done_B, positions_B, kv_mask_BxS,
                write_slot, *, sp: SamplingParams, pad_id: int, logits_fn=None):
  """One generated token for every row, the body every decode loop shares.

  Draws row b's token from the policy of `logits_BxV` with its key `keys_B[b]` (a row
  already done emits `pad_id`), then runs the tokens through the model at position
  `positions_B` and cache slot `write_slot`, attending to the slots `kv_mask_BxS` marks.
  Returns (token [B] int32, logp [B] (0 where done), live [B] = ~done, the next logits
  [B, V], the updated cache). `logits_fn` (benchmarks and tests only) transforms the logits
  before the policy."""
  logits = logits_BxV if logits_fn is None else logits_fn(logits_BxV)
  token, logp = select(logits, keys_B, sp)
  live = ~done_B
  token = jnp.where(live, token, pad_id).astype(jnp.int32)
  hidden, cache = model.hidden(token[:, None], positions_BxT=positions_B[:, None], cache=cache,
                               kv_mask_BxS=kv_mask_BxS, start=write_slot, unrolled=layers)
  return token, jnp.where(live, logp, 0.0), live, model.logits(hidden)[:, 0], cache


def stop_hit(token_B, sp: SamplingParams):
  """Whether each row's token is one of `sp.stop_ids`."""
  return jnp.isin(token_B, jnp.asarray(sp.stop_ids or (-1,), jnp.int32))


# ----------------------------------------------------------------- abstract calls (AOT)
@dataclasses.dataclass(frozen=True)
class AbstractCall:
  """One jitted call of a rollout engine on abstract inputs (jax.ShapeDtypeStruct with
  shardings), for the AOT check. `resident`: buffers the engine keeps alive on the devices
  while this call runs without passing them to it (e.g. the continuous batcher's outputs).
  An engine's `abstract_calls(...)` is a generator of these; the driver sends back each
  call's abstract outputs (None when it did not compile)."""
  name: str
  fn: Any
  args: tuple
  kwargs: dict
  shapes: str
  resident: dict = dataclasses.field(default_factory=dict)


def mesh_context(mesh):
  """`jax.set_mesh(mesh)`, or nothing without a mesh."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def abstract_key(mesh):
  """An abstract PRNG key, replicated over `mesh`."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype,
                              sharding=shd.replicated(mesh) if mesh is not None else None)


def abstract_prefill_outputs(graphdef, params, rows: int, prompt_len: int, cache_len: int,
                             cache_dtype, mesh):
  """The abstract (cache, logits) of `prefill` for `rows` prompts of `prompt_len` slots and
  a cache of `cache_len` slots, with the shardings the prefill gives them (cache kv heads
  over 'tensor' where they divide, rows over the data axes): what a decode is compiled
  against when the prefill itself does not compile."""
  def spec(n):
    return jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32, sharding=(
        shd.batch_sharding(mesh, n) if mesh is not None else None))
  fn = functools.partial(prefill, graphdef, max_new_tokens=cache_len - prompt_len,
                         cache_dtype=cache_dtype)
  with mesh_context(mesh):
    cache, logits = jax.eval_shape(fn, params, spec(2), spec(2))
  if mesh is None:
    return cache, logits
  tensor = mesh.shape['tensor']

  def kv(x):
    axis = 'tensor' if x.shape[1] % tensor == 0 else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, P(shd.BATCH_AXES, axis, None, None)))
  return (jax.tree.map(kv, cache), jax.ShapeDtypeStruct(
      logits.shape, logits.dtype, sharding=shd.batch_sharding(mesh, 2)))
