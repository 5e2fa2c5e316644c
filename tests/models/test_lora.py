"""LoRA students (opd_jax/models/lora.py, docs/design.md §9): the adapted forward equals the merged
weights, the PEFT export loads with the `peft` package on the transformers model and gives
the same logits, the update trains and holds only the adapters, and bad settings name the
field."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _util import torch_logits
from opd_jax.models import lora
from opd_jax.training.builder import ConfigError, build_run, validate
from opd_jax.config_lib import LORA_TARGETS
from opd_jax.models import load_pretrained, save_pretrained
from opd_jax.models.decoder import LoraSpec
from opd_jax.training.update import LossSpec, make_optimizer, make_train_state, make_update_fn

SPEC = LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS)
IDS = np.array([[5, 17, 3, 99, 42, 7, 64, 1, 120, 33], [8, 8, 2, 77, 15, 100, 3, 9, 11, 54]],
               np.int32)


def _adapted(path, spec=SPEC, seed=1):
  """(plain model, adapted graphdef, base, adapters with random non-zero B) of a checkpoint."""
  model = load_pretrained(path)
  _, base = nnx.split(model)
  graphdef, adapters = lora.init_adapters(model.cfg, model.hf_config, spec,
                                          jax.tree.map(lambda x: x.sharding, base), jnp.float32)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  adapters = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
  return model, graphdef, base, adapters


@pytest.mark.parametrize('family', ['qwen3', 'qwen2'])
def test_peft_adapter_and_merged_export_match_the_jax_logits(hf_checkpoints, tmp_path, family):
  """The adapted forward (adapters applied in the projections) = the merged weights = PEFT's
  LoRA on the transformers model from the same checkpoint = the merged HF export (fp32)."""
  import peft
  import torch
  import transformers
  path = hf_checkpoints[family]
  model, graphdef, base, adapters = _adapted(path)
  jax_logits = np.asarray(nnx.merge(graphdef, lora.join(adapters, base))(jnp.asarray(IDS)))
  merged = nnx.merge(nnx.graphdef(model), lora.merge_params(base, adapters, SPEC))
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(IDS))), jax_logits, atol=1e-4)
  assert np.abs(jax_logits - np.asarray(model(jnp.asarray(IDS)))).max() > 0.1  # not a no-op

  adapter_dir = str(tmp_path / 'adapter')
  lora.save_peft_adapter(SPEC, adapters, adapter_dir, base_model=path,
                         num_layers=model.cfg.num_layers)
  with open(os.path.join(adapter_dir, 'adapter_config.json')) as f:
    cfg = json.load(f)
  assert (cfg['peft_type'], cfg['task_type'], cfg['r'], cfg['lora_alpha']) == (
      'LORA', 'CAUSAL_LM', 4, 8.0)
  assert cfg['target_modules'] == sorted(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                                          'up_proj', 'down_proj'])
  base_torch = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  peft_model = peft.PeftModel.from_pretrained(base_torch, adapter_dir).eval()
  state = peft_model.state_dict()
  assert 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' in state
  with torch.no_grad():
    peft_logits = peft_model(torch.tensor(IDS)).logits.numpy()
  np.testing.assert_allclose(peft_logits, jax_logits, atol=1e-4)

  export = str(tmp_path / 'merged')
  save_pretrained(merged, export)
  np.testing.assert_allclose(torch_logits(export, IDS), jax_logits, atol=1e-4)


def test_targets_select_projections_by_regex(hf_checkpoints):
  spec = LoraSpec(rank=2, alpha=2.0, targets=r'layers/self_attn/(q|v)_proj/weight')
  model, graphdef, base, adapters = _adapted(hf_checkpoints['qwen3'], spec)
  paths = sorted(lora._pairs(adapters))
  assert paths == ['layers/self_attn/q_proj/weight', 'layers/self_attn/v_proj/weight']
  a, b = lora._pairs(adapters)['layers/self_attn/q_proj/weight']
  cfg = model.cfg
  assert a.shape == (cfg.num_layers, cfg.hidden_size, 2)
  assert b.shape == (cfg.num_layers, 2, cfg.num_heads * cfg.head_dim)
  with pytest.raises(ValueError, match='cannot take an adapter'):
    lora.check_targets(LoraSpec(2, 2.0, r'embed_tokens/weight'), base)
  with pytest.raises(ValueError, match='matches no parameter'):
    lora.check_targets(LoraSpec(2, 2.0, r'q_proj'), base)


def test_update_trains_and_holds_only_the_adapters(hf_checkpoints):
  """The optimizer state has the adapters' shapes only; the base is an undonated argument
  that comes back untouched; the loss equals the plain update's on the merged weights."""
  from test_update import OPTIM, _batch
  model, graphdef, base, adapters = _adapted(hf_checkpoints['qwen2'])
  optim = OPTIM.copy_and_resolve_references()
  optim.warmup_steps = 0  # a first step with lr > 0
  tx, sched = make_optimizer(optim, total_steps=10)
  spec = LossSpec(kind='pg', remat=True, chunk_size=8)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  base_before = jax.tree.map(np.asarray, base)
  state = make_train_state(jax.tree.map(jnp.copy, adapters), tx)
  shapes = {x.shape for x in jax.tree.leaves(adapters)}
  assert {x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim} <= shapes
  n_opt = sum(x.size for x in jax.tree.leaves(state['opt_state']))
  assert n_opt <= 2 * lora.num_params(adapters) + 8  # mu, nu (+ counters)
  fn = make_update_fn(graphdef, tx, sched, spec, micro_batches=2, frozen=base)
  new, metrics = fn(state, batch)
  for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
    np.testing.assert_array_equal(before, np.asarray(after))
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new['params']),
                                                         jax.tree.leaves(adapters))]
  assert min(moved) > 0  # every adapter (A and B) gets a gradient

  merged = lora.merge_params(base, adapters, SPEC)
  plain = make_update_fn(nnx.graphdef(model), tx, sched, spec, micro_batches=2)
  _, m_plain = plain(make_train_state(merged, tx), batch)
  np.testing.assert_allclose(float(metrics['loss']), float(m_plain['loss']), rtol=1e-5)
  counts = lora.param_counts(adapters, base)
  assert counts['params/total'] == lora.num_params(adapters) + lora.num_params(base)
  assert counts['params/trainable'] == lora.num_params(adapters) < counts['params/total'] / 5


def _lora_config(**lora_fields):
  from test_train import load_config, with_overrides
  return with_overrides(load_config('opd_lora', 'runlocal'),
                        **{f'student__lora__{k}': v for k, v in lora_fields.items()})


@pytest.mark.parametrize('field, value', [('dropout', 0.1), ('rank', -1), ('alpha', 0.0),
                                          ('targets', 'layers/(q')])
def test_bad_lora_settings_name_the_field(field, value):
  with pytest.raises(ConfigError, match=rf'config\.student\.lora\.{field}'):
    validate(_lora_config(**{field: value}))


def test_targets_that_match_no_projection_name_the_field():
  from opd_jax import sharding as shd
  mesh = shd.make_mesh({'fsdp': -1})
  for targets in ('lm_head/weight|embed_tokens/weight', 'layers/self_attn/q_proj'):
    with pytest.raises(ConfigError, match=r'config\.student\.lora\.targets'):
      build_run(_lora_config(targets=targets), mesh, abstract=True)


def test_abstract_run_shards_adapters_like_their_weights():
  """On 8 devices (fsdp=8) the AOT check's run holds the adapters as the train params, the
  base in the compute dtype outside the state, and the sampler's params on the base's
  shardings."""
  from opd_jax import sharding as shd
  mesh = shd.make_mesh({'fsdp': -1})
  cfg = _lora_config(rank=8)
  cfg.unlock()
  cfg.student.compute_dtype = 'bfloat16'
  cfg.lock()
  r = build_run(cfg, mesh, abstract=True)
  assert r.lora.rank == 8 and r.base is not None
  assert {x.dtype for x in jax.tree.leaves(r.base)} == {jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(r.params)} == {jnp.dtype('float32')}
  flat = lora._flat(r.params)
  assert set(flat) == {f'layers/{m}/lora/lora_{ab}' for m in (
      'self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj', 'self_attn/o_proj',
      'mlp/gate_proj', 'mlp/up_proj', 'mlp/down_proj') for ab in 'ab'}
  # q_proj's weight [L, out, in] is (None, tensor, fsdp): lora_a [L, in, r] takes fsdp on in
  assert flat['layers/self_attn/q_proj/lora/lora_a'].sharding.spec == jax.sharding.PartitionSpec(
      None, 'fsdp', None)
  state = r.abstract_state()
  assert {x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim} <= {
      x.shape for x in flat.values()}
  assert jax.tree.structure(r.plain_params) == jax.tree.structure(r.param_shardings)
  assert any('LoRA student: rank 8' in n for n in r.notes)


def test_checkpoint_round_trip_of_the_adapter_state(hf_checkpoints, tmp_path):
  """A LoRA run's checkpoint holds the adapters and their moments only (the base is
  reloaded from student.model) and restores exactly."""
  from opd_jax.training.checkpoint import Checkpointer
  from test_update import OPTIM
  _, _, base, adapters = _adapted(hf_checkpoints['qwen3'])
  tx, _ = make_optimizer(OPTIM, total_steps=10)
  state = make_train_state(adapters, tx)
  ckpt = Checkpointer(str(tmp_path), every=1, async_save=False)
  ckpt.save(1, state, {'step': 1}, force=True)
  ckpt.wait()
  restored, meta = ckpt.restore(1, state)
  assert meta['step'] == 1
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs)
  assert saved < sum(x.nbytes for x in jax.tree.leaves(base))  # no copy of the base
  ckpt.close()
