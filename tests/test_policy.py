"""The policy is one distribution: the sampler draws from it and the update differentiates it.

1. `policy.truncate` against a NumPy reference of temperature / top-k / top-p.
2. For every temperature x (top_k, top_p) of the grid, the first update on fresh rollouts has
   ρ = 1 to float precision and no clipped token (before the fix, top_k=5 gave ρ ≈ 0.07 and
   a clip fraction of 1: the update was off).
3. Monte Carlo on a tiny model with an enumerable response space: the update's averaged
   gradient converges to the exact gradient of the objective docs/design.md §3.2 states,
     J(θ') = Σ_k E_{y<k ~ π_θ}[ KL(π_θ'(·|x, y<k) ‖ q(·|x, y<k)) ]   at θ' = θ,
   computed here by enumerating every response (NumPy truncation sets, jax.grad of the
   model's own forward), not through the project's loss code.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opd_jax import policy as policy_lib
from opd_jax.objectives import advantages as token_adv
from opd_jax.rollout.engine import rollout_arrays
from opd_jax.models import load_pretrained
from opd_jax.rollout.decode import SamplingParams
from opd_jax.rollout.sampler import Sampler
from opd_jax.teachers.scoring import make_score_fn
from opd_jax.models.tiny import make_tiny_checkpoint
from opd_jax.training.update import LossSpec, UpdateBatch, _loss_terms, make_update_fn

GRID = [(0, 1.0), (5, 1.0), (0, 0.7), (5, 0.7)]


def np_keep(x_V, top_k, top_p):
  """The kept set of tempered logits x [V] by the documented rule, in float64 NumPy."""
  x = np.asarray(x_V, np.float64)
  keep = np.ones(x.shape, bool)
  if top_k and top_k < len(x):
    keep &= x >= np.sort(x)[-top_k]
  if top_p < 1.0:
    order = np.argsort(-np.where(keep, x, -np.inf), kind='stable')
    xs = np.where(keep, x, -np.inf)[order]
    p = np.exp(xs - xs.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    kept_sorted = before < top_p
    k2 = np.zeros_like(keep)
    k2[order] = kept_sorted
    keep &= k2
  return keep


@pytest.mark.parametrize('top_k, top_p', GRID + [(1, 1.0), (0, 0.05)])
def test_truncate_matches_numpy(top_k, top_p):
  rng = np.random.RandomState(top_k + int(100 * top_p))
  x = (rng.randn(6, 37) * 2).astype(np.float32)
  got = np.asarray(policy_lib.truncate(jnp.asarray(x), top_k, top_p))
  for row, g in zip(x, got):
    keep = np_keep(row, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(g), keep)
    np.testing.assert_array_equal(g[keep], row[keep])
  logp = np.asarray(policy_lib.log_policy(jnp.asarray(x), policy_lib.Policy(0.7, top_k, top_p)))
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('top_k, top_p', GRID + [(1, 1.0), (0, 0.05)])
def test_keep_threshold_reproduces_the_kept_set(top_k, top_p):
  """x >= keep_threshold(x) is the documented kept set, on the logits and on their
  log-softmax (the update's units), and on the values recomputed with rounding noise far
  below the gap between the last kept and the first removed entry."""
  rng = np.random.RandomState(7 + top_k + int(100 * top_p))
  x = (rng.randn(6, 37) * 2).astype(np.float32)
  for vals in (x, np.asarray(jax.nn.log_softmax(jnp.asarray(x)))):
    cut = np.asarray(policy_lib.keep_threshold(jnp.asarray(vals), top_k, top_p))
    for row, c, orig in zip(vals, cut, x):
      keep = np_keep(orig, top_k, top_p)
      np.testing.assert_array_equal(row >= c, keep)
      np.testing.assert_array_equal(row * (1 + 1e-6) + 1e-6 >= c + 1e-6, keep)
      assert np.isneginf(c) == keep.all()


def test_policy_rejects_greedy_and_bad_truncation():
  with pytest.raises(ValueError, match='temperature must be > 0'):
    policy_lib.Policy(temperature=0.0)
  with pytest.raises(ValueError, match='top_p must be in'):
    policy_lib.Policy(top_p=0.0)


# ----------------------------------------------------------------------- models, fixtures
def _sharpened(path, scale):
  """A tiny random model whose logits are far from uniform (the (tied) embedding scaled)."""
  model = load_pretrained(path)
  graphdef, params = nnx.split(model)
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: x * scale if any(n in jax.tree_util.keystr(kp) for n in ('embed', 'lm_head'))
      else x, params)
  return graphdef, params


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp('policy')
  s = make_tiny_checkpoint(str(root / 'student'), hidden_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, seed=3)
  t = make_tiny_checkpoint(str(root / 'teacher'), hidden_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, seed=4)
  return _sharpened(s, 10.0), _sharpened(t, 10.0)


PROMPT = [1, 20, 33, 47, 58]


def _opd_batch(student, teacher, sampler, key, rows, sp):
  """Fresh rollouts of PROMPT, teacher-scored, with pure-OPD advantages (the trainer's path)."""
  graphdef, params = student
  rollout = sampler(params, [PROMPT] * rows, key, sp)
  tokens, attn, lmask, s_b = rollout_arrays(rollout)
  t = _teacher_score(teacher[0], sp.temperature)(teacher[1], tokens, attn)['logprobs']
  adv, _, _ = token_adv.advantages(s_b, t[None], None, jnp.ones((1,)), jnp.ones((rows, 1)), lmask,
                               None, mode='opd')
  return UpdateBatch(tokens, attn, lmask, behaviour_logprobs=s_b, advantages=adv)


@functools.lru_cache(maxsize=None)
def _teacher_score(graphdef, temperature):
  return make_score_fn(graphdef, temperature=temperature)


@pytest.mark.parametrize('temperature', [0.7, 1.0, 1.3])
@pytest.mark.parametrize('top_k, top_p', GRID)
def test_first_update_is_on_policy(models, temperature, top_k, top_p):
  student, teacher = models
  sampler = Sampler(student[0], pad_id=0)
  sp = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p)
  batch = _opd_batch(student, teacher, sampler, jax.random.key(0), 16, sp)
  spec = LossSpec(temperature=temperature, top_k=top_k, top_p=top_p, clip_eps=0.2, remat=False)
  tx = optax.sgd(0.0)
  update = make_update_fn(student[0], tx, lambda step: 0.0, spec)
  state = {'params': student[1], 'opt_state': tx.init(student[1]),
           'step': jnp.zeros((), jnp.int32)}
  state = jax.tree.map(jnp.array, state)  # the update donates its state
  _, m = update(state, batch)
  assert abs(float(m['is/ratio_min']) - 1) < 1e-5, m
  assert abs(float(m['is/ratio_max']) - 1) < 1e-5, m
  assert abs(float(m['is/ratio_mean']) - 1) < 1e-5, m
  assert float(m['is/clip_frac']) == 0.0


# -------------------------------------------------------------------- exact objective
def _exact_objective_grad(student, teacher, temperature, top_k, top_p):
  """∇J at θ by enumerating all two-token responses (the kept sets fixed at θ)."""
  graphdef, params = student
  tmodel = nnx.merge(*teacher)

  def last_logits(model, seqs):
    return np.asarray(model(jnp.asarray(seqs))[:, -1], np.float64)

  s_model = nnx.merge(graphdef, params)
  x1 = last_logits(s_model, [PROMPT])[0] / temperature
  keep1 = np_keep(x1, top_k, top_p)
  support = np.nonzero(keep1)[0]
  assert len(support) >= 2, 'a one-token support has no gradient: a useless check'
  seqs2 = [PROMPT + [int(a)] for a in support]
  keep2 = np.stack([np_keep(x, top_k, top_p)
                    for x in last_logits(s_model, seqs2) / temperature])
  logq1 = jax.nn.log_softmax(last_logits(tmodel, [PROMPT])[0] / temperature)
  logq2 = jax.nn.log_softmax(last_logits(tmodel, seqs2) / temperature, axis=-1)
  p1_fixed = np.exp(np.asarray(jax.nn.log_softmax(np.where(keep1, x1, -np.inf))))[support]

  def kl(x, keep, logq):  # KL(softmax over the kept set ‖ q), rows of [.., V]
    logp = jax.nn.log_softmax(jnp.where(keep, x, -jnp.inf), axis=-1)
    logp = jnp.where(keep, logp, 0.0)  # no −inf in the unselected branch (NaN gradients)
    return jnp.sum(jnp.where(keep, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)

  def objective(p):
    model = nnx.merge(graphdef, p)
    l1 = model(jnp.asarray([PROMPT]))[0, -1] / temperature
    l2 = model(jnp.asarray(seqs2))[:, -1] / temperature
    return kl(l1, keep1, logq1) + jnp.sum(p1_fixed * kl(l2, keep2, logq2))
  return jax.grad(objective)(params)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 0, 1.0), (1.3, 5, 0.9)])
def test_monte_carlo_update_direction_converges_to_the_stated_objective(
    models, temperature, top_k, top_p):
  student, teacher = models
  sampler = Sampler(student[0], pad_id=0)
  sp = SamplingParams(max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p)
  spec = LossSpec(temperature=temperature, top_k=top_k, top_p=top_p, remat=False)
  rows, n_batches = 1024, 16

  # The update before the fix: s from the untruncated tempered softmax.
  untruncated = LossSpec(temperature=temperature, remat=False)

  @functools.partial(jax.jit, static_argnums=2)
  def grad_fn(params, batch, loss_spec):  # the token-mean loss of the update over one batch
    g = jax.grad(lambda p: _loss_terms(p, student[0], batch, loss_spec)[0])(params)
    return jax.tree.map(lambda x: x / jnp.sum(batch.loss_mask), g)

  per_batch, per_batch_old = [], []
  for i in range(n_batches):
    batch = _opd_batch(student, teacher, sampler, jax.random.key(100 + i), rows, sp)
    # 2 response tokens per row: E[token-mean gradient] = ∇J / 2.
    per_batch.append(2.0 * _flat(grad_fn(student[1], batch, spec)))
    if spec.top_k or spec.top_p < 1:
      per_batch_old.append(2.0 * _flat(grad_fn(student[1], batch, untruncated)))
  per_batch = np.stack(per_batch)
  mc = per_batch.mean(0)
  se2 = per_batch.var(0, ddof=1).sum() / n_batches      # E‖mc − g‖² if mc is unbiased
  exact = _flat(_exact_objective_grad(student, teacher, temperature, top_k, top_p))
  err2 = np.sum((mc - exact) ** 2)
  cos = mc @ exact / np.linalg.norm(mc) / np.linalg.norm(exact)
  print(f'T={temperature} top_k={top_k} top_p={top_p}: cosine {cos:.4f}, '
        f'|mc - exact|^2 / E|noise|^2 = {err2 / se2:.2f}')
  # Unbiased: the squared error is the sampling noise (ratio ~1; a biased estimator's error
  # does not shrink with the sample size), and the direction agrees.
  assert err2 < 2.0 * se2
  assert cos > 0.95
  if per_batch_old:  # the check has the power to see the old bias
    old = np.stack(per_batch_old)
    old_err2 = np.sum((old.mean(0) - exact) ** 2)
    old_se2 = old.var(0, ddof=1).sum() / n_batches
    print(f'  untruncated s (before the fix): |mc - exact|^2 / E|noise|^2 = '
          f'{old_err2 / old_se2:.1f}')
    assert old_err2 > 10 * old_se2


# ------------------------------------------------------------ evaluation's reverse KL
def test_single_turn_eval_reverse_kl_is_that_of_the_truncated_policy(models):
  """eval/reverse_kl at (T, k, p) = (0.8, 5, 0.9) equals a float64 NumPy mean of
  log π(a) − log q(a) over the same sampled tokens, π the tempered top-k / top-p policy
  and q the tempered teacher (before, evaluation sampled and scored with T alone: 0.234
  here, with 10 of 128 sampled tokens outside the kept set, against 0.0834 now)."""
  import types
  from opd_jax.training import evaluation
  from opd_jax.data import Record
  student, teacher = models
  temp, top_k, top_p = 0.8, 5, 0.9
  records = [Record(id=str(i), tag='general', messages=[{'role': 'user', 'content': 'x'}])
             for i in range(16)]
  encoder = types.SimpleNamespace(encode_batch=lambda recs: [PROMPT] * len(recs))
  tokenizer = types.SimpleNamespace(batch_decode=lambda ids, **kw: [''] * len(ids))
  seen = []

  def kl_fn(tokens, attn, lmask, s_b, tags):
    t = _teacher_score(teacher[0], temp)(teacher[1], tokens, attn)['logprobs']
    m = np.asarray(lmask, np.float64)
    seen.append((np.asarray(tokens), np.asarray(attn), m))
    return (np.sum(m * (np.asarray(s_b, np.float64) - np.asarray(t, np.float64)), -1)[None],
            m.sum(-1)[None])

  settings = evaluation.EvalSettings(batch_size=16, max_new_tokens=8, temperature=temp,
                                     top_k=top_k, top_p=top_p, num_text_samples=0)
  got = evaluation.evaluate(step=0, key=jax.random.key(7), student_params=student[1],
                            sampler=Sampler(student[0], pad_id=0), encoder=encoder,
                            tokenizer=tokenizer, records=records, settings=settings,
                            teachers=[types.SimpleNamespace(name='teacher')], kl_fn=kl_fn)

  def np_logits(model, tokens, attn):  # [B, T, V] float64, position t predicting token t
    m = nnx.merge(*model)
    h, _ = m.hidden(jnp.asarray(tokens), jnp.asarray(attn))
    z = np.asarray(h, np.float64) @ np.asarray(m.unembed_weight(), np.float64).T
    return np.pad(z[:, :-1], ((0, 0), (1, 0), (0, 0)))

  (tokens, attn, m), = seen
  x_s = np_logits(student, tokens, attn) / temp
  x_t = np_logits(teacher, tokens, attn) / temp
  total, count, outside = 0., 0., 0
  for i, j in zip(*np.nonzero(m)):
    keep = np_keep(x_s[i, j], top_k, top_p)
    a = tokens[i, j]
    outside += not keep[a]
    log_pi = x_s[i, j, a] - np.log(np.exp(x_s[i, j][keep]).sum())
    log_q = x_t[i, j, a] - np.log(np.exp(x_t[i, j]).sum())
    total, count = total + log_pi - log_q, count + 1
  assert outside == 0 and count > 50  # every sampled token is in the kept set
  np.testing.assert_allclose(got['eval/reverse_kl'], total / count, rtol=1e-4)
  np.testing.assert_allclose(got['eval/reverse_kl/teacher'], total / count, rtol=1e-4)
