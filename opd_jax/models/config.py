"""Model configuration: one frozen dataclass for the Qwen3, Qwen2/Qwen2.5 and Llama 3 decoders.

`ModelConfig.from_hf_dict` reads a Hugging Face `config.json` in both the transformers-4
form (top-level `rope_theta`, `rope_scaling`) and the transformers-5 form
(`rope_parameters`); `to_hf_dict` writes the transformers-5 form back, keeping any keys of
the original file that opd_jax does not interpret (token ids, generation defaults, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ('qwen3', 'qwen2', 'llama')
SUPPORTED_ROPE_TYPES = ('default', 'linear', 'llama3')

_ARCHITECTURES = {
    'qwen3': 'Qwen3ForCausalLM',
    'qwen2': 'Qwen2ForCausalLM',
    'llama': 'LlamaForCausalLM',
}


class ModelConfigError(ValueError):
  """A config.json that opd_jax cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters of a decoder-only LM (all families share one module).

  Family differences are flags: `qk_norm` (Qwen3's per-head RMSNorm on q and k),
  `qkv_bias` (Qwen2), `o_bias` and `mlp_bias` (Llama's `attention_bias` / `mlp_bias`).
  `rope_scaling` is a sorted tuple of (key, value) pairs so the config stays hashable
  (it is a static argument of jitted functions).
  """
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 32768
  tie_embeddings: bool = False
  qk_norm: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ModelConfigError(
          f'unsupported model_type {self.model_type!r}; opd_jax supports '
          f'{", ".join(SUPPORTED_MODEL_TYPES)}')
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
          f'num_attention_heads={self.num_heads} is not a multiple of '
          f'num_key_value_heads={self.num_kv_heads}')
    rope_type = self.rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ModelConfigError(
          f'unsupported rope type {rope_type!r}; opd_jax supports '
          f'{", ".join(SUPPORTED_ROPE_TYPES)}')

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling or ()).get('rope_type', 'default')

  @property
  def num_params(self) -> int:
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + emb + d

  # ---------------------------------------------------------------- RoPE
  def inv_freq(self) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2], float64, with the configured scaling."""
    hd = self.head_dim
    inv = 1.0 / (self.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = dict(self.rope_scaling or ())
    rope_type = self.rope_type
    if rope_type == 'linear':
      inv = inv / float(scaling['factor'])
    elif rope_type == 'llama3':
      factor = float(scaling['factor'])
      low = float(scaling['low_freq_factor'])
      high = float(scaling['high_freq_factor'])
      old_len = float(scaling['original_max_position_embeddings'])
      low_wavelen, high_wavelen = old_len / low, old_len / high
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
      smooth = (old_len / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      inv = np.where(is_medium, smoothed, scaled)
    return inv

  # ---------------------------------------------------------------- HF I/O
  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = 'config.json') -> 'ModelConfig':
    """Builds the config from a parsed HF config.json; `source` names the file in errors."""
    model_type = hf.get('model_type')
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ModelConfigError(
          f'{source}: unsupported model_type {model_type!r}; opd_jax supports '
          f'{", ".join(SUPPORTED_MODEL_TYPES)}')

    def need(key):
      if key not in hf or hf[key] is None:
        raise ModelConfigError(f'{source}: missing required field {key!r}')
      return hf[key]

    act = hf.get('hidden_act', 'silu')
    if act != 'silu':
      raise ModelConfigError(f'{source}: hidden_act={act!r} is not supported (only silu)')
    if hf.get('use_sliding_window'):
      raise ModelConfigError(
          f'{source}: use_sliding_window=true is not supported; opd_jax uses full attention '
          'in every layer')

    # transformers 5 keeps theta and scaling together in `rope_parameters`; transformers 4
    # has a top-level `rope_theta` and an optional `rope_scaling` (key 'rope_type' or 'type').
    rope = dict(hf.get('rope_parameters') or {})
    if not rope:
      rope = dict(hf.get('rope_scaling') or {})
      if 'rope_theta' in hf:
        rope['rope_theta'] = hf['rope_theta']
    if 'type' in rope and 'rope_type' not in rope:
      rope['rope_type'] = rope.pop('type')
    rope.pop('type', None)
    theta = float(rope.pop('rope_theta', hf.get('rope_theta', 10000.0)))
    rope.setdefault('rope_type', 'default')
    if rope['rope_type'] not in SUPPORTED_ROPE_TYPES:
      raise ModelConfigError(
          f'{source}: unsupported rope type {rope["rope_type"]!r}; opd_jax supports '
          f'{", ".join(SUPPORTED_ROPE_TYPES)}')
    rope_scaling = None
    if rope['rope_type'] != 'default':
      rope_scaling = tuple(sorted((k, v) for k, v in rope.items()
                                  if not isinstance(v, (list, dict))))

    num_heads = need('num_attention_heads')
    hidden = need('hidden_size')
    attention_bias = bool(hf.get('attention_bias', False))
    return cls(
        model_type=model_type,
        vocab_size=need('vocab_size'),
        hidden_size=hidden,
        intermediate_size=need('intermediate_size'),
        num_layers=need('num_hidden_layers'),
        num_heads=num_heads,
        num_kv_heads=hf.get('num_key_value_heads') or num_heads,
        head_dim=hf.get('head_dim') or hidden // num_heads,
        rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(hf.get('max_position_embeddings', 32768)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        qk_norm=model_type == 'qwen3',
        # Qwen2 always has q/k/v bias and no o bias; Qwen3/Llama follow `attention_bias`.
        qkv_bias=True if model_type == 'qwen2' else attention_bias,
        o_bias=False if model_type == 'qwen2' else attention_bias,
        mlp_bias=bool(hf.get('mlp_bias', False)) if model_type == 'llama' else False,
    )

  def to_hf_dict(self, base: dict[str, Any] | None = None, dtype: str = 'float32') -> dict:
    """The transformers-5 config.json for this architecture, on top of `base`'s other keys."""
    hf = dict(base or {})
    for legacy in ('rope_scaling', 'rope_theta', 'torch_dtype'):
      hf.pop(legacy, None)
    rope = {'rope_theta': self.rope_theta, 'rope_type': 'default'}
    rope.update(dict(self.rope_scaling or ()))
    hf.update(
        architectures=[_ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_embeddings,
        hidden_act='silu',
        dtype=dtype,
    )
    if self.model_type == 'llama':
      hf.update(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
    elif self.model_type == 'qwen3':
      hf.update(attention_bias=self.o_bias)
    if self.model_type in ('qwen2', 'qwen3'):
      hf.setdefault('use_sliding_window', False)
      hf.setdefault('layer_types', ['full_attention'] * self.num_layers)
      hf['layer_types'] = ['full_attention'] * self.num_layers
    return hf


def read_hf_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads `path/config.json`; returns (ModelConfig, the raw dict)."""
  import os
  fname = os.path.join(path, 'config.json')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'model directory {path!r} does not exist')
  if not os.path.exists(fname):
    raise FileNotFoundError(
        f'{fname} not found: a Hugging Face model directory needs a config.json')
  with open(fname) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ModelConfigError(f'{fname}: invalid JSON ({e})') from e
  return ModelConfig.from_hf_dict(hf, source=fname), hf
