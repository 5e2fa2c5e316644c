"""Shared fixtures. Eight fake CPU devices are configured before JAX is imported so that
sharding tests can build real meshes; single-device tests simply use device 0."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Many tests run the real trainer on the same tiny models: JAX's persistent compilation
# cache lets every run after the first reuse the compiled steps (it is keyed on the HLO, the
# JAX version and the devices, so a stale entry cannot be picked up). Subprocesses inherit it.
_CACHE_ROOT = os.path.join(tempfile.gettempdir(), f'opd_jax_tests_{os.getuid()}')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_CACHE_ROOT, 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# tiny:... model specs are built once per session here, not in the user's ~/.cache.
os.environ.setdefault('OPD_JAX_CACHE', tempfile.mkdtemp(prefix='opd_jax_tiny_'))

import sys  # noqa: E402

# tests/ mirrors the package (tests/rollout/, tests/teachers/, ...) and test modules import
# helpers from one another by module name (`from test_remote import ServerProcess`): every
# folder is importable whichever file pytest collects first.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _d in sorted(os.listdir(_TESTS)):
  if os.path.isdir(os.path.join(_TESTS, _d)) and _d not in ('reference', '__pycache__') \
      and not _d.startswith('.') and os.path.join(_TESTS, _d) not in sys.path:
    sys.path.append(os.path.join(_TESTS, _d))

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FAMILIES = ('qwen3', 'qwen2', 'llama')


def _hf_tiny(path, family, *, seed=0):
  """A random tiny checkpoint written by transformers itself (the independent reference).

  Weights use std 0.2 and non-unit norm scales so that logits are far from trivial.
  """
  import torch
  import transformers

  common = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                initializer_range=0.2, max_position_embeddings=512)
  if family == 'qwen3':
    cfg = transformers.Qwen3Config(tie_word_embeddings=True, **common)
    cls = transformers.Qwen3ForCausalLM
  elif family == 'qwen2':
    cfg = transformers.Qwen2Config(tie_word_embeddings=False, **common)
    cls = transformers.Qwen2ForCausalLM
  elif family == 'llama':
    cfg = transformers.LlamaConfig(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16),
        **common)
    cls = transformers.LlamaForCausalLM
  else:
    raise ValueError(family)
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') or 'layernorm' in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith('.bias'):
        p.copy_(0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  return path


@pytest.fixture(scope='session')
def hf_checkpoints(tmp_path_factory):
  """{family: directory} of tiny random checkpoints written by transformers."""
  root = tmp_path_factory.mktemp('hf_ckpt')
  return {f: _hf_tiny(str(root / f), f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope='session')
def tiny_qwen3(tmp_path_factory):
  """A tiny Qwen3 checkpoint with a char-level ChatML tokenizer, written by opd_jax."""
  from opd_jax.models.tiny import make_tiny_checkpoint
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp('tiny') / 'qwen3'), seed=0)
