"""The jitted update: micro-batch accumulation equals the full batch, the state is donated,
SFT's loss is the NLL, and the optimizer schedule follows the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from opd_jax.models import load_pretrained
from opd_jax.training.update import LossSpec, make_optimizer, make_train_state, make_update_fn

OPTIM = ConfigDict(dict(lr=1e-2, schedule='cosine', warmup_steps=2, weight_decay=0.01,
                        b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0))


def _batch(seed=0, b=8, length=24, vocab=128):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (b, length)).astype(np.int32)
  attn = np.ones((b, length), np.int32)
  attn[:, :rng.randint(0, 4)] = 0                # left padding
  lmask = np.zeros((b, length), np.float32)
  for i in range(b):                              # responses of different lengths
    lmask[i, 10:10 + rng.randint(1, 14)] = 1
  attn = np.maximum(attn, lmask.astype(np.int32))
  return {'tokens': tokens, 'attention_mask': attn, 'loss_mask': lmask,
          'behaviour_logprobs': (rng.randn(b, length) * 0.1 - 3).astype(np.float32) * lmask,
          'advantages': rng.randn(b, length).astype(np.float32) * lmask}


@pytest.fixture(scope='module')
def model_parts(hf_checkpoints):
  return nnx.split(load_pretrained(hf_checkpoints['qwen2']))


@pytest.mark.parametrize('aggregation', ['token-mean', 'seq-mean-token-mean'])
@pytest.mark.parametrize('kind', ['pg', 'nll'])
def test_micro_batches_equal_full_batch(model_parts, aggregation, kind):
  graphdef, params = model_parts
  tx, sched = make_optimizer(OPTIM, total_steps=10)
  spec = LossSpec(kind=kind, aggregation=aggregation, clip_eps=0.2, remat=True, chunk_size=8)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  outs = []
  for micro in (1, 4):
    state = make_train_state(jax.tree.map(jnp.copy, params), tx)
    fn = make_update_fn(graphdef, tx, sched, spec, micro_batches=micro)
    state, metrics = fn(state, batch)
    outs.append((state, metrics))
  (s1, m1), (s4, m4) = outs
  for a, b in zip(jax.tree.leaves(s1['params']), jax.tree.leaves(s4['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  for k in m1:
    np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_nll_loss_is_mean_negative_log_likelihood(model_parts):
  graphdef, params = model_parts
  tx, sched = make_optimizer(OPTIM, total_steps=10)
  raw = _batch(1)
  state = make_train_state(jax.tree.map(jnp.copy, params), tx)
  fn = make_update_fn(graphdef, tx, sched, LossSpec(kind='nll', remat=False))
  _, m = fn(state, {k: jnp.asarray(v) for k, v in raw.items()})
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(raw['tokens']),
                                                  jnp.asarray(raw['attention_mask'])), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp[:, :-1], raw['tokens'][:, 1:, None], -1)[..., 0]
  m_ = raw['loss_mask'][:, 1:]
  np.testing.assert_allclose(float(m['loss']), (nll * m_).sum() / m_.sum(), rtol=1e-5)


def test_update_donates_state_and_counts_steps(model_parts):
  graphdef, params = model_parts
  tx, sched = make_optimizer(OPTIM, total_steps=10)
  state = make_train_state(jax.tree.map(jnp.copy, params), tx)
  fn = make_update_fn(graphdef, tx, sched, LossSpec())
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  old_leaf = jax.tree.leaves(state['params'])[0]
  state, m = fn(state, batch)
  assert old_leaf.is_deleted()  # the old buffers were donated to the new state
  state, m = fn(state, batch)
  assert int(state['step']) == 2
  assert float(m['lr']) == pytest.approx(float(sched(1)))
  assert float(m['is/ratio_mean']) > 0 and 0 <= float(m['is/clip_frac']) <= 1


def test_unknown_schedule_is_named():
  bad = ConfigDict(dict(OPTIM))
  bad.schedule = 'exponential'
  with pytest.raises(ValueError, match='schedule'):
    make_optimizer(bad, 10)


def test_sharded_update_applies_activation_constraints_without_a_mesh_context(hf_checkpoints):
  """The trainer calls the step outside `jax.set_mesh`; with state_shardings the step traces
  under their mesh anyway, so the model's batch-axis constraints are in the program (without
  them XLA was free to compute every row on every device: 13 GiB per row at Qwen3-1.7B)."""
  from opd_jax import sharding as shd
  mesh = shd.make_mesh({'fsdp': -1})
  graphdef, params = nnx.split(load_pretrained(hf_checkpoints['qwen2'], mesh=mesh))
  tx, sched = make_optimizer(OPTIM, total_steps=10)
  shapes = jax.eval_shape(lambda p: make_train_state(p, tx), params)
  shardings = shd.match_shardings(shapes, params, mesh)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh))
           for k, v in _batch().items()}
  assert jax.sharding.get_abstract_mesh().empty
  text = make_update_fn(graphdef, tx, sched, LossSpec(), micro_batches=2,
                        state_shardings=shardings).lower(state, batch).as_text()
  assert text.count('sharding_constraint') >= 4, text.count('sharding_constraint')


@pytest.mark.parametrize('exact, topk', [('reverse_kl_exact', 'reverse_kl')])
def test_streamed_full_vocab_terms_equal_the_top_k_term_at_k_equal_v(hf_checkpoints,
                                                                     model_parts, exact, topk):
  """The update's exact (and student-top-k with K = V) terms, computed from the teacher's
  hidden states and output projection vocabulary chunk by chunk, give the same step as the
  teacher-top-k term with K = V; micro-batches keep the projection whole."""
  from opd_jax.teachers.scoring import score_model
  from opd_jax.training.update import UpdateBatch
  graphdef, params = model_parts
  teacher = load_pretrained(hf_checkpoints['qwen3'])            # tied embeddings, D = 64
  raw = {k: jnp.asarray(v) for k, v in _batch(2).items()}
  vocab, temp = 128, 0.8
  t_out = score_model(teacher, raw['tokens'], raw['attention_mask'], temperature=temp,
                      top_k=vocab, with_hidden=True)
  assert t_out['hidden'].shape == (8, 24, 64)
  np.testing.assert_array_equal(t_out['hidden'][:, 0], 0.)       # position 0 predicts nothing
  tx, sched = make_optimizer(OPTIM, total_steps=10)
  outs = {}
  for option, micro in ((exact, 2), (topk, 1)):
    spec = LossSpec(temperature=temp, full_vocab=option, full_vocab_coef=0.7, chunk_size=8,
                    full_vocab_top_k=vocab, vocab_chunk_size=48)
    extra = (dict(teacher_hidden=t_out['hidden'], teacher_unembed=teacher.unembed_weight())
             if option == exact else dict(teacher_top_ids=t_out['top_ids'],
                                          teacher_top_logprobs=t_out['top_logprobs']))
    batch = UpdateBatch(**raw, **extra)
    if option == exact:
      part = batch.rows(2, 5)  # mini-batches slice the rows, never the projection
      assert part.tokens.shape[0] == 3 and part.teacher_unembed.shape == (vocab, 64)
    state = make_train_state(jax.tree.map(jnp.copy, params), tx)
    outs[option] = make_update_fn(graphdef, tx, sched, spec, micro_batches=micro)(state, batch)
  (s_e, m_e), (s_k, m_k) = outs[exact], outs[topk]
  assert float(m_e['loss/full_vocab']) > 1e-3
  for key in ('loss', 'loss/full_vocab', 'grad_norm'):
    np.testing.assert_allclose(float(m_e[key]), float(m_k[key]), rtol=1e-4, err_msg=key)
  for a, b in zip(jax.tree.leaves(s_e['params']), jax.tree.leaves(s_k['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(ValueError, match=r"lacks \['teacher_hidden', 'teacher_unembed'\]"):
    make_update_fn(graphdef, tx, sched, LossSpec(full_vocab=exact))(
        make_train_state(params, tx), raw)
