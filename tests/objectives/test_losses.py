"""The OPD math (opd_jax/objectives/losses.py) against independent plain-NumPy references in
float64.

Inputs are float32, so values are compared at rtol/atol 1e-5 unless a test says otherwise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.objectives import losses as L

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, J, V = 4, 7, 3, 11
RNG = np.random.RandomState(0)
LENGTHS = np.array([7, 4, 0, 5])  # row 2 is all padding
MASK = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.float32)
S_B = (-3. * RNG.rand(B, T)).astype(np.float32)
S = (S_B + 0.3 * RNG.randn(B, T)).astype(np.float32)
T_J = (-3. * RNG.rand(J, B, T)).astype(np.float32)
R = (-3. * RNG.rand(B, T)).astype(np.float32)
ADV = RNG.randn(B, T).astype(np.float32)
COEF = np.array([1., 0.5, 2.], np.float32)
ROUTE = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], np.float32)  # row 2: none
T_J_UNSCORED = np.where(ROUTE.T[:, :, None] > 0, T_J, np.nan).astype(np.float32)


def f64(x):
  return np.asarray(x, np.float64)


# Jitted: one compile per call instead of one per primitive and shape in eager mode (seconds
# on a shared 2-core CPU); the trainer runs these under jit too. Other tests call eagerly.
def jit_grad(fn, **kw):
  return jax.jit(jax.grad(fn, **kw))


def jitted(fn, *args, **static):
  return jax.jit(functools.partial(fn, *args, **static))


# ------------------------------------------------------------------- NumPy references
def np_kl_token(s_b, t, estimator, clamp):
  s_b, t = f64(s_b), f64(t)
  kl = s_b - t if estimator == 'k1' else np.exp(t - s_b) - (t - s_b) - 1.
  return kl if clamp is None else np.clip(kl, -clamp, clamp)


def np_opd(s_b, t_j, coef, route, estimator='k1', clamp=None):
  adv, kl = np.zeros(s_b.shape), np.zeros(t_j.shape)
  for i in range(s_b.shape[0]):
    for j in range(t_j.shape[0]):
      if route[i, j]:
        kl[j, i] = np_kl_token(s_b[i], t_j[j, i], estimator, clamp)
        adv[i] -= coef[j] * kl[j, i]
  return adv, kl


def np_gopd(s_b, t_j, r, coef, route, lam):
  adv = np.zeros(s_b.shape)
  for i in range(s_b.shape[0]):
    for j in range(t_j.shape[0]):
      if route[i, j]:
        adv[i] += coef[j] * (lam * (f64(t_j[j, i]) - r[i]) - (f64(s_b[i]) - r[i]))
  return adv


def np_policy_loss(s, s_b, a, m, eps=None, eps_high=None, tis=None, level='token'):
  s, s_b, a = f64(s), f64(s_b), f64(a)
  loss, ratio, clipped = np.zeros(s.shape), np.ones(s.shape), np.zeros(s.shape, bool)
  for i in range(s.shape[0]):
    on = m[i] > 0
    if level == 'sequence':
      ratio[i] = np.exp((s[i][on] - s_b[i][on]).mean()) if on.any() else 1.
    else:
      ratio[i][on] = np.exp(s[i][on] - s_b[i][on])
    for k in np.nonzero(on)[0]:
      rho, adv = ratio[i, k], a[i, k]
      obj = rho * adv
      if eps is not None:
        c = np.clip(rho, 1 - eps, 1 + (eps if eps_high is None else eps_high)) * adv
        clipped[i, k] = c < obj
        obj = min(obj, c)
      loss[i, k] = -obj * (1. if tis is None else tis[i, k])
  return loss, ratio, clipped


def np_aggregate(loss, m, mode):
  loss, m = f64(loss), f64(m)
  if mode == 'token-mean':
    return (loss * m).sum(), m.sum()
  total, count = 0., 0
  for i in range(loss.shape[0]):
    if m[i].sum() > 0:
      total += (loss[i] * m[i]).sum() / m[i].sum()
      count += 1
  return total, count


def np_log_softmax(x):
  x = f64(x)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl_full(logp, logq):  # KL(p ‖ q) over the last axis
  p = np.exp(f64(logp))
  return (p * (f64(logp) - f64(logq))).sum(-1)


def np_jsd(s, t, beta):
  if beta == 0:
    return np_kl_full(t, s)
  if beta == 1:
    return np_kl_full(s, t)
  log_m = np.log(beta * np.exp(f64(t)) + (1 - beta) * np.exp(f64(s)))
  return beta * np_kl_full(t, log_m) + (1 - beta) * np_kl_full(s, log_m)


def np_with_tail(topk):
  return np.concatenate([f64(topk), np.log(1. - np.exp(f64(topk)).sum(-1, keepdims=True))], -1)


def np_full_loss(name, s, t, beta=0.5):
  return {'forward_kl': lambda: np_kl_full(t, s), 'reverse_kl': lambda: np_kl_full(s, t),
          'jsd': lambda: np_jsd(s, t, beta)}[name]()


# ------------------------------------------------------------------ per-token KL, OPD
@pytest.mark.parametrize('estimator', ['k1', 'k3'])
@pytest.mark.parametrize('clamp', [None, 0.5])
def test_reverse_kl_matches_numpy(estimator, clamp):
  kl = L.reverse_kl(S_B, T_J[0], estimator, clamp)
  np.testing.assert_allclose(kl, np_kl_token(S_B, T_J[0], estimator, clamp), **TOL)
  if estimator == 'k3':
    assert np.all(np.asarray(kl) >= 0.)
  if clamp is not None:
    assert np.abs(np.asarray(kl)).max() <= clamp
  np.testing.assert_array_equal(L.reverse_kl(S_B, S_B, estimator, clamp), 0.)


def test_reverse_kl_errors():
  with pytest.raises(ValueError, match=r"unknown KL estimator 'k2'; known: k1, k3"):
    L.reverse_kl(S_B, S_B, 'k2')
  with pytest.raises(ValueError, match='clamp must be > 0'):
    L.reverse_kl(S_B, S_B, 'k1', clamp=0.)


@pytest.mark.parametrize('estimator, clamp', [('k1', None), ('k1', 0.7)])
def test_opd_advantage_routes_per_teacher(estimator, clamp):
  adv, kl = L.opd_advantage(S_B, T_J_UNSCORED, COEF, ROUTE, estimator=estimator, clamp=clamp)
  ref_adv, ref_kl = np_opd(S_B, T_J, COEF, ROUTE, estimator, clamp)
  assert adv.shape == (B, T) and kl.shape == (J, B, T)
  np.testing.assert_allclose(adv, ref_adv, **TOL)
  np.testing.assert_allclose(kl, ref_kl, **TOL)
  # NaN teacher logprobs of unscored records never leak; the unrouted record gets nothing.
  np.testing.assert_array_equal(adv[2], 0.)
  np.testing.assert_array_equal(np.asarray(kl)[ROUTE.T == 0], 0.)
  # Record 1 is routed to teacher 1 only: its advantage is −c_1 · kl_1.
  np.testing.assert_allclose(adv[1], -COEF[1] * np.asarray(kl[1, 1]), **TOL)


def test_opd_advantage_refuses_k3():
  with pytest.raises(ValueError, match=r"estimator 'k3' is not offered as an advantage"):
    L.opd_advantage(S_B, T_J, COEF, ROUTE, estimator='k3')


def _exact_policy_gradient(logits_V, q_V, advantage_fn):
  """E_{a~π}[A(a) ∇_logits log π(a)] by enumeration, in float64 NumPy, π = softmax(logits)."""
  z = logits_V - logits_V.max()
  p = np.exp(z) / np.exp(z).sum()
  grad_log_p_VxV = np.eye(len(p)) - p[None, :]      # row a: ∇ log π(a) w.r.t. the logits
  adv_V = advantage_fn(np.log(p), np.log(q_V))
  return (p[:, None] * adv_V[:, None] * grad_log_p_VxV).sum(0), p


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_k1_advantage_gradient_is_the_reverse_kl_gradient_and_k3_is_not(seed):
  """Exact enumeration over a 6-token vocabulary: with A = −kl(a), the expected policy
  gradient E[A ∇log π] is −∇KL(π‖q) for k1, and −∇[KL(π‖q) − KL(q‖π)] for k3."""
  rng = np.random.RandomState(seed)
  logits, q = rng.randn(6) * 1.5, rng.dirichlet(np.ones(6))

  def adv(name):
    return lambda logp, logq: -np.asarray(L.reverse_kl(logp.astype(np.float32),
                                                       logq.astype(np.float32), name), np.float64)
  g1, p = _exact_policy_gradient(logits, q, adv('k1'))
  g3, _ = _exact_policy_gradient(logits, q, adv('k3'))
  # Analytic gradients w.r.t. the logits: ∇KL(π‖q) = π ⊙ (c − E_π[c]), c = log π − log q;
  # ∇KL(q‖π) = π − q.
  c = np.log(p) - np.log(q)
  grad_rkl = p * (c - (p * c).sum())
  grad_fkl = p - q
  np.testing.assert_allclose(g1, -grad_rkl, atol=2e-6)
  np.testing.assert_allclose(g3, -(grad_rkl - grad_fkl), atol=2e-6)
  cos = g3 @ -grad_rkl / np.linalg.norm(g3) / np.linalg.norm(grad_rkl)
  assert cos < 0.99  # k3 points elsewhere


def test_opd_advantage_shape_errors():
  with pytest.raises(ValueError, match=r'route_BxJ has shape \(4, 2\); expected \(4, 3\)'):
    L.opd_advantage(S_B, T_J, COEF, ROUTE[:, :2])
  with pytest.raises(ValueError, match=r'kl_coef_J has shape \(2,\); expected \(3,\)'):
    L.opd_advantage(S_B, T_J, COEF[:2], ROUTE)
  with pytest.raises(ValueError, match='t_JxBxT has shape'):
    L.opd_advantage(S_B, T_J[:, :, :3], COEF, ROUTE)


def test_gopd_lambda_one_is_opd_exactly_whatever_the_reference():
  opd, opd_kl = L.opd_advantage(S_B, T_J_UNSCORED, COEF, ROUTE)
  for r in (R, 50. * R, np.zeros_like(R)):
    g, g_kl = L.gopd_advantage(S_B, T_J_UNSCORED, r, COEF, ROUTE, 1.)
    np.testing.assert_array_equal(g, opd)
    np.testing.assert_array_equal(g_kl, opd_kl)


@pytest.mark.parametrize('lam', [0.5, 1.25, 3.])
def test_gopd_matches_numpy_and_extrapolates_teacher_minus_reference(lam):
  g, _ = L.gopd_advantage(S_B, T_J_UNSCORED, R, COEF, ROUTE, lam)
  np.testing.assert_allclose(g, np_gopd(S_B, T_J, f64(R), COEF, ROUTE, lam), **TOL)
  g1, _ = L.gopd_advantage(S_B, T_J_UNSCORED, R, COEF, ROUTE, 1.)
  t_minus_r = np.einsum('j,bj,jbt->bt', f64(COEF), ROUTE, f64(T_J) - f64(R))
  np.testing.assert_allclose(np.asarray(g) - np.asarray(g1), (lam - 1.) * t_minus_r, **TOL)
  np.testing.assert_array_equal(g[2], 0.)


def test_mixed_advantage():
  outcome = RNG.randn(B).astype(np.float32)
  opd, _ = L.opd_advantage(S_B, T_J_UNSCORED, COEF, ROUTE)
  mixed = L.mixed_advantage(outcome, opd, MASK)
  np.testing.assert_allclose(mixed, (outcome[:, None] + f64(opd)) * MASK, **TOL)
  # the unrouted record keeps its outcome signal on its response tokens only
  np.testing.assert_allclose(mixed[3], (outcome[3] + f64(opd[3])) * MASK[3], **TOL)


def test_constants_get_no_gradient():
  def total(s_b, t, r, adv, tis):
    a, _ = L.opd_advantage(s_b, t, COEF, ROUTE, estimator='k1')
    g, _ = L.gopd_advantage(s_b, t, r, COEF, ROUTE, 2.)
    loss, _ = L.policy_loss(jnp.asarray(S), s_b, adv + a + g, MASK, tis_weight_BxT=tis)
    return jnp.sum(loss)
  grads = jit_grad(total, argnums=tuple(range(5)))(S_B, T_J, R, ADV, np.ones_like(S))
  for g in grads:
    np.testing.assert_array_equal(g, 0.)


# --------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize('level', ['token', 'sequence'])
@pytest.mark.parametrize('eps, eps_high', [(None, None), (0.2, None), (0.1, 0.3)])
@pytest.mark.parametrize('with_tis', [False, True])
def test_policy_loss_matches_numpy(level, eps, eps_high, with_tis):
  tis = L.truncated_is_weight(S_B, S_B + 0.2 * RNG.randn(B, T).astype(np.float32), 1.5)
  tis = np.asarray(tis) if with_tis else None
  loss, stats = L.policy_loss(S, S_B, ADV, MASK, clip_eps=eps, clip_eps_high=eps_high,
                              tis_weight_BxT=tis, ratio_level=level)
  ref_loss, ref_ratio, ref_clipped = np_policy_loss(S, S_B, ADV, MASK, eps, eps_high, tis,
                                                    level)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  on = MASK > 0
  np.testing.assert_allclose(np.asarray(stats['ratio_BxT'])[on], ref_ratio[on], **TOL)
  np.testing.assert_array_equal(stats['clipped_BxT'], ref_clipped)
  np.testing.assert_array_equal(np.asarray(loss)[~on], 0.)
  if eps is not None:
    assert 0 < ref_clipped.sum() < on.sum()  # the inputs exercise both branches


@pytest.mark.parametrize('cap', [0.8, 1.2, 5.0])
def test_truncated_is_policy_loss_matches_numpy(cap):
  """loss.tis_cap: value −min(ρ, C)·A and gradient −min(ρ, C)·A per response token, from
  NumPy; a token that left the kept set (s = −∞) has loss and gradient 0; padding too."""
  s = np.array(S, copy=True)
  s[0, 1] = -np.inf  # on the mask (LENGTHS[0] > 1)
  assert MASK[0, 1] > 0
  s_b = np.where(MASK > 0, S_B, np.nan).astype(np.float32)  # garbage off the mask

  def total(s_):
    loss, _ = L.truncated_is_policy_loss(s_, s_b, ADV, MASK, cap=cap)
    return jnp.sum(loss), loss
  (_, loss), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(s)
  on = MASK > 0
  rho = np.where(on, np.exp(f64(s) - np.where(on, f64(S_B), 0.)), 0.)
  want = np.where(on, -np.minimum(rho, cap) * ADV, 0.)
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(grad, want, **TOL)  # d(−w·exp(s − sg(s))·A)/ds = −w·A
  assert loss[0, 1] == 0 and grad[0, 1] == 0 and np.isfinite(np.asarray(grad)).all()
  _, stats = L.truncated_is_policy_loss(s, s_b, ADV, MASK, cap=cap)
  np.testing.assert_allclose(np.asarray(stats['ratio_BxT'])[on], rho[on], **TOL)
  np.testing.assert_array_equal(stats['truncated_BxT'], (rho > cap) & on)
  assert 0 < int(np.sum((rho > cap) & on)) < on.sum() or cap == 5.0
  with pytest.raises(ValueError, match='cap=0'):
    L.truncated_is_policy_loss(s, s_b, ADV, MASK, cap=0)


def test_truncated_is_weight():
  a, b = S_B, S_B + RNG.randn(B, T).astype(np.float32)
  np.testing.assert_allclose(L.truncated_is_weight(a, b, 2.),
                             np.minimum(np.exp(f64(a) - f64(b)), 2.), **TOL)


def test_policy_loss_ignores_garbage_off_the_mask():
  off = MASK == 0

  def bad(x, v):
    return np.where(off, v, x).astype(np.float32)

  args = (bad(S, np.nan), bad(S_B, -np.inf), bad(ADV, np.nan), MASK)
  for level in ('token', 'sequence'):
    def f(s, *rest, level=level):
      return jnp.sum(L.policy_loss(s, *rest, clip_eps=0.2, ratio_level=level)[0])

    clean = L.policy_loss(S, S_B, ADV, MASK, clip_eps=0.2, ratio_level=level)[0]
    dirty = L.policy_loss(*args, clip_eps=0.2, ratio_level=level)[0]
    np.testing.assert_array_equal(dirty, clean)
    g_dirty, g_clean = jit_grad(f)(*args), jit_grad(f)(S, S_B, ADV, MASK)
    np.testing.assert_array_equal(g_dirty, g_clean)
    np.testing.assert_array_equal(np.asarray(g_dirty)[off], 0.)


def _logit_setup(seed):
  """Per-token logits as the parameter; s = log_softmax(logits)[sampled]. Returns (logits,
  s_b, s_of(logits), ∇_logits s = onehot(sampled) − softmax, a function ρ(s_b))."""
  rng = np.random.RandomState(seed)
  logits = rng.randn(B, T, V).astype(np.float32)
  ids = rng.randint(0, V, size=(B, T))
  logp = np_log_softmax(logits)
  s_sampled = np.take_along_axis(logp, ids[..., None], -1)[..., 0]
  s_b = (s_sampled + 0.3 * rng.randn(B, T)).astype(np.float32)

  def s_of(lg):
    return jnp.take_along_axis(jax.nn.log_softmax(lg), ids[..., None], -1)[..., 0]

  return logits, s_b, s_of, np.eye(V)[ids] - np.exp(logp), lambda sb: np.exp(s_sampled - sb)


def _token_weights(mode):
  """w_ik such that the aggregated loss is Σ w_ik · loss_ik."""
  if mode == 'token-mean':
    return MASK / MASK.sum()
  n = MASK.sum(-1, keepdims=True)
  return np.where(n > 0, MASK / np.maximum(n, 1), 0.) / (n > 0).sum()


@pytest.mark.parametrize('mode', ['token-mean', 'seq-mean-token-mean'])
def test_policy_gradient_is_the_reinforce_form(mode):
  logits, s_b, s_of, ds, ratio = _logit_setup(1)
  rho = ratio(s_b)

  def objective(lg):
    loss, _ = L.policy_loss(s_of(lg), s_b, ADV, MASK)
    return L.finalize(*L.aggregate(loss, MASK, mode))

  grad = jit_grad(objective)(logits)
  expected = -(_token_weights(mode) * f64(ADV) * rho)[..., None] * ds
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert np.abs(expected).max() > 1e-2


def test_clipped_tokens_get_zero_gradient():
  logits, s_b, s_of, ds, ratio = _logit_setup(2)
  adv = np.where(RNG.rand(B, T) < 0.5, 1., -1.).astype(np.float32)
  eps = 0.1
  # Move some ratios to exp(±0.5), outside [1 − ε, 1 + ε] on the side that clips for their A.
  push = RNG.rand(B, T) < 0.4
  s_b = np.where(push, s_b + np.log(ratio(s_b)) - np.sign(adv) * 0.5, s_b).astype(np.float32)
  rho = ratio(s_b)

  def objective(lg):
    loss, stats = L.policy_loss(s_of(lg), s_b, adv, MASK, clip_eps=eps)
    return L.finalize(*L.aggregate(loss, MASK)), stats

  grad, stats = jit_grad(objective, has_aux=True)(logits)
  clipped = np.asarray(stats['clipped_BxT'])
  expect_clipped = (MASK > 0) & (((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps)))
  np.testing.assert_array_equal(clipped, expect_clipped)
  assert 0 < clipped.sum() < (MASK > 0).sum()
  np.testing.assert_array_equal(np.asarray(grad)[clipped], 0.)
  expected = -(_token_weights('token-mean') * adv * rho * ~clipped)[..., None] * ds
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_gspo_gradient_flows_through_the_sequence_mean():
  def objective(s):
    loss, _ = L.policy_loss(s, S_B, ADV, MASK, ratio_level='sequence')
    return L.finalize(*L.aggregate(loss, MASK))

  grad = jit_grad(objective)(S)
  w = _token_weights('token-mean')
  expected = np.zeros((B, T))
  for i in range(B):
    on = MASK[i] > 0
    if on.any():
      rho_i = np.exp((f64(S[i][on]) - S_B[i][on]).mean())
      # ∂ρ_i/∂s_ik = ρ_i · m_ik / n_i for every response token k of sequence i
      expected[i][on] = -rho_i / on.sum() * (w[i] * ADV[i]).sum()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_policy_loss_errors_and_jit():
  with pytest.raises(ValueError, match='clip_eps_high is set but clip_eps is None'):
    L.policy_loss(S, S_B, ADV, MASK, clip_eps_high=0.3)
  with pytest.raises(ValueError, match="unknown ratio_level 'seq'; known: sequence, token"):
    L.policy_loss(S, S_B, ADV, MASK, ratio_level='seq')
  with pytest.raises(ValueError, match=r'adv_BxT has shape \(4, 3\); expected \(4, 7\)'):
    L.policy_loss(S, S_B, ADV[:, :3], MASK)
  f = jax.jit(functools.partial(L.policy_loss, clip_eps=0.2, ratio_level='sequence'))
  np.testing.assert_allclose(f(S, S_B, ADV, MASK)[0],
                             np_policy_loss(S, S_B, ADV, MASK, 0.2, level='sequence')[0], **TOL)


def test_importance_metrics():
  ratio = np.exp(f64(S) - S_B)
  clipped = np.abs(ratio - 1) > 0.2
  got = L.importance_metrics(ratio.astype(np.float32), clipped, MASK)
  on = MASK > 0
  np.testing.assert_allclose(got['ratio_mean'], ratio[on].mean(), **TOL)
  np.testing.assert_allclose(got['ratio_min'], ratio[on].min(), **TOL)
  np.testing.assert_allclose(got['ratio_max'], ratio[on].max(), **TOL)
  np.testing.assert_allclose(got['clip_frac'], (clipped & on).sum() / on.sum(), **TOL)
  empty = L.importance_metrics(ratio, clipped, np.zeros_like(MASK))
  assert {k: float(v) for k, v in empty.items()} == {
      'ratio_mean': 1., 'ratio_min': 1., 'ratio_max': 1., 'clip_frac': 0.}


# --------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize('mode', ['token-mean', 'seq-mean-token-mean'])
def test_aggregate_matches_numpy_and_micro_batches_add_up(mode):
  loss = RNG.randn(B, T).astype(np.float32)
  loss_padded = np.where(MASK > 0, loss, np.nan).astype(np.float32)  # padding is ignored
  agg = jitted(L.aggregate, mode=mode)
  total, count = agg(loss_padded, MASK)
  ref_total, ref_count = np_aggregate(loss, MASK, mode)
  np.testing.assert_allclose(total, ref_total, **TOL)
  assert float(count) == ref_count
  for splits in ([1, 3], [2], [1, 2, 3]):  # micro-batches along B, one of them all-padding
    parts = [agg(l, m) for l, m in zip(np.split(loss_padded, splits),
                                                     np.split(MASK, splits))]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(total), **TOL)
    assert sum(float(p[1]) for p in parts) == float(count)
    np.testing.assert_allclose(
        L.finalize(sum(p[0] for p in parts), sum(p[1] for p in parts)),
        ref_total / ref_count, **TOL)


def test_finalize_of_an_empty_batch_is_zero():
  for mode in L.AGGREGATIONS:
    assert float(L.finalize(*L.aggregate(ADV, np.zeros_like(MASK), mode))) == 0.
  with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
    L.aggregate(ADV, MASK, 'mean')


# ------------------------------------------------------------ full-vocabulary and top-k
N = 6  # positions
LOGP_S = np.asarray(jax.nn.log_softmax(RNG.randn(N, V).astype(np.float32)))
LOGP_T = np.asarray(jax.nn.log_softmax(2. * RNG.randn(N, V).astype(np.float32)))


@pytest.mark.parametrize('name, beta', [('forward_kl', None), ('reverse_kl', None),
                                        ('jsd', 0.), ('jsd', 0.1), ('jsd', 0.5),
                                        ('jsd', 0.9), ('jsd', 1.)])
def test_full_vocab_losses_match_numpy(name, beta):
  kw = {} if beta is None else {'beta': beta}
  loss = jitted(L.full_vocab_loss, name, **kw)
  got = np.asarray(loss(LOGP_S, LOGP_T))
  np.testing.assert_allclose(got, np_full_loss(name, LOGP_S, LOGP_T, beta), **TOL)
  assert got.shape == (N,) and np.all(got > 0.)
  np.testing.assert_allclose(loss(LOGP_T, LOGP_T), 0., atol=1e-6)
  grad = jit_grad(lambda s: jnp.sum(L.full_vocab_loss(name, s, LOGP_T, **kw)))(LOGP_S)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-3


def test_jsd_endpoints_and_symmetry():
  # TRL's endpoints: β = 0 forward KL, β = 1 reverse KL; β = 0.5 symmetric in its arguments.
  np.testing.assert_allclose(L.generalized_jsd(LOGP_S, LOGP_T, 0.),
                             L.forward_kl(LOGP_S, LOGP_T), **TOL)
  np.testing.assert_allclose(L.generalized_jsd(LOGP_S, LOGP_T, 1.),
                             L.reverse_kl_full(LOGP_S, LOGP_T), **TOL)
  np.testing.assert_allclose(L.generalized_jsd(LOGP_S, LOGP_T, 0.5),
                             L.generalized_jsd(LOGP_T, LOGP_S, 0.5), **TOL)
  assert np.all(np.asarray(L.generalized_jsd(LOGP_S, LOGP_T, 0.5)) <= np.log(2.) + 1e-6)
  with pytest.raises(ValueError, match='beta must be in'):
    L.generalized_jsd(LOGP_S, LOGP_T, 1.5)
  with pytest.raises(ValueError, match=r"unknown full-vocabulary loss 'kl'; known: forward_kl"):
    L.full_vocab_loss('kl', LOGP_S, LOGP_T)


def test_full_vocab_losses_with_masked_vocabulary_entries():
  # a -inf logprob (e.g. a padded vocabulary slot) in both: its terms are 0, not NaN
  s = LOGP_S.copy()
  t = LOGP_T.copy()
  s[:, -1] = t[:, -1] = -np.inf
  s = np.asarray(jax.nn.log_softmax(s))
  t = np.asarray(jax.nn.log_softmax(t))
  for name in L.FULL_VOCAB_LOSSES:
    got = L.full_vocab_loss(name, s, t)
    np.testing.assert_allclose(got, np_full_loss(name, s[:, :-1], t[:, :-1]), **TOL)
    grad = jit_grad(lambda x: jnp.sum(L.full_vocab_loss(name, x, t)))(s)
    assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(L.entropy_from_logp(s), -(np.exp(f64(s[:, :-1])) *
                                                       s[:, :-1]).sum(-1), **TOL)
  assert np.all(np.isfinite(jit_grad(lambda x: jnp.sum(L.entropy_from_logp(x)))(s)))


def test_entropy():
  np.testing.assert_allclose(L.entropy_from_logp(LOGP_S),
                             -(np.exp(f64(LOGP_S)) * LOGP_S).sum(-1), **TOL)
  np.testing.assert_allclose(L.entropy_from_logp(np.full((2, V), -np.log(V), np.float32)),
                             np.log(V), **TOL)


def _teacher_topk(k):
  ids = np.argsort(-LOGP_T, axis=-1)[:, :k]
  return ids, np.take_along_axis(LOGP_T, ids, -1)


def test_with_tail_matches_numpy_and_is_stable():
  _, top = _teacher_topk(4)
  with_tail = jax.jit(L.with_tail)
  np.testing.assert_allclose(with_tail(top), np_with_tail(top), **TOL)
  np.testing.assert_allclose(np.exp(f64(with_tail(top))).sum(-1), 1., atol=1e-6)
  # K = V: the tail is ~0 mass (floored at 1e-12, never log(0) or log of a negative).
  full_tail = np.asarray(with_tail(LOGP_T))[:, -1]
  assert np.all(np.isfinite(full_tail)) and np.all(np.exp(full_tail) < 1e-6)
  over = np.log(np.full((1, 3), 0.34, np.float32))  # Σ p = 1.02 > 1 from rounding upstream
  assert np.isfinite(np.asarray(with_tail(over))[0, -1])
  for x in (LOGP_T, over, np.full((1, 3), -30., np.float32)):  # K = V, Σ p > 1, Σ p ≈ 0
    grads = jit_grad(lambda x: jnp.sum(L.with_tail(x)[..., -1]))(x)
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize('name, kw', [('forward_kl', {}), ('reverse_kl', {}),
                                      ('jsd', {'beta': 0.5}), ('jsd', {'beta': 0.2})])
def test_topk_losses(name, kw):
  beta = kw.get('beta', 0.5)
  # K = V: the same as the full-vocabulary loss.
  ids, top_t = _teacher_topk(V)
  topk_loss = jitted(L.topk_loss, name, **kw)
  full = jitted(L.full_vocab_loss, name, **kw)(LOGP_S, LOGP_T)
  np.testing.assert_allclose(topk_loss(L.gather_topk(LOGP_S, ids), top_t), full, **TOL)
  # K < V: the tail bucket on both sides, against NumPy; not the renormalised top-k loss.
  ids, top_t = _teacher_topk(3)
  top_s = np.asarray(L.gather_topk(LOGP_S, ids))
  np.testing.assert_array_equal(top_s, np.take_along_axis(LOGP_S, ids, -1))
  got = np.asarray(topk_loss(top_s, top_t))
  np.testing.assert_allclose(got, np_full_loss(name, np_with_tail(top_s), np_with_tail(top_t),
                                               beta), **TOL)
  renorm = lambda x: f64(x) - np.log(np.exp(f64(x)).sum(-1, keepdims=True))  # noqa: E731
  renormalised = np_full_loss(name, renorm(top_s), renorm(top_t), beta)
  assert np.abs(got - renormalised).max() > 1e-2
  grad = jit_grad(lambda s: jnp.sum(L.topk_loss(name, s, top_t, **kw)))(top_s)
  assert np.all(np.isfinite(grad))
  grad_t = jit_grad(lambda t: jnp.sum(L.topk_loss(name, top_s, t, **kw)))(top_t)
  np.testing.assert_array_equal(grad_t, 0.)


# ------------------------------------- exact / student-top-k divergences, streamed in chunks
def _np_logits_setup(seed, b=2, t=5, v=37, d=8, dt=6):
  rng = np.random.RandomState(seed)
  return (rng.randn(b, t, d).astype(np.float32), rng.randn(v, d).astype(np.float32),
          rng.randn(b, t, dt).astype(np.float32), rng.randn(v, dt).astype(np.float32))


def np_streamed_reference(option, x_s, x_t, beta, k):
  """The option's loss per position from tempered logits [..., V], float64 NumPy."""
  ls, lt = np_log_softmax(x_s), np_log_softmax(x_t)
  if option == 'reverse_kl_student_topk':
    ids = np.argsort(-ls, axis=-1)[..., :k]
    return np_kl_full(np_with_tail(np.take_along_axis(ls, ids, -1)),
                      np_with_tail(np.take_along_axis(lt, ids, -1)))
  return np_full_loss(L.EXACT_OPTIONS[option], ls, lt, beta)


def np_grad_logits(option, x_s, x_t, beta, k, eps=1e-5):
  """∂ Σ loss / ∂ x_s by central differences in float64 (the top-k set is locally constant
  for these random logits), checked against the closed forms where there is one."""
  g = np.zeros_like(x_s)
  flat, gflat = x_s.reshape(-1, x_s.shape[-1]), g.reshape(-1, x_s.shape[-1])
  xt = x_t.reshape(flat.shape[0], -1)
  for i in range(flat.shape[0]):
    for j in range(flat.shape[1]):
      up, dn = flat[i].copy(), flat[i].copy()
      up[j] += eps
      dn[j] -= eps
      gflat[i, j] = (np_streamed_reference(option, up, xt[i], beta, k)
                     - np_streamed_reference(option, dn, xt[i], beta, k)) / (2 * eps)
  ps, pt = np.exp(np_log_softmax(x_s)), np.exp(np_log_softmax(x_t))
  if option == 'forward_kl_exact':    # ∇ KL(p_t ‖ p_s) = p_s − p_t
    np.testing.assert_allclose(g, ps - pt, atol=1e-7)
  if option == 'reverse_kl_exact':    # ∇ KL(p_s ‖ p_t) = p_s ⊙ (c − E_ps[c]), c = log p_s/p_t
    c = np_log_softmax(x_s) - np_log_softmax(x_t)
    np.testing.assert_allclose(g, ps * (c - (ps * c).sum(-1, keepdims=True)), atol=1e-7)
  return g


STREAMED = ['reverse_kl_exact', 'forward_kl_exact', 'jsd_exact', 'reverse_kl_student_topk']


@pytest.mark.parametrize('option', STREAMED)
@pytest.mark.parametrize('vocab_chunk', [None, 5])  # one chunk; many, a ragged last one
def test_streamed_divergence_matches_numpy_with_gradients(option, vocab_chunk):
  h_s, w_s, h_t, w_t = _np_logits_setup(0)
  temp, beta, k = 1.3, 0.3, 4
  fn = functools.partial(L.streamed_divergence, option, temperature=temp, beta=beta, top_k=k,
                         chunk_size=2, vocab_chunk=vocab_chunk)  # T = 5: a padded last chunk
  got = jax.jit(fn)(h_s, w_s, h_t, w_t)
  x_s, x_t = f64(h_s) @ f64(w_s).T / temp, f64(h_t) @ f64(w_t).T / temp
  np.testing.assert_allclose(got, np_streamed_reference(option, x_s, x_t, beta, k),
                             rtol=1e-5, atol=2e-6)
  g_h, g_w, g_ht, g_wt = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3)))(
      h_s, w_s, h_t, w_t)
  g_x = np_grad_logits(option, x_s, x_t, beta, k) / temp  # chain rule through x = h wᵀ / T
  np.testing.assert_allclose(g_h, g_x @ f64(w_s), rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(g_w, np.einsum('btv,btd->vd', g_x, f64(h_s)), rtol=1e-4, atol=2e-6)
  np.testing.assert_array_equal(g_ht, 0.)   # the teacher is a constant
  np.testing.assert_array_equal(g_wt, 0.)


def test_streamed_divergence_equals_the_unchunked_losses():
  """The streamed options are full_vocab_loss / topk_loss of the full log-softmaxes."""
  h_s, w_s, h_t, w_t = _np_logits_setup(1, b=3, t=4, v=50)
  ls = jax.nn.log_softmax(h_s @ w_s.T)
  lt = jax.nn.log_softmax(h_t @ w_t.T)
  for option, name in L.EXACT_OPTIONS.items():
    np.testing.assert_allclose(
        jax.jit(functools.partial(L.streamed_divergence, option, vocab_chunk=16))(
            h_s, w_s, h_t, w_t), L.full_vocab_loss(name, ls, lt), rtol=1e-5, atol=2e-6)
  # K = V: the student's top-k is the whole vocabulary, the same as the exact reverse KL
  got = jax.jit(functools.partial(L.streamed_divergence, 'reverse_kl_student_topk', top_k=50,
                                  vocab_chunk=16))(h_s, w_s, h_t, w_t)
  np.testing.assert_allclose(got, L.reverse_kl_full(ls, lt), rtol=1e-5, atol=2e-6)


def test_streamed_divergence_errors():
  h_s, w_s, h_t, w_t = _np_logits_setup(0)
  with pytest.raises(ValueError, match="unknown option 'reverse_kl'"):
    L.streamed_divergence('reverse_kl', h_s, w_s, h_t, w_t)
  with pytest.raises(ValueError, match=r'teacher_w_VxD has shape \(36, 6\); expected \(37, 6\)'):
    L.streamed_divergence('jsd_exact', h_s, w_s, h_t, w_t[:-1])
  assert set(L.FULL_VOCAB_OPTIONS) == set(L.TOPK_OPTIONS) | set(STREAMED)
  assert all(L.needs_teacher_hidden(o) for o in STREAMED)
  assert not any(L.needs_teacher_hidden(o) for o in (None, *L.TOPK_OPTIONS))
  assert L.streamed_chunk_sizes(8, 1024, 151_936) == (256, 8192)  # 64 MiB fp32 blocks


@pytest.mark.parametrize('option', STREAMED)
def test_streamed_divergence_memory_is_bounded_at_a_real_vocabulary(option):
  """value_and_grad at V = 151,936, B = 8, T = 1,024 (a small hidden size): the compiled
  program's temporaries stay near a few [B, C, Vc] blocks and weight-sized gradient buffers,
  far below the 4.98 GB of fp32 [B, T, V] logits (abstract shapes: nothing is allocated)."""
  b, t, v, d = 8, 1024, 151_936, 32
  f = jax.jit(jax.value_and_grad(
      lambda h, w, ht, wt: jnp.sum(L.streamed_divergence(option, h, w, ht, wt)),
      argnums=(0, 1)))
  sds = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, t, d), (v, d), (b, t, d), (v, d))]
  mem = f.lower(*sds).compile().memory_analysis()
  full_logits = b * t * v * 4
  peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
  assert peak < 2**30, (option, peak / 2**20)       # measured 0.3-0.6 GiB
  assert peak < full_logits / 5


# ---------------------------------- full-vocabulary terms against the truncated policy
def np_truncated_log_softmax(x, top_k, top_p):
  """log π of docs/design.md §3.2 in float64 over the last axis: tempered logits x, top-k
  (ties kept), then the smallest prefix by descending probability whose mass reaches top_p;
  −inf off the kept set."""
  x = f64(x)
  out = np.full(x.shape, -np.inf)
  for idx in np.ndindex(x.shape[:-1]):
    row = x[idx]
    keep = np.ones(row.shape, bool)
    if top_k and top_k < row.size:
      keep &= row >= np.sort(row)[-top_k]
    if top_p < 1.0:
      order = np.argsort(-np.where(keep, row, -np.inf), kind='stable')
      p = np.exp(np.where(keep, row, -np.inf)[order] - row[keep].max())
      p /= p.sum()
      kept_sorted = np.cumsum(p) - p < top_p
      k2 = np.zeros_like(keep)
      k2[order] = kept_sorted
      keep &= k2
    z = row[keep]
    out[idx][keep] = z - z.max() - np.log(np.exp(z - z.max()).sum())
  return out


def np_kl_support(logp, logq):  # KL(p ‖ q), only over the entries where p > 0
  logp, logq = f64(logp), f64(logq)
  live = np.isfinite(logp)
  return np.where(live, np.exp(logp) * (np.where(live, logp, 0.) - logq), 0.).sum(-1)


def np_divergence_truncated(option, x_s, x_t, top_k, top_p, beta, k):
  """`option` between the truncated student policy π and the untruncated teacher q."""
  ls, lt = np_truncated_log_softmax(x_s, top_k, top_p), np_log_softmax(x_t)
  name = {**L.EXACT_OPTIONS, **L.STUDENT_TOPK_OPTIONS}.get(option, option)
  if option == 'reverse_kl_student_topk':
    ids = np.argsort(-ls, axis=-1, kind='stable')[..., :k]

    def tail(a):  # 0 mass (−inf) when the kept set lies inside the top k
      with np.errstate(divide='ignore'):
        return np.concatenate([a, np.log(np.maximum(1. - np.exp(a).sum(-1, keepdims=True),
                                                    0.))], -1)
    ls, lt = (tail(np.take_along_axis(a, ids, -1)) for a in (ls, lt))
  if name == 'reverse_kl':
    return np_kl_support(ls, lt)
  log_m = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
  return beta * np_kl_support(lt, log_m) + (1 - beta) * np_kl_support(ls, log_m)


TRUNCATIONS = [(5, 1.0), (0, 0.8), (8, 0.9)]


@pytest.mark.parametrize('top_k, top_p', TRUNCATIONS)
@pytest.mark.parametrize('option', ['reverse_kl_exact', 'jsd_exact', 'reverse_kl_student_topk'])
def test_streamed_divergence_of_the_truncated_policy_matches_numpy(option, top_k, top_p):
  """With the policy's kept set (as policy.keep_threshold's cut) the streamed divergences
  are those of the truncated, renormalised student against the untruncated teacher, value
  and gradient, with vocabulary chunks that split the kept set."""
  from opd_jax import policy as policy_lib
  h_s, w_s, h_t, w_t = _np_logits_setup(3)
  temp, beta, k = 1.3, 0.3, 4
  x_s, x_t = f64(h_s) @ f64(w_s).T / temp, f64(h_t) @ f64(w_t).T / temp
  keep_min = policy_lib.keep_threshold(
      jax.nn.log_softmax(jnp.asarray(x_s, jnp.float32)), top_k, top_p)
  fn = functools.partial(L.streamed_divergence, option, temperature=temp, beta=beta, top_k=k,
                         chunk_size=2, vocab_chunk=5, keep_min_BxT=keep_min)
  got = jax.jit(fn)(h_s, w_s, h_t, w_t)
  want = np_divergence_truncated(option, x_s, x_t, top_k, top_p, beta, k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  untruncated = np_streamed_reference(option, x_s, x_t, beta, k)
  assert np.abs(want - untruncated).max() > 1e-2  # the truncation matters here
  g_h, g_w = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1)))(h_s, w_s, h_t, w_t)
  # ∂/∂x_s by central differences in float64, the kept set fixed (locally constant)
  eps, g_x = 1e-5, np.zeros_like(x_s)
  for idx in np.ndindex(x_s.shape):
    up, dn = x_s.copy(), x_s.copy()
    up[idx] += eps
    dn[idx] -= eps
    pos = idx[:2]
    g_x[idx] = (np_divergence_truncated(option, up[pos], x_t[pos], top_k, top_p, beta, k)
                - np_divergence_truncated(option, dn[pos], x_t[pos], top_k, top_p, beta, k)
                ) / (2 * eps)
  g_x /= temp
  np.testing.assert_allclose(g_h, g_x @ f64(w_s), rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(g_w, np.einsum('btv,btd->vd', g_x, f64(h_s)), rtol=1e-4, atol=2e-6)


def test_forward_kl_is_refused_against_a_truncated_policy():
  h_s, w_s, h_t, w_t = _np_logits_setup(0)
  keep_min = jnp.full(h_s.shape[:2], -3.)
  for option, beta in (('forward_kl_exact', 0.5), ('jsd_exact', 0.0)):
    with pytest.raises(ValueError, match='infinite against a truncated student'):
      L.streamed_divergence(option, h_s, w_s, h_t, w_t, beta=beta, keep_min_BxT=keep_min)
  assert L.refuses_truncation('forward_kl') and L.refuses_truncation('jsd', 0.0)
  assert not any(L.refuses_truncation(o) for o in ('reverse_kl', 'jsd', 'reverse_kl_exact',
                                                   'jsd_exact', 'reverse_kl_student_topk'))


@pytest.mark.parametrize('option', ['reverse_kl_exact', 'jsd_exact', 'reverse_kl_student_topk'])
def test_streamed_divergence_of_a_truncated_policy_keeps_its_memory_bound(option):
  """The truncated student (a cut per position, a forward-only normaliser pass, a −inf
  where per block) stays within the untruncated bound at V = 151,936, B = 8, T = 1,024."""
  b, t, v, d = 8, 1024, 151_936, 32
  f = jax.jit(jax.value_and_grad(
      lambda h, w, ht, wt, keep: jnp.sum(L.streamed_divergence(option, h, w, ht, wt,
                                                               keep_min_BxT=keep)),
      argnums=(0, 1)))
  sds = [jax.ShapeDtypeStruct(s, jnp.float32)
         for s in ((b, t, d), (v, d), (b, t, d), (v, d), (b, t))]
  mem = f.lower(*sds).compile().memory_analysis()
  peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
  assert peak < 2**30, (option, peak / 2**20)
  assert peak < b * t * v * 4 / 5


@pytest.mark.parametrize('name', ['reverse_kl', 'jsd'])
def test_topk_loss_of_a_truncated_student_with_no_kept_token_among_the_teachers(name):
  """A truncated student whose kept tokens are all outside the teacher's top-k: its K
  entries are −inf and its tail holds all its mass; value and gradient are finite (the
  logsumexp of an all −inf row used to make the gradient NaN)."""
  teacher = jnp.log(jnp.asarray([[0.5, 0.3, 0.1]]))
  student = jnp.asarray([[-jnp.inf, -jnp.inf, -jnp.inf]])
  np.testing.assert_array_equal(L.with_tail(student), [[-np.inf, -np.inf, -np.inf, 0.]])
  value, grad = jax.value_and_grad(lambda s: jnp.sum(L.topk_loss(name, s, teacher)))(student)
  tail_t = np.log(0.1)
  want = -tail_t if name == 'reverse_kl' else (
      0.5 * 0.9 * np.log(2) + 0.5 * 0.1 * np.log(0.1 / (0.5 * 0.1 + 0.5))
      + 0.5 * np.log(1. / (0.5 * 0.1 + 0.5)))
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('with_outcome', [False, True])
def test_constant_advantage_mode(with_outcome):
  """The no-teacher control (config.rl.constant_advantage): the constant on every response
  token, 0 off the mask, the outcome advantage added per row; the teachers' values and the
  route are ignored, and the policy-loss gradient is −c times that of Σ log π on the sampled
  tokens (token-mean), checked against a NumPy softmax reference."""
  from opd_jax.objectives import advantages as token_adv
  outcome = RNG.randn(B).astype(np.float32) if with_outcome else None
  adv, _, _ = token_adv.advantages(jnp.asarray(S_B), jnp.asarray(T_J), None, jnp.asarray(COEF),
                                   jnp.asarray(ROUTE), jnp.asarray(MASK),
                                   None if outcome is None else jnp.asarray(outcome),
                                   mode='constant', constant=-1.0)
  want = -1.0 * MASK + (0.0 if outcome is None else outcome[:, None] * MASK)
  np.testing.assert_allclose(np.asarray(adv), want, **TOL)
  with pytest.raises(ValueError, match="needs `constant`"):
    token_adv.advantages(jnp.asarray(S_B), jnp.asarray(T_J), None, jnp.asarray(COEF),
                         jnp.asarray(ROUTE), jnp.asarray(MASK), None, mode='constant')


def test_constant_negative_advantage_pushes_sampled_tokens_down():
  """On fresh samples (ratio 1) the policy loss with A = −1 has the gradient of
  +mean log π(sampled token): one SGD step lowers every sampled token's probability
  (NumPy reference of the log-softmax gradient)."""
  logits = RNG.randn(5, V).astype(np.float64)
  tok = RNG.randint(0, V, size=5)

  def lp(x):
    return jax.nn.log_softmax(x)[jnp.arange(5), tok]

  def loss(x):  # the project's policy loss and aggregation, advantage −1 on every token
    s = lp(x)[:, None]
    m = jnp.ones_like(s)
    per = L.policy_loss(s, jax.lax.stop_gradient(s), jnp.full_like(s, -1.0), m)[0]
    return L.finalize(*L.aggregate(per, m))

  g = np.asarray(jax.grad(loss)(jnp.asarray(logits, jnp.float32)))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(V)[tok]
  np.testing.assert_allclose(g, (onehot - p) / 5, rtol=1e-4, atol=1e-6)
  new = logits - 1.0 * g
  newp = np.exp(new - new.max(1, keepdims=True))
  newp /= newp.sum(1, keepdims=True)
  assert (newp[np.arange(5), tok] < p[np.arange(5), tok]).all()
