"""Meshes, partitioning rules and sharded execution on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from opd_jax import sharding as shd
from opd_jax.models import load_pretrained

IDS = np.random.RandomState(1).randint(0, 128, size=(4, 24)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[3, 10:] = 0


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_make_mesh_fills_minus_one():
  mesh = shd.make_mesh({'data': 2, 'fsdp': -1, 'tensor': 2})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(shd.make_mesh().shape) == {'data': 1, 'fsdp': 8, 'tensor': 1}


@pytest.mark.parametrize('shape, msg', [
    ({'fsdp': 3}, 'needs 3 devices'),
    ({'fsdp': -1, 'tensor': -1}, 'at most one axis'),
    ({'fsdp': -1, 'tensor': 3}, 'not divisible by 3'),
    ({'model': 8}, 'unknown axes'),
])
def test_make_mesh_errors(shape, msg):
  with pytest.raises(ValueError, match=msg):
    shd.make_mesh(shape)


def test_mesh_on_a_device_subset():
  devs = shd.parse_devices('4:8')
  mesh = shd.make_mesh({'tensor': -1}, devices=devs)
  assert mesh.shape['tensor'] == 4 and set(mesh.devices.flat) == set(jax.devices()[4:])


def test_spec_for_drops_axes_that_do_not_divide():
  mesh = shd.make_mesh({'fsdp': 2, 'tensor': 4})
  rules = shd.get_rules('fsdp_tp')
  assert shd.spec_for('layers/self_attn/q_proj/weight', (2, 64, 64), mesh, rules) == \
      P(None, 'tensor', 'fsdp')
  assert shd.spec_for('layers/self_attn/k_proj/weight', (2, 6, 64), mesh, rules) == \
      P(None, None, 'fsdp')
  assert shd.spec_for('norm/weight', (64,), mesh, rules) == P()
  with pytest.raises(ValueError, match='no sharding rule'):
    shd.spec_for('x', (2,), mesh, ((r'y', ()),))
  with pytest.raises(ValueError, match='unknown sharding rules'):
    shd.get_rules('zero3')


@pytest.mark.parametrize('family', ['qwen3', 'qwen2', 'llama'])
def test_fsdp_tensor_mesh_matches_single_device(hf_checkpoints, family):
  path = hf_checkpoints[family]
  ref = np.asarray(load_pretrained(path)(jnp.asarray(IDS), jnp.asarray(MASK)))
  mesh = shd.make_mesh({'fsdp': 2, 'tensor': 4})
  model = load_pretrained(path, mesh=mesh, rules='fsdp_tp')

  q = model.layers.self_attn.q_proj.weight[...]
  assert q.sharding.spec == P(None, 'tensor', 'fsdp')
  assert q.addressable_shards[0].data.shape == (2, 64 // 4, 64 // 2)
  emb = model.embed_tokens.weight[...]
  assert emb.sharding.spec == P('tensor', 'fsdp')
  assert len({s.device for s in emb.addressable_shards}) == 8

  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  ids, mask = shd.shard_batch((IDS, MASK), mesh)
  with jax.set_mesh(mesh):
    out = fwd(state, ids, mask)
  assert out.sharding.spec == P('fsdp', None, 'tensor')  # batch and vocab stay sharded
  diff = np.abs(np.asarray(out) - ref)[MASK.astype(bool)].max()
  scale = np.abs(ref).max()
  print(f'{family}: sharded vs single-device max |diff| = {diff:.2e} at logit scale {scale:.1f}')
  # Sharding the contraction dims changes fp32 summation order: 1e-5 relative to the logits.
  assert diff <= 1e-5 * max(1.0, scale), diff


def test_teacher_and_student_rules_differ_on_one_mesh(hf_checkpoints):
  mesh = shd.make_mesh({'fsdp': 2, 'tensor': 4})
  student = load_pretrained(hf_checkpoints['qwen3'], mesh=mesh, rules='fsdp')
  teacher = load_pretrained(hf_checkpoints['qwen3'], mesh=mesh, rules='tp')
  assert student.layers.mlp.up_proj.weight[...].sharding.spec == P(None, None, 'fsdp')
  assert teacher.layers.mlp.up_proj.weight[...].sharding.spec == P(None, 'tensor', None)


def test_shard_batch_rejects_indivisible_batch():
  mesh = shd.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  with pytest.raises(ValueError, match='not divisible'):
    shd.shard_batch(np.zeros((6, 3)), mesh)
  x = shd.shard_batch(np.arange(8 * 3).reshape(8, 3), mesh)
  assert x.sharding.spec == P(('data', 'fsdp'), None)
