"""Architecture presets: the public Hugging Face `config.json` values of common checkpoints.

The recipes in configs/ name checkpoints such as `/ckpt/Qwen3-1.7B` that exist only on the
machine that trains. Tools that need the architecture but no weights (`opd_jax.tools.aot`, the
ahead-of-time compile and memory check) fall back to the preset whose name is the missing
path's basename, so a recipe can be sized before its checkpoints are copied anywhere.

Only fields that opd_jax reads (plus the token ids) are kept; the values are those of the
models' config.json on the hub (Qwen/Qwen3-*, meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B).
A `-Base` or `-Instruct` suffix has the same architecture and matches the same preset.
"""

from __future__ import annotations

import os
from typing import Any

from opd_jax.models.config import ModelConfig


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, *, tied: bool) -> dict:
  return dict(architectures=['Qwen3ForCausalLM'], model_type='qwen3', vocab_size=151936,
              hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=tied, attention_bias=False, hidden_act='silu',
              use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
              torch_dtype='bfloat16')


PRESETS: dict[str, dict[str, Any]] = {
    'Qwen3-0.6B': _qwen3(1024, 3072, 28, 16, tied=True),
    'Qwen3-1.7B': _qwen3(2048, 6144, 28, 16, tied=True),
    'Qwen3-4B': _qwen3(2560, 9728, 36, 32, tied=True),
    'Qwen3-8B': _qwen3(4096, 12288, 36, 32, tied=False),
    'Qwen3-14B': _qwen3(5120, 17408, 40, 40, tied=False),
    'Qwen3-32B': _qwen3(5120, 25600, 64, 64, tied=False),
    'Llama-3.1-8B': dict(
        architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(
            rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        hidden_act='silu', bos_token_id=128000, eos_token_id=128001, torch_dtype='bfloat16'),
    'Qwen2.5-7B': dict(
        architectures=['Qwen2ForCausalLM'], model_type='qwen2', vocab_size=152064,
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, hidden_act='silu', bos_token_id=151643,
        eos_token_id=151643, torch_dtype='bfloat16'),
}

_SUFFIXES = ('-Base', '-Instruct')


def preset_name(path: str | None) -> str | None:
  """The preset matching `path`'s basename (e.g. '/ckpt/Qwen3-8B-Base' -> 'Qwen3-8B')."""
  if not path:
    return None
  base = os.path.basename(os.path.normpath(path))
  for suffix in _SUFFIXES:
    if base.endswith(suffix):
      base = base[:-len(suffix)]
  lowered = {k.lower(): k for k in PRESETS}
  return lowered.get(base.lower())


def preset_config(name: str) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, config.json dict) of a preset, as `read_hf_config` returns for a directory."""
  if name not in PRESETS:
    raise KeyError(f'no architecture preset {name!r}; known: {", ".join(PRESETS)}')
  hf = dict(PRESETS[name])
  return ModelConfig.from_hf_dict(hf, source=f'preset {name}'), hf
