"""Decoder-only LMs (Qwen3, Qwen2/Qwen2.5, Llama 3) in Flax NNX, with HF checkpoint I/O."""

from opd_jax.models.config import (SUPPORTED_MODEL_TYPES, ModelConfig, ModelConfigError,
                                   read_hf_config)
from opd_jax.models.decoder import Decoder, default_positions, init_cache
from opd_jax.models.hf_io import (CheckpointError, create_model, load_pretrained,
                                  save_pretrained)

__all__ = [
    'SUPPORTED_MODEL_TYPES', 'ModelConfig', 'ModelConfigError', 'read_hf_config', 'Decoder',
    'default_positions', 'init_cache', 'CheckpointError', 'create_model', 'load_pretrained',
    'save_pretrained',
]
