"""Jitted rollout sampler: prefill, then one `lax.while_loop` of single-token decode steps
over a static-shape KV cache.

Legend: B rows, P prompt slots (bucketed), N max new tokens, S = P + N cache slots, V vocab.

Layout. Prompts are left-padded to P, so every row's next token goes to the same cache slot
P + i at decode step i (one `dynamic_update_slice` for the whole batch) while positions
stay per-row (the count of real tokens before it). The cache (one k and one v array
[B, S, K, E] per layer) is created by `prefill` (a scan over the stacked layers), then
donated to `decode` (layers unrolled), whose loop updates each layer's arrays in place; no
Python runs per token.

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

from opd_jax import policy as policy_lib
from opd_jax import sharding as shd
from opd_jax.models.decoder import init_cache

DEFAULT_PROMPT_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 ... 32768


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


def _argmax(x):
  """First index of the maximum along the last axis. Two plain reductions: XLA:CPU runs
  jnp.argmax's (value, index) reduction ~50x slower at V = 2048."""
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.minimum(jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def _select(logits_BxV, key, sp: SamplingParams):
  """Draws one token per row; returns (token [B], logprob under the drawn-from dist [B])."""
  if sp.temperature == 0.0:
    token = _argmax(logits_BxV)
    logp = jax.nn.log_softmax(logits_BxV, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
  x = policy_lib.truncate(logits_BxV / sp.temperature, sp.top_k, sp.top_p)
  # Gumbel-max, as jax.random.categorical does (same draws, same first-index tie rule).
  token = _argmax(x + jax.random.gumbel(key, x.shape, jnp.float32))
  logp = jax.nn.log_softmax(x, axis=-1)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _cache_spec():
  return (shd.BATCH_AXES, None, 'tensor', None)  # each layer's [B, S, K, E]


def _prefill(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, *, max_new_tokens: int,
             cache_dtype):
  model = nnx.merge(graphdef, params)
  b, p = prompt_ids_BxP.shape
  # Per-layer cache arrays: the prefill (a scan over the stacked layers) fills their first P
  # slots, every decode step (layers unrolled) updates them in place.
  cache = init_cache(model.cfg, b, p + max_new_tokens, cache_dtype or model.dtype)
  cache = jax.tree.map(lambda c: shd.constrain(c, *_cache_spec()), cache)
  kv_mask_BxS = jnp.concatenate(
      [prompt_mask_BxP, jnp.ones((b, max_new_tokens), prompt_mask_BxP.dtype)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1) - 1, 0)
  hidden, cache = model.hidden(prompt_ids_BxP, positions_BxT=positions, cache=cache,
                               kv_mask_BxS=kv_mask_BxS, start=0)
  logits = model.logits(hidden[:, -1:])[:, 0]
  return cache, logits


def _decode(graphdef, params, cache, logits_BxV, prompt_mask_BxP, done_B, key, *,
            sp: SamplingParams, pad_id: int):
  model = nnx.merge(graphdef, params)
  # Sliced (and q/k/v, gate/up fused unless 'tensor' splits them) once, outside the loop.
  fuse = shd.mesh_axis_size('tensor') == 1
  layers = model.split_layers(fuse=fuse)
  b, p = prompt_mask_BxP.shape
  n = sp.max_new_tokens
  kv_mask_BxS = jnp.concatenate([prompt_mask_BxP, jnp.ones((b, n), prompt_mask_BxP.dtype)], 1)
  prompt_len_B = prompt_mask_BxP.sum(axis=-1)
  stop_ids = jnp.asarray(sp.stop_ids or (-1,), jnp.int32)

  def cond(state):
    step, done = state[0], state[2]
    return (step < n) & ~jnp.all(done)

  def body(state):
    step, cache, done, logits, tokens, mask, logps = state
    token, logp = _select(logits, jax.random.fold_in(key, step), sp)
    token = jnp.where(done, pad_id, token).astype(jnp.int32)
    live = ~done
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    mask = jax.lax.dynamic_update_slice(mask, live[:, None].astype(jnp.int32), (0, step))
    logps = jax.lax.dynamic_update_slice(logps, jnp.where(live, logp, 0.0)[:, None], (0, step))
    done = done | jnp.isin(token, stop_ids)
    hidden, cache = model.hidden(token[:, None], positions_BxT=(prompt_len_B + step)[:, None],
                                 cache=cache, kv_mask_BxS=kv_mask_BxS, start=p + step,
                                 unrolled=layers)
    logits = model.logits(hidden)[:, 0]
    return step + 1, cache, done, logits, tokens, mask, logps

  init = (jnp.int32(0), cache, done_B, logits_BxV, jnp.full((b, n), pad_id, jnp.int32),
          jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32))
  steps, cache, _, _, tokens, mask, logps = jax.lax.while_loop(cond, body, init)
  # Returning the cache lets XLA alias it to the donated input: the loop runs in place.
  return tokens, mask, logps, steps, cache


class Sampler:
  """Samples responses from a model; compiled once per (batch bucket, prompt bucket, params).

  Usage:
    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, mesh=mesh, pad_id=tok.pad_token_id)
    rollout = sampler(params, prompts, key, SamplingParams(max_new_tokens=256, stop_ids=(eos,)))
  `prompts` is a list of token-id lists, or a pair (ids [B, P], mask [B, P]) already
  left-padded. With a mesh, rows are split over the data axes and the cache's kv heads over
  'tensor'; parameters keep whatever sharding they were created with.
  """

  def __init__(self, graphdef: nnx.GraphDef, *, mesh: jax.sharding.Mesh | None = None,
               pad_id: int = 0, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               cache_dtype=None):
    self.graphdef = graphdef
    self.mesh = mesh
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=(
        'max_new_tokens', 'cache_dtype'))
    self._decode = jax.jit(functools.partial(_decode, graphdef),
                           static_argnames=('sp', 'pad_id'), donate_argnums=(1,))
    self.cache_dtype = cache_dtype

  def compiled_variants(self) -> int:
    """How many shapes the prefill has been compiled for (bucketing keeps this small)."""
    return self._prefill._cache_size()

  def _shard(self, x):
    if self.mesh is None:
      return jnp.asarray(x)
    if jax.process_count() > 1:
      return shd.shard_local_batch(x, self.mesh)
    return shd.shard_batch(x, self.mesh)

  def __call__(self, params, prompts, key, sp: SamplingParams) -> Rollout:
    """Samples one response per prompt.

    On several processes each passes its own prompts (the same number on every process);
    the returned arrays are global, with each process's rows contiguous, and when rows had
    to be padded up to a bucket the padding stays in place (finished, all-zero masks):
    read this process's rows with `rollout.host_rows(x)`.
    """
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
    mult = 1 if self.mesh is None else max(1, shd.batch_size_multiple(self.mesh) // pcount)
    bb = batch_bucket(b, mult)
    done = np.zeros((bb,), bool)
    if bb != b:  # padded rows hold one pad token and start finished
      ids = np.concatenate([ids, np.full((bb - b, ids.shape[1]), self.pad_id, np.int32)])
      extra = np.zeros((bb - b, mask.shape[1]), np.int32)
      extra[:, -1] = 1
      mask = np.concatenate([mask, extra])
      done[b:] = True
    ids, mask, done = (self._shard(x) for x in (ids.astype(np.int32), mask.astype(np.int32), done))
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      cache, logits = self._prefill(params, ids, mask, max_new_tokens=sp.max_new_tokens,
                                    cache_dtype=self.cache_dtype)
      tokens, rmask, logps, steps, _ = self._decode(params, cache, logits, mask, done, key,
                                                    sp=sp, pad_id=self.pad_id)
    fields = (ids, mask, tokens, rmask, logps)
    if bb != b and pcount == 1:
      fields = tuple(x[:b] for x in fields)
    return Rollout(*fields, decode_steps=steps, host_count=b)
