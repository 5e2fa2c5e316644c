"""The decoder against transformers' own PyTorch implementation, checkpoint I/O and errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _util import rewrite_config, torch_logits
from conftest import FAMILIES
from opd_jax.models import (CheckpointError, ModelConfigError, load_pretrained,
                            read_hf_config, save_pretrained)

RNG = np.random.RandomState(0)
IDS = RNG.randint(0, 128, size=(3, 40)).astype(np.int32)
RIGHT_PAD = np.ones_like(IDS)
RIGHT_PAD[1, 25:] = 0
RIGHT_PAD[2, 7:] = 0


def _max_diff_on_real_tokens(a, b, mask):
  return float(np.abs(a - b)[np.asarray(mask).astype(bool)].max())


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers(hf_checkpoints, family):
  path = hf_checkpoints[family]
  ref = torch_logits(path, IDS, RIGHT_PAD)
  model = load_pretrained(path)
  out = np.asarray(model(jnp.asarray(IDS), jnp.asarray(RIGHT_PAD)))
  assert out.dtype == np.float32 and out.shape == (3, 40, 128)
  diff = _max_diff_on_real_tokens(out, ref, RIGHT_PAD)
  print(f'{family}: max |logits - transformers| = {diff:.2e} (scale {np.abs(ref).max():.1f})')
  assert diff <= 1e-4


@pytest.mark.parametrize('family', FAMILIES)
def test_right_and_left_padding_match_unpadded(hf_checkpoints, family):
  model = load_pretrained(hf_checkpoints[family])
  n = 25
  alone = np.asarray(model(jnp.asarray(IDS[1:2, :n])))[0]
  right = np.asarray(model(jnp.asarray(IDS), jnp.asarray(RIGHT_PAD)))[1, :n]
  left_ids = np.concatenate([np.zeros((1, 40 - n), np.int32), IDS[1:2, :n]], axis=1)
  left_mask = (np.arange(40) >= 40 - n).astype(np.int32)[None]
  left = np.asarray(model(jnp.asarray(left_ids), jnp.asarray(left_mask)))[0, 40 - n:]
  assert np.abs(right - alone).max() <= 1e-5
  assert np.abs(left - alone).max() <= 1e-5


@pytest.mark.parametrize('family', FAMILIES)
def test_query_blocked_attention_matches_transformers_and_unblocked_gradients(
    hf_checkpoints, family, monkeypatch):
  """Long sequences attend in query blocks (decoder.QUERY_BLOCK); with blocks of 8 positions
  the 40-token batch (padded to 48) runs 6 blocks: the same logits as transformers and the
  same gradients as one block."""
  from flax import nnx
  from opd_jax.models import decoder
  path = hf_checkpoints[family]
  ids = np.pad(IDS, [(0, 0), (0, 8)])
  mask = np.pad(RIGHT_PAD, [(0, 0), (0, 8)])
  ref = torch_logits(path, IDS, RIGHT_PAD)
  model = load_pretrained(path)
  graphdef, params = nnx.split(model)

  def loss(p):
    logits = nnx.merge(graphdef, p)(jnp.asarray(ids), jnp.asarray(mask))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

  want, want_logits = jax.grad(loss, has_aux=True)(params)
  monkeypatch.setattr(decoder, 'QUERY_BLOCK', 8)
  jaxpr = str(jax.make_jaxpr(loss)(params))
  assert 'checkpoint' in jaxpr or 'remat' in jaxpr  # the blocked path was traced
  got, logits = jax.grad(loss, has_aux=True)(params)
  assert _max_diff_on_real_tokens(np.asarray(logits)[:, :40], ref, RIGHT_PAD) <= 1e-4
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # fp32 summation order only
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-7, np.abs(a - b).max()


def test_llama3_rope_scaling_is_applied(hf_checkpoints):
  cfg, _ = read_hf_config(hf_checkpoints['llama'])
  assert cfg.rope_type == 'llama3'
  base = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
  assert not np.allclose(cfg.inv_freq(), base)  # low frequencies are divided by the factor


@pytest.mark.parametrize('family', FAMILIES)
def test_transformers4_config_form(hf_checkpoints, tmp_path, family):
  """Top-level rope_theta / rope_scaling (transformers 4) loads to the same logits."""
  path = str(tmp_path / family)
  shutil.copytree(hf_checkpoints[family], path)

  def to_v4(cfg):
    rope = cfg.pop('rope_parameters')
    cfg['rope_theta'] = rope.pop('rope_theta')
    rope_type = rope.pop('rope_type')
    cfg['rope_scaling'] = None if rope_type == 'default' else dict(type=rope_type, **rope)
    cfg['torch_dtype'] = cfg.pop('dtype')
  rewrite_config(path, to_v4)
  v4 = np.asarray(load_pretrained(path)(jnp.asarray(IDS)))
  v5 = np.asarray(load_pretrained(hf_checkpoints[family])(jnp.asarray(IDS)))
  np.testing.assert_array_equal(v4, v5)


def test_sharded_safetensors_index(hf_checkpoints, tmp_path):
  import transformers
  src = hf_checkpoints['qwen2']
  model = transformers.AutoModelForCausalLM.from_pretrained(src)
  model.save_pretrained(str(tmp_path), max_shard_size='40KB')
  assert os.path.exists(tmp_path / 'model.safetensors.index.json')
  assert len([f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]) > 1
  a = np.asarray(load_pretrained(str(tmp_path))(jnp.asarray(IDS)))
  b = np.asarray(load_pretrained(src)(jnp.asarray(IDS)))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('family', FAMILIES)
def test_save_pretrained_round_trip(hf_checkpoints, tmp_path, family):
  src = hf_checkpoints[family]
  out = str(tmp_path / 'export')
  save_pretrained(load_pretrained(src), out)
  ref = torch_logits(src, IDS, RIGHT_PAD)
  again = torch_logits(out, IDS, RIGHT_PAD)  # transformers loads what opd_jax wrote
  assert _max_diff_on_real_tokens(again, ref, RIGHT_PAD) <= 1e-5
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['model_type'] == family


def test_save_pretrained_sharded_and_bf16(hf_checkpoints, tmp_path):
  src = hf_checkpoints['llama']
  model = load_pretrained(src)
  save_pretrained(model, str(tmp_path / 'sharded'), max_shard_bytes=50_000)
  assert os.path.exists(tmp_path / 'sharded' / 'model.safetensors.index.json')
  back = load_pretrained(str(tmp_path / 'sharded'))
  np.testing.assert_array_equal(np.asarray(back(jnp.asarray(IDS))),
                                np.asarray(model(jnp.asarray(IDS))))
  save_pretrained(model, str(tmp_path / 'bf16'), dtype=jnp.bfloat16)
  ref = torch_logits(src, IDS)
  bf16 = torch_logits(str(tmp_path / 'bf16'), IDS)
  assert np.abs(bf16 - ref).max() < 0.05 * np.abs(ref).max()


def test_bf16_model_is_close_to_fp32(hf_checkpoints):
  path = hf_checkpoints['qwen3']
  f32 = np.asarray(load_pretrained(path)(jnp.asarray(IDS)))
  model = load_pretrained(path, dtype=jnp.bfloat16)
  assert model.embed_tokens.weight[...].dtype == jnp.bfloat16
  b16 = np.asarray(model(jnp.asarray(IDS)))
  assert b16.dtype == np.float32
  rel = np.abs(b16 - f32).max() / np.abs(f32).max()
  assert rel < 0.05, rel


# ------------------------------------------------------------------------------ errors
def test_missing_config_json(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_pretrained(str(tmp_path))


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    load_pretrained(str(tmp_path / 'nope'))


def test_unsupported_model_type(hf_checkpoints, tmp_path):
  path = str(tmp_path / 'm')
  shutil.copytree(hf_checkpoints['qwen3'], path)
  rewrite_config(path, lambda c: c.update(model_type='mixtral'))
  with pytest.raises(ModelConfigError, match=r"'mixtral'.*qwen3, qwen2, llama"):
    load_pretrained(path)


def test_unsupported_rope_type(hf_checkpoints, tmp_path):
  path = str(tmp_path / 'm')
  shutil.copytree(hf_checkpoints['qwen3'], path)
  rewrite_config(path, lambda c: c.update(rope_parameters=dict(rope_type='yarn', factor=4.0,
                                                               rope_theta=1e4)))
  with pytest.raises(ModelConfigError, match="rope type 'yarn'"):
    load_pretrained(path)


def _edit_tensors(src, dst, fn):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(dst, 'model.safetensors'))
  fn(tensors)
  save_file(tensors, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
  name = 'model.layers.1.self_attn.k_proj.weight'
  _edit_tensors(hf_checkpoints['qwen2'], str(tmp_path / 'm'), lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=name.replace('.', r'\.') + '.*missing'):
    load_pretrained(str(tmp_path / 'm'))


def test_missing_lm_head_when_untied_is_named(hf_checkpoints, tmp_path):
  _edit_tensors(hf_checkpoints['llama'], str(tmp_path / 'm'), lambda t: t.pop('lm_head.weight'))
  with pytest.raises(CheckpointError, match='lm_head.weight'):
    load_pretrained(str(tmp_path / 'm'))


def test_misshaped_tensor_is_named(hf_checkpoints, tmp_path):
  name = 'model.layers.0.mlp.up_proj.weight'

  def shrink(t):
    t[name] = t[name][:-1]
  _edit_tensors(hf_checkpoints['qwen3'], str(tmp_path / 'm'), shrink)
  with pytest.raises(CheckpointError, match=name.replace('.', r'\.') + r'.*\(159, 64\).*\(160, 64\)'):
    load_pretrained(str(tmp_path / 'm'))


def test_no_weights_file(hf_checkpoints, tmp_path):
  path = tmp_path / 'm'
  path.mkdir()
  shutil.copy(os.path.join(hf_checkpoints['qwen3'], 'config.json'), path)
  with pytest.raises(FileNotFoundError, match='safetensors'):
    load_pretrained(str(path))


def test_tokenizer_and_chat_template_from_same_directory(tiny_qwen3):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tiny_qwen3)
  text = tok.apply_chat_template([{'role': 'user', 'content': '2+2'}], tokenize=False,
                                 add_generation_prompt=True)
  assert text.endswith('<|im_start|>assistant\n')
  model = load_pretrained(tiny_qwen3)
  assert model.cfg.vocab_size == len(tok)
  assert jax.tree.leaves(model(jnp.asarray([tok(text)['input_ids']])))[0].shape[-1] == len(tok)
