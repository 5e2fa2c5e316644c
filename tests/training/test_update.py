"""The jitted update: micro-batch accumulation equals the full batch, the state is donated,
SFT's loss is the NLL, and the optimizer schedule follows the config."""

import dataclasses

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


@pytest.fixture(scope='module')
def full_vocab_inputs(hf_checkpoints):
  """A 2-row batch whose row 0 the teacher scored and row 1 it did not (zeros there, as
  `score_teachers` scatters them), with the teacher's top-k (K = 20) and hidden states."""
  from opd_jax.teachers.scoring import score_model
  teacher = load_pretrained(hf_checkpoints['qwen3'])
  raw = {k: jnp.asarray(v[:2]) for k, v in _batch(3).items()}
  raw['advantages'] = jnp.zeros_like(raw['advantages'])  # only the divergence has a gradient
  out = score_model(teacher, raw['tokens'], raw['attention_mask'], temperature=0.8, top_k=20,
                    with_hidden=True)
  unrouted = {k: v.at[1].set(0) for k, v in out.items()}
  return raw, unrouted, teacher.unembed_weight()


def _row_grads(model_parts, full_vocab_inputs, option, rows, teacher_rows):
  from opd_jax.objectives.losses import needs_teacher_hidden
  from opd_jax.training.update import UpdateBatch, _loss_terms
  graphdef, params = model_parts
  raw, t_out, w = full_vocab_inputs
  spec = LossSpec(temperature=0.8, full_vocab=option, full_vocab_coef=1.0, full_vocab_top_k=20,
                  vocab_chunk_size=48, chunk_size=8, remat=False)
  extra = (dict(teacher_hidden=t_out['hidden'], teacher_unembed=w)
           if needs_teacher_hidden(option) else
           dict(teacher_top_ids=t_out['top_ids'], teacher_top_logprobs=t_out['top_logprobs']))
  batch = UpdateBatch(**raw, **extra, teacher_rows=teacher_rows)
  batch = dataclasses.replace(batch.rows(*rows), teacher_unembed=batch.teacher_unembed)
  (total, stats), grads = jax.value_and_grad(
      lambda p: _loss_terms(p, graphdef, batch, spec), has_aux=True)(params)
  return float(total), float(stats['loss/full_vocab'].total), grads


@pytest.mark.parametrize('option', ['forward_kl', 'reverse_kl', 'jsd', 'forward_kl_exact',
                                    'reverse_kl_exact', 'jsd_exact', 'reverse_kl_student_topk'])
def test_full_vocab_term_is_exactly_zero_on_rows_the_teacher_did_not_score(
    model_parts, full_vocab_inputs, option):
  """Row 1 is routed away from the teacher: with teacher_rows = [1, 0] its divergence adds
  exactly 0 to the loss and the gradient, whatever the option (before, it trained toward
  the uniform distribution or toward id 0), and row 0's gradient is unchanged."""
  rows = jnp.asarray([1., 0.])
  total, gkd, g = _row_grads(model_parts, full_vocab_inputs, option, (1, 2), rows)
  assert total == 0. and gkd == 0.
  for leaf in jax.tree.leaves(g):
    np.testing.assert_array_equal(leaf, 0.)
  # what that row would have trained on without teacher_rows (the old behaviour)
  _, old_gkd, old_g = _row_grads(model_parts, full_vocab_inputs, option, (1, 2), None)
  assert old_gkd > 1e-3 and max(float(jnp.abs(x).max()) for x in jax.tree.leaves(old_g)) > 0
  # the routed row: the same gradient as every-row scoring gives it, alone or with row 1
  _, gkd_0, g_0 = _row_grads(model_parts, full_vocab_inputs, option, (0, 1), None)
  _, gkd_r, g_r = _row_grads(model_parts, full_vocab_inputs, option, (0, 1), rows)
  _, gkd_b, g_b = _row_grads(model_parts, full_vocab_inputs, option, (0, 2), rows)
  assert gkd_0 > 1e-3 and gkd_r == gkd_0
  np.testing.assert_allclose(gkd_b, gkd_0, rtol=1e-5)
  for a, b, c in zip(jax.tree.leaves(g_0), jax.tree.leaves(g_r), jax.tree.leaves(g_b)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=2e-5)  # 2 rows vs 1: float sums


@pytest.fixture(scope='module')
def teacher_scores(hf_checkpoints):
  """4 rows of _batch(5) scored by the qwen3 teacher at T = 0.8 (top-20 and hidden states),
  with the teacher's tempered logits in float64 for the NumPy references."""
  from opd_jax.teachers.scoring import score_model
  teacher = load_pretrained(hf_checkpoints['qwen3'])
  raw = {k: jnp.asarray(v[:4]) for k, v in _batch(5).items()}
  out = score_model(teacher, raw['tokens'], raw['attention_mask'], temperature=0.8, top_k=20,
                    with_hidden=True)
  w = teacher.unembed_weight()
  x_t = np.asarray(out['hidden'], np.float64) @ np.asarray(w, np.float64).T / 0.8
  return raw, out, w, x_t


@pytest.mark.parametrize('top_k, top_p', [(5, 1.0), (0, 0.8)])
@pytest.mark.parametrize('option', ['reverse_kl', 'jsd', 'reverse_kl_exact', 'jsd_exact',
                                    'reverse_kl_student_topk'])
def test_full_vocab_terms_compare_the_truncated_policy_with_the_teacher(
    model_parts, teacher_scores, option, top_k, top_p):
  """Under rollout top-k / top-p every allowed `full_vocab` term is between the policy
  being trained, the truncated and renormalised student (docs/design.md §3.2), and the
  untruncated teacher: the update's loss/full_vocab equals a float64 NumPy mean over the
  response tokens (before, the term used the untruncated student)."""
  from test_losses import np_kl_support, np_log_softmax, np_truncated_log_softmax
  from opd_jax.objectives.losses import needs_teacher_hidden
  from opd_jax.training.update import UpdateBatch, _loss_terms
  graphdef, params = model_parts
  raw, t_out, w, x_t = teacher_scores
  temp, beta, k = 0.8, 0.3, 20
  spec = LossSpec(temperature=temp, top_k=top_k, top_p=top_p, full_vocab=option,
                  full_vocab_coef=1.0, full_vocab_top_k=k, jsd_beta=beta, vocab_chunk_size=48,
                  chunk_size=8, remat=False)
  extra = (dict(teacher_hidden=t_out['hidden'], teacher_unembed=w)
           if needs_teacher_hidden(option) else
           dict(teacher_top_ids=t_out['top_ids'], teacher_top_logprobs=t_out['top_logprobs']))
  _, stats = _loss_terms(params, graphdef, UpdateBatch(**raw, **extra), spec)
  got = float(stats['loss/full_vocab'].result())

  model = nnx.merge(graphdef, params)
  h, _ = model.hidden(raw['tokens'], raw['attention_mask'])
  x_s = np.asarray(h, np.float64) @ np.asarray(model.unembed_weight(), np.float64).T / temp
  ls = np_truncated_log_softmax(x_s[:, :-1], top_k, top_p)   # position t predicts token t + 1
  lt = np_log_softmax(x_t[:, 1:])
  m = np.asarray(raw['loss_mask'])[:, 1:] > 0
  if option in ('reverse_kl', 'jsd', 'reverse_kl_student_topk'):  # K + 1 outcomes
    ids = (np.asarray(t_out['top_ids'])[:, 1:] if option != 'reverse_kl_student_topk'
           else np.argsort(-ls, axis=-1, kind='stable')[..., :k])

    def tail(a):
      with np.errstate(divide='ignore'):
        return np.concatenate([a, np.log(np.maximum(1. - np.exp(a).sum(-1, keepdims=True),
                                                    0.))], -1)
    ls, lt = (tail(np.take_along_axis(a, ids, -1)) for a in (ls, lt))
  if 'reverse_kl' in option:
    d = np_kl_support(ls, lt)
  else:
    log_m = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
    d = beta * np_kl_support(lt, log_m) + (1 - beta) * np_kl_support(ls, log_m)
  np.testing.assert_allclose(got, d[m].mean(), rtol=2e-4)
  assert np.isfinite(got) and got > 1e-3


def test_forward_kl_terms_are_refused_under_truncation():
  for option, beta in (('forward_kl', 0.5), ('forward_kl_exact', 0.5), ('jsd', 0.0),
                       ('jsd_exact', 0.0)):
    with pytest.raises(ValueError, match='infinite against the truncated policy'):
      LossSpec(top_k=5, full_vocab=option, jsd_beta=beta)
    LossSpec(full_vocab=option, jsd_beta=beta)                # untruncated: allowed
    LossSpec(kind='nll', top_k=5, full_vocab=option, jsd_beta=beta)


def test_truncated_is_update_matches_numpy_and_plain_is_without_truncation(model_parts):
  """loss.tis_cap = C: the loss is the token mean of −min(ρ, C)·A with ρ = exp(s − s_b) and
  s from the model's logits in NumPy; with C above every ρ it is plain IS (same loss and
  gradient norm)."""
  graphdef, params = model_parts
  tx, sched = make_optimizer(OPTIM, total_steps=10)
  raw = _batch(2)
  raw['behaviour_logprobs'] = raw['behaviour_logprobs'] + 1.0 * raw['loss_mask']  # ρ spread
  batch = {k: jnp.asarray(v) for k, v in raw.items()}
  logits = np.asarray(nnx.merge(graphdef, params)(batch['tokens'], batch['attention_mask']),
                      np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  s = -np.inf * np.ones(raw['tokens'].shape)
  s[:, 1:] = np.take_along_axis(logp[:, :-1], raw['tokens'][:, 1:, None], -1)[..., 0]
  m = raw['loss_mask'] > 0
  rho = np.exp(s[m] - raw['behaviour_logprobs'][m])
  cap = float(np.median(rho))
  metrics = {}
  for name, tis in (('tis', cap), ('wide', 1e30), ('plain', None)):
    state = make_train_state(jax.tree.map(jnp.copy, params), tx)
    fn = make_update_fn(graphdef, tx, sched, LossSpec(tis_cap=tis, remat=False))
    metrics[name] = {k: float(v) for k, v in fn(state, batch)[1].items()}
  want = np.mean(-np.minimum(rho, cap) * raw['advantages'][m])
  assert metrics['tis']['loss'] == pytest.approx(want, rel=1e-4, abs=1e-6)
  assert metrics['tis']['is/tis_frac'] == pytest.approx(np.mean(rho > cap), abs=1e-6)
  assert metrics['tis']['is/ratio_mean'] == pytest.approx(rho.mean(), rel=1e-4)
  for key in ('loss', 'grad_norm', 'is/ratio_mean', 'is/ratio_max'):
    assert metrics['wide'][key] == pytest.approx(metrics['plain'][key], rel=1e-5), key
  assert metrics['wide']['is/tis_frac'] == 0
