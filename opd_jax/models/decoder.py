"""Flax NNX causal decoder for the Qwen3, Qwen2/Qwen2.5 and Llama 3 families.

Dimension legend (used in names and einsum strings):
  B batch, T query positions, S key positions (cache slots), D hidden, F MLP hidden,
  H query heads, Hk key/value heads, Hr = H // Hk (queries per kv head), E head dim,
  V vocabulary, L layers.

Parameters carry Hugging Face's names and layouts (`weight` of a linear layer is
[out, in]), so checkpoint I/O is a rename-free copy and sharding rules read like HF paths.
The L decoder layers are one vmapped `Block` with stacked parameters ([L, ...] leading
axis), run with `lax.scan`, so compile time does not grow with depth.

The KV cache is a dict of two lists of L arrays [B, Hk, S, E], one per layer. A cached call
writes the new keys and values at slots [start, start + T) and lets query t attend to slots
<= start + t whose `kv_mask` is set; slot order is time order (the sampler left-pads
prompts). Heads come before slots so that a device's shard keeps (S, E) as its two minor
dimensions whatever the heads' split: with [B, S, Hk, E] and one kv head per device (the
tensor-parallel rollout layout), XLA:TPU lays the decode loop's cache out differently from
its argument and copies the whole cache on entry (docs/design.md §5).

LoRA (`LoraSpec`, docs/design.md §9): a `Decoder(..., lora=spec)` gives each targeted
projection an `nnx.LoRA` adapter (float32 `lora_a` [in, r], `lora_b` [r, out], variables of
type `nnx.LoRAParam`) applied in the forward: y = x W^T + (alpha / r) (x a) b. A model
without `lora` has exactly the plain parameter tree.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.models.config import ModelConfig
from opd_jax.sharding import BATCH_AXES, constrain

_NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row stays NaN-free


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections get a LoRA adapter and its size (hashable: part of the graph).

  `targets` is a regex matched in full against a projection's weight path, such as
  `layers/self_attn/q_proj/weight`; `scale` is alpha / rank as in PEFT."""
  rank: int
  alpha: float
  targets: str

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def applies(self, weight_path: str) -> bool:
    return self.rank > 0 and re.fullmatch(self.targets, weight_path) is not None


def _linear(x, params):
  """x @ weight.T (+ bias) for a {'weight' [out, in], 'bias' [out] or None} dict."""
  y = jnp.einsum('...i,oi->...o', x, params['weight'])
  return y if params.get('bias') is None else y + params['bias']


class Linear(nnx.Module):
  """y = x @ weight.T (+ bias); weight [out, in] as in torch.nn.Linear."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs,
               lora: LoraSpec | None = None, path: str = ''):
    self.weight = nnx.Param(_normal(rngs, (d_out, d_in), dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
    # An adapter when `lora` targets this weight's path: nnx.LoRA's lora_a starts random,
    # lora_b at zero, so the adapted model starts as the base model.
    use = lora is not None and lora.applies(f'{path}/weight')
    self.lora = nnx.LoRA(d_in, lora.rank, d_out, rngs=rngs) if use else None
    self.lora_scale = lora.scale if use else 0.0

  def __call__(self, x):
    y = jnp.einsum('...i,oi->...o', x, self.weight[...])
    if self.bias is not None:
      y = y + self.bias[...]
    if self.lora is not None:
      y = y + (self.lora_scale * self.lora(x)).astype(y.dtype)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, scaled after casting back (as transformers does)."""

  def __init__(self, dim: int, eps: float, *, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * x32.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions_BxT):
  """cos, sin [B, T, E] float32 for integer positions (rotate-half convention)."""
  inv_freq = jnp.asarray(cfg.inv_freq(), jnp.float32)
  freqs_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxHxE, cos_BxTxE, sin_BxTxE):
  half = x_BxTxHxE.shape[-1] // 2
  x32 = x_BxTxHxE.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos_BxTxE[:, :, None, :] + rotated * sin_BxTxE[:, :, None, :]
  return out.astype(x_BxTxHxE.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, lora: LoraSpec | None = None):
    d, e = cfg.hidden_size, cfg.head_dim
    self.cfg = cfg
    kw = dict(dtype=dtype, rngs=rngs, lora=lora)
    p = 'layers/self_attn/'
    self.q_proj = Linear(d, cfg.num_heads * e, bias=cfg.qkv_bias, path=p + 'q_proj', **kw)
    self.k_proj = Linear(d, cfg.num_kv_heads * e, bias=cfg.qkv_bias, path=p + 'k_proj', **kw)
    self.v_proj = Linear(d, cfg.num_kv_heads * e, bias=cfg.qkv_bias, path=p + 'v_proj', **kw)
    self.o_proj = Linear(cfg.num_heads * e, d, bias=cfg.o_bias, path=p + 'o_proj', **kw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, cfg.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(e, cfg.rms_norm_eps, dtype=dtype)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x_BxTxD, cos, sin, *, kv_mask_BxS, q_slot_T, cache_kv=None,
               start=None, fused_qkv=None):
    """Returns (out [B, T, D], the updated (k, v) cache arrays [B, Hk, S, E]), or without a
    cache (out, this call's new (k, v) [B, T, Hk, E]).

    `fused_qkv` (a Linear-like dict from Decoder.split_layers) computes q, k and v with one
    matmul instead of three (the sampler's decode step, where each call's fixed cost counts).
    """
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    k_heads, e = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    if fused_qkv is not None:
      qkv = _linear(x_BxTxD, fused_qkv)
      nq, nk = cfg.num_heads * e, k_heads * e
      q = qkv[..., :nq].reshape(b, t, cfg.num_heads, e)
      k = qkv[..., nq:nq + nk].reshape(b, t, k_heads, e)
      v = qkv[..., nq + nk:].reshape(b, t, k_heads, e)
    else:
      q = self.q_proj(x_BxTxD).reshape(b, t, cfg.num_heads, e)
      k = self.k_proj(x_BxTxD).reshape(b, t, k_heads, e)
      v = self.v_proj(x_BxTxD).reshape(b, t, k_heads, e)
    q, k, v = (constrain(y, BATCH_AXES, None, 'tensor', None) for y in (q, k, v))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    if cache_kv is not None:
      # Write this chunk at slots [start, start + T) of this layer's cache arrays in place,
      # then attend to the whole (static-length) cache, read back in the compute dtype.
      cache_k, cache_v = cache_kv
      idx = (0, 0, start, 0)
      cache_k = jax.lax.dynamic_update_slice(
          cache_k, jnp.swapaxes(k, 1, 2).astype(cache_k.dtype), idx)
      cache_v = jax.lax.dynamic_update_slice(
          cache_v, jnp.swapaxes(v, 1, 2).astype(cache_v.dtype), idx)
      cache_kv = (cache_k, cache_v)
      k = jnp.swapaxes(cache_k, 1, 2).astype(q.dtype)  # [B, S, Hk, E] views for _attend
      v = jnp.swapaxes(cache_v, 1, 2).astype(q.dtype)
    s = k.shape[1]

    q_BxTxHkxHrxE = q.reshape(b, t, k_heads, g, e)
    if t == 1 and jax.default_backend() == 'cpu':
      out = _attend_one_token(q_BxTxHkxHrxE, k, v, kv_mask_BxS, q_slot_T)
    elif t > QUERY_BLOCK and t % QUERY_BLOCK == 0:
      out = _attend_blocked(q_BxTxHkxHrxE, k, v, kv_mask_BxS, q_slot_T, QUERY_BLOCK)
    else:
      out = _attend(q_BxTxHkxHrxE, k, v, kv_mask_BxS, q_slot_T)
    # Without a cache, the new keys and values (a prefill collects them for its cache).
    return self.o_proj(out.reshape(b, t, cfg.num_heads * e)), (
        cache_kv if cache_kv is not None else (k, v))


# Query positions per attention block: a call with more queries (a long scoring, update or
# prefill sequence) attends block by block, so the fp32 scores take [B, H, QUERY_BLOCK, S]
# instead of [B, H, T, S] (for 5k tokens, 10x less); each block is rematerialised in the
# backward pass instead of storing its probabilities.
QUERY_BLOCK = 512


def _attend(q_BxTxHkxHrxE, k_BxSxHkxE, v_BxSxHkxE, kv_mask_BxS, q_slot_T):
  """Causal grouped-query attention: [B, T, Hk, Hr, E] (query t sees slots <= q_slot_T[t])."""
  e = q_BxTxHkxHrxE.shape[-1]
  s = k_BxSxHkxE.shape[1]
  scores = jnp.einsum('bthre,bshe->bhrts', q_BxTxHkxHrxE, k_BxSxHkxE,
                      preferred_element_type=jnp.float32) * (e ** -0.5)
  allowed_BxTxS = ((jnp.arange(s)[None, None, :] <= q_slot_T[None, :, None])
                   & kv_mask_BxS[:, None, :].astype(bool))
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxHkxE.dtype)
  return jnp.einsum('bhrts,bshe->bthre', probs, v_BxSxHkxE)


def _attend_blocked(q_BxTxHkxHrxE, k_BxSxHkxE, v_BxSxHkxE, kv_mask_BxS, q_slot_T, block):
  """`_attend` over query blocks of `block` positions (lax.map; each block rematerialised)."""
  b, t = q_BxTxHkxHrxE.shape[:2]
  n = t // block
  q_WxBxCxHkxHrxE = jnp.moveaxis(q_BxTxHkxHrxE.reshape(b, n, block, *q_BxTxHkxHrxE.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(xs):
    q_BxCxHkxHrxE, slot_C = xs
    return _attend(q_BxCxHkxHrxE, k_BxSxHkxE, v_BxSxHkxE, kv_mask_BxS, slot_C)

  out_WxBxCxHkxHrxE = jax.lax.map(one, (q_WxBxCxHkxHrxE, q_slot_T.reshape(n, block)))
  return jnp.moveaxis(out_WxBxCxHkxHrxE, 0, 1).reshape(q_BxTxHkxHrxE.shape)


def _attend_one_token(q_Bx1xHkxHrxE, k_BxSxHkxE, v_BxSxHkxE, kv_mask_BxS, q_slot_T):
  """`_attend` for one query token on XLA:CPU: a batched dot is a library call with ~0.1 ms
  of fixed cost (and a transposed copy of the cache); a multiply-reduce fuses into one loop."""
  e = q_Bx1xHkxHrxE.shape[-1]
  s = k_BxSxHkxE.shape[1]
  scores_BxSxHkxHr = jnp.sum(q_Bx1xHkxHrxE[:, 0, None].astype(jnp.float32)
                           * k_BxSxHkxE[:, :, :, None].astype(jnp.float32), axis=-1) * (e ** -0.5)
  allowed_BxS = (jnp.arange(s)[None, :] <= q_slot_T[0]) & kv_mask_BxS.astype(bool)
  scores_BxSxHkxHr = jnp.where(allowed_BxS[:, :, None, None], scores_BxSxHkxHr, _NEG_INF)
  probs = jax.nn.softmax(scores_BxSxHkxHr, axis=1).astype(v_BxSxHkxE.dtype)
  out_BxHkxHrxE = jnp.sum(probs[..., None] * v_BxSxHkxE[:, :, :, None], axis=1)
  return out_BxHkxHrxE[:, None]


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, lora: LoraSpec | None = None):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, lora=lora)
    self.gate_proj = Linear(d, f, path='layers/mlp/gate_proj', **kw)
    self.up_proj = Linear(d, f, path='layers/mlp/up_proj', **kw)
    self.down_proj = Linear(f, d, path='layers/mlp/down_proj', **kw)

  def __call__(self, x, fused_gate_up=None):
    if fused_gate_up is not None:
      gate, up = jnp.split(_linear(x, fused_gate_up), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    # Rows stay on the batch axes (FSDP gathers the weights); without this XLA may gather
    # the activations instead and compute the MLP on every row on every device.
    h = constrain(jax.nn.silu(gate) * up, BATCH_AXES, None, 'tensor')
    return self.down_proj(h)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, lora: LoraSpec | None = None):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, lora=lora)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, lora=lora)

  def __call__(self, x, cos, sin, fused=None, **attn_kw):
    fused = fused or {}
    h, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin,
                                 fused_qkv=fused.get('qkv'), **attn_kw)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), fused_gate_up=fused.get('gate_up'))
    return x, cache_kv


class Embedding(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.weight = nnx.Param(_normal(rngs, (vocab, dim), dtype))

  def __call__(self, ids):
    return jnp.take(self.weight[...], ids, axis=0)


def default_positions(attention_mask_BxT):
  """Position of each token among the real tokens of its row (left or right padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
  """A decoder-only causal LM. `model(input_ids, attention_mask=None, positions=None)`
  returns float32 logits [B, T, V]. With `lora` (a LoraSpec), the targeted projections of
  the layers carry adapters applied in the forward (see the module docstring)."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
               hf_config: dict | None = None, lora: LoraSpec | None = None):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.lora = lora
    # The source config.json (token ids, generation defaults, ...), kept as a string so it
    # stays static module metadata; save_pretrained writes it back.
    self._hf_config_json = json.dumps(hf_config or {}, sort_keys=True)
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return Block(cfg, dtype=dtype, rngs=rngs, lora=lora)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs))

  @property
  def hf_config(self) -> dict:
    return json.loads(self._hf_config_json)

  # ------------------------------------------------------------------ forward
  def split_layers(self, fuse: bool = False):
    """Per-layer (state, fused weights) pairs for `hidden(unrolled=...)`.

    Taking slices once, outside a decode loop, spares the loop a dynamic slice (a copy) of
    every layer's weights per generated token, which `lax.scan` over stacked layers does.
    With `fuse`, q/k/v and gate/up weights are also concatenated so that each needs one
    matmul (fewer, larger calls); only sensible when 'tensor' does not split those outputs.
    """
    _, layer_state = nnx.split(self.layers)
    if fuse and self.lora is not None:
      raise ValueError('fused decode weights ignore LoRA adapters: sample with the merged '
                       'plain model (opd_jax.models.lora.merge_params)')
    out = []
    for i in range(self.cfg.num_layers):
      state = jax.tree.map(lambda x, i=i: x[i], layer_state)
      fused = None
      if fuse:
        attn, mlp = state['self_attn'], state['mlp']

        def cat(mods, part, tree):
          if tree[mods[0]].get(part) is None:
            return None
          return jnp.concatenate([tree[m][part][...] for m in mods], axis=0)
        qkv = ('q_proj', 'k_proj', 'v_proj')
        gate_up = ('gate_proj', 'up_proj')
        fused = {'qkv': {'weight': cat(qkv, 'weight', attn), 'bias': cat(qkv, 'bias', attn)},
                 'gate_up': {'weight': cat(gate_up, 'weight', mlp),
                             'bias': cat(gate_up, 'bias', mlp)}}
      out.append((state, fused))
    return out

  def hidden(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, *,
             cache=None, kv_mask_BxS=None, start=0, remat=False, unrolled=None):
    """Final-norm hidden states [B, T, D] (model dtype) and the updated cache.

    Without a cache, `attention_mask` [B, T] marks real tokens (left or right padding).
    With a cache (`init_cache`: dict k, v of L arrays [B, Hk, S, E]), the tokens occupy slots
    [start, start + T) and `kv_mask_BxS` marks the valid slots (including the ones being
    written). `unrolled` (from `split_layers()`) runs the layers as a Python loop over those
    per-layer parameters instead of a scan (compile time grows with L); a cached call needs
    it, except the prefill (start=0): that runs the T tokens uncached through the scan
    (compile time independent of depth), collects each layer's keys and values
    ([L, B, T, Hk, E], T slots only) and writes them into the layers' cache arrays.
    """
    b, t = input_ids_BxT.shape
    if cache is None:
      if attention_mask_BxT is None:
        attention_mask_BxT = jnp.ones((b, t), jnp.int32)
      kv_mask_BxS = attention_mask_BxT
      start = 0
    elif kv_mask_BxS is None:
      raise ValueError('a cached call needs kv_mask_BxS')
    if positions_BxT is None:
      positions_BxT = (default_positions(attention_mask_BxT) if attention_mask_BxT is not None
                       else jnp.broadcast_to(jnp.arange(t) + start, (b, t)))
    cos, sin = rope_cos_sin(self.cfg, positions_BxT)
    q_slot_T = jnp.arange(t) + start

    x = constrain(self.embed_tokens(input_ids_BxT.astype(jnp.int32)), BATCH_AXES)
    layer_def, layer_state = nnx.split(self.layers)

    collect = cache is not None and unrolled is None  # the prefill, see above
    if collect:
      if not (isinstance(start, int) and start == 0):
        raise ValueError('a cached call with stacked layers is only for a prefill (start=0); '
                         'decode steps need unrolled layers (split_layers())')
      kv_mask_BxS = kv_mask_BxS[:, :t]

    def body(carry, state, fused=None):
      x, cache_kv = carry
      block = nnx.merge(layer_def, state)
      x, kv = block(x, cos, sin, fused=fused, kv_mask_BxS=kv_mask_BxS,
                    q_slot_T=q_slot_T, cache_kv=cache_kv, start=start)
      x = constrain(x, BATCH_AXES)
      if cache_kv is None:  # uncached: kv are this layer's new keys and values
        return (x, None), (kv if collect else None)
      return (x, kv), None

    if remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    if unrolled is None:
      (x, _), new_kv = jax.lax.scan(body, (x, None), layer_state)
      if not collect:
        return self.norm(x), None
      new_cache = {name: [jax.lax.dynamic_update_slice(
          c, jnp.swapaxes(new[i], 1, 2).astype(c.dtype), (0, 0, 0, 0))
                          for i, c in enumerate(cache[name])]
                   for name, new in zip(('k', 'v'), new_kv)}
      return self.norm(x), new_cache
    if cache is None:
      for state, fused in unrolled:
        (x, _), _ = body((x, None), state, fused)
      return self.norm(x), None
    # Each layer updates its own cache arrays in place (no slicing of a stacked cache).
    ks, vs = list(cache['k']), list(cache['v'])
    for i, (state, fused) in enumerate(unrolled):
      (x, (ks[i], vs[i])), _ = body((x, (ks[i], vs[i])), state, fused)
    return self.norm(x), {'k': ks, 'v': vs}

  def unembed_weight(self):
    """The output projection [V, D] (the embedding when tied)."""
    return self.embed_tokens.weight[...] if self.lm_head is None else self.lm_head.weight[...]

  def logits(self, hidden_BxTxD):
    """Float32 logits [B, T, V] of final hidden states (accumulated in float32)."""
    logits = jnp.einsum('btd,vd->btv', hidden_BxTxD, self.unembed_weight(),
                        preferred_element_type=jnp.float32)
    return constrain(logits, BATCH_AXES, None, 'tensor')

  def __call__(self, input_ids, attention_mask=None, positions=None):
    h, _ = self.hidden(input_ids, attention_mask, positions)
    return self.logits(h)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32):
  """An empty KV cache {k, v}: lists of L arrays [B, Hk, S, E], one per layer, so each layer's
  arrays are updated in place (a stacked [L, ...] cache costs a copy of the layer's slice
  per call on XLA:CPU)."""
  shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
  return {n: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for n in ('k', 'v')}
