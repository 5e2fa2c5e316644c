"""Chunked per-token scoring against the model's full logits, top-k and tail mass, gradients
through the rematerialised chunks, and the compiled memory bound at a 151,936 vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.models import Decoder, ModelConfig, load_pretrained
from opd_jax.teachers.scoring import auto_chunk_size, make_score_fn, score_model

IDS = np.random.RandomState(3).randint(0, 128, size=(3, 21)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[1, 15:] = 0
MASK[2, :4] = 0  # left padding


def _reference(model, ids, mask, temperature=1.0):
  logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)), np.float64) / temperature
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  ref = np.zeros(ids.shape)
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      if mask[b, t] and mask[b, t - 1]:
        ref[b, t] = logp[b, t - 1, ids[b, t]]
  return ref, logp


@pytest.fixture(scope='module')
def qwen2(hf_checkpoints):
  return load_pretrained(hf_checkpoints['qwen2'])


@pytest.mark.parametrize('chunk', [1, 3, 8, None])
def test_chunked_logprobs_match_full_logits(qwen2, chunk):
  graphdef, params = nnx.split(qwen2)
  out = make_score_fn(graphdef, chunk_size=chunk, with_entropy=True)(params, IDS, MASK)
  ref, logp = _reference(qwen2, IDS, MASK)
  np.testing.assert_allclose(np.asarray(out['logprobs']), ref, atol=1e-5)
  ent = -(np.exp(logp) * logp).sum(-1)
  valid = (MASK[:, 1:] * MASK[:, :-1]).astype(bool)
  np.testing.assert_allclose(np.asarray(out['entropy'])[:, 1:][valid], ent[:, :-1][valid],
                             atol=1e-4)


def test_temperature_scales_logits(qwen2):
  graphdef, params = nnx.split(qwen2)
  out = make_score_fn(graphdef, temperature=0.5, chunk_size=4)(params, IDS, MASK)
  ref, _ = _reference(qwen2, IDS, MASK, temperature=0.5)
  np.testing.assert_allclose(np.asarray(out['logprobs']), ref, atol=1e-5)


def test_top_k_and_tail(qwen2):
  graphdef, params = nnx.split(qwen2)
  out = make_score_fn(graphdef, top_k=5, chunk_size=4)(params, IDS, MASK)
  _, logp = _reference(qwen2, IDS, MASK)
  top, ids, tail = (np.asarray(out[k]) for k in ('top_logprobs', 'top_ids', 'tail_logprob'))
  assert top.shape == (3, 21, 5) and ids.shape == (3, 21, 5)
  ref_ids = np.argsort(-logp, axis=-1)[..., :5]
  valid = (MASK[:, 1:] * MASK[:, :-1]).astype(bool)
  np.testing.assert_array_equal(ids[:, 1:][valid], ref_ids[:, :-1][valid])
  np.testing.assert_allclose(top[:, 1:][valid],
                             np.take_along_axis(logp, ref_ids, -1)[:, :-1][valid], atol=1e-5)
  total = np.exp(top).sum(-1) + np.exp(tail)
  np.testing.assert_allclose(total[:, 1:][valid], 1.0, atol=1e-5)


def test_gradients_through_remat_chunks(qwen2):
  graphdef, params = nnx.split(qwen2)
  weights = jnp.asarray(np.random.RandomState(0).randn(*IDS.shape), jnp.float32)

  def loss(params, remat, chunk):
    model = nnx.merge(graphdef, params)
    lp = score_model(model, jnp.asarray(IDS), jnp.asarray(MASK), remat=remat,
                     chunk_size=chunk)['logprobs']
    return jnp.sum(lp * weights)
  g_full = jax.grad(loss)(params, False, 64)
  g_remat = jax.grad(loss)(params, True, 4)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_memory_at_qwen_vocabulary():
  """B=8, T=1024, V=151,936: full fp32 logits would be 8*1024*151936*4 B = 4.98 GB. The
  compiled scoring function's temporaries must stay under 1 GB (measured: see the print)."""
  cfg = ModelConfig(model_type='qwen3', vocab_size=151936, hidden_size=64, intermediate_size=128,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, tie_embeddings=True,
                    qk_norm=True)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
  score = make_score_fn(graphdef, top_k=8)
  compiled = score.lower(params, tokens, tokens).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  full = 8 * 1024 * 151936 * 4
  print(f'scoring temp memory {temp / 2**20:.0f} MiB vs full logits {full / 2**20:.0f} MiB '
        f'(chunk {auto_chunk_size(8, 1023, 151936)})')
  assert temp < 2**30
  assert temp < full / 5


@pytest.mark.parametrize('micro', [2, 3])
def test_row_groups_give_the_same_scores(qwen2, micro):
  """micro_batches splits the 6 rows into groups scored one after another (rows g, m + g,
  ...): the same scores for the same rows in the same order."""
  graphdef, params = nnx.split(qwen2)
  ids = np.concatenate([IDS, IDS[::-1]])
  mask = np.concatenate([MASK, MASK[::-1]])
  want = make_score_fn(graphdef, top_k=3)(params, ids, mask)
  got = make_score_fn(graphdef, top_k=3, micro_batches=micro)(params, ids, mask)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-5, err_msg=k)


def test_row_groups_respect_the_data_axes_and_cut_memory():
  """On 8 devices, 32 rows in 4 groups of 8 (one row per device per group) need about a
  quarter of the activation memory; 12 groups are impossible (32 rows), so 4 are used."""
  from opd_jax import sharding as shd
  from opd_jax.teachers.scoring import row_groups
  mesh = shd.make_mesh({'fsdp': -1})
  cfg = ModelConfig(model_type='qwen3', vocab_size=512, hidden_size=128, intermediate_size=512,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, tie_embeddings=True,
                    qk_norm=True)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=shd.replicated(mesh)), params)
  tokens = jax.ShapeDtypeStruct((32, 256), jnp.int32, sharding=shd.batch_sharding(mesh))
  temps = {}
  with jax.set_mesh(mesh):
    assert row_groups(32, 4) == 4 and row_groups(32, 12) == 4 and row_groups(24, 2) == 1
    for m in (1, 4):
      compiled = make_score_fn(graphdef, micro_batches=m).lower(params, tokens, tokens).compile()
      temps[m] = compiled.memory_analysis().temp_size_in_bytes
  print(f'scoring temps per device: {temps[1] / 2**20:.1f} MiB in one group, '
        f'{temps[4] / 2**20:.1f} MiB in 4')
  assert temps[4] < 0.5 * temps[1]
