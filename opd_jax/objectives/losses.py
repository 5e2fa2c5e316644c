"""The OPD math (docs/design.md §3): per-token reverse-KL estimates, advantages (pure
OPD, mixed, G-OPD), the importance-sampled policy loss, (sum, count) aggregation, and
full-vocabulary / top-k distillation losses.

Dimension legend (used in names):
  B sequences, T token positions (response tokens), J teachers, V vocabulary,
  K top-k entries. A leading `x` means "any leading shape, then": `logp_xV` is [..., V].

Per response token: s = student logprob of the sampled token under the current parameters
(the only differentiable input), s_b = the same under the behaviour (rollout) parameters,
t_j = teacher j's logprob, r = the reference model's logprob, m = response mask (1 on response
tokens). Behaviour, teacher and reference values are constants: every function stops their
gradients itself, so no caller can leak a gradient into a frozen model by accident.
Logprobs are natural-log nats; pass float32 (bf16 rounds a logprob to ~0.01-0.1 nats, the
size of the KL being estimated). String and None options are static under jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_sg = jax.lax.stop_gradient


def _lookup(registry, kind, name):
  if name not in registry:
    raise ValueError(f'unknown {kind} {name!r}; known: {", ".join(sorted(registry))}')
  return registry[name]


def _expect_shape(name, x, shape):
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} has shape {tuple(x.shape)}; expected {tuple(shape)}')


# --------------------------------------------------------------------- per-token reverse KL
def _k1(s_b, t):
  return s_b - t


def _k3(s_b, t):
  d = t - s_b
  return jnp.expm1(d) - d  # exp(d) - d - 1; expm1 keeps it accurate (and >= 0) near d = 0


# Both are unbiased estimates of KL(p_student ‖ p_teacher) on tokens sampled from the
# student; k1 is negative on some tokens, k3 is >= 0 with lower variance when p_t ≈ p_s.
KL_ESTIMATORS = {'k1': _k1, 'k3': _k3}
# As a policy-gradient reward −kl(a), only k1 gives E_a~π[kl(a) ∇log π(a)] = ∇KL(π‖q).
# k3(a) = q/π − log(q/π) − 1, and E_π[(q/π) ∇log π] = Σ_a q ∇log π = −∇KL(q‖π), so
# E_π[k3 ∇log π] = ∇KL(π‖q) − ∇KL(q‖π): k3 serves metrics only (docs/design.md §3.1).
ADVANTAGE_ESTIMATORS = ('k1',)


def reverse_kl(s_b_BxT, t_BxT, estimator='k1', clamp=None):
  """Per-token estimate of the reverse KL(student ‖ teacher) at the sampled token, in nats.

  s_b_BxT, t_BxT: [...] behaviour and teacher logprobs of the sampled tokens (broadcastable).
  estimator: a key of KL_ESTIMATORS ('k1': s_b − t; 'k3': exp(t − s_b) − (t − s_b) − 1).
  clamp: None, or c > 0 to clip each estimate to [−c, c] (guards against a teacher that puts
    ~0 mass on a sampled token).
  Returns kl [...] (no gradient: both inputs are constants).
  """
  fn = _lookup(KL_ESTIMATORS, 'KL estimator', estimator)
  kl = fn(_sg(s_b_BxT), _sg(t_BxT))
  if clamp is not None:
    if clamp <= 0:
      raise ValueError(f'reverse_kl: clamp must be > 0 or None, got {clamp}')
    kl = jnp.clip(kl, -clamp, clamp)
  return kl


# ------------------------------------------------------------------------------ advantages
def _teacher_weights(s_b_BxT, t_JxBxT, kl_coef_J, route_BxJ):
  """(c_j · route_ij as [J, B, 1], routed mask [J, B, 1]) after checking every shape."""
  if s_b_BxT.ndim != 2:
    raise ValueError(f's_b_BxT must be [B, T]; got shape {tuple(s_b_BxT.shape)}')
  b, _ = s_b_BxT.shape
  j = t_JxBxT.shape[0]
  _expect_shape('t_JxBxT', t_JxBxT, (j, *s_b_BxT.shape))
  _expect_shape('route_BxJ', route_BxJ, (b, j))
  kl_coef_J = jnp.asarray(kl_coef_J, s_b_BxT.dtype)
  _expect_shape('kl_coef_J', kl_coef_J, (j,))
  route_JxB = _sg(jnp.asarray(route_BxJ)).T
  weight_JxBx1 = (kl_coef_J[:, None] * route_JxB.astype(s_b_BxT.dtype))[:, :, None]
  return weight_JxBx1, (route_JxB != 0)[:, :, None]


def opd_advantage(s_b_BxT, t_JxBxT, kl_coef_J, route_BxJ, *, estimator='k1', clamp=None):
  """Pure-OPD advantage A = −Σ_j c_j · route_ij · kl_j per token (docs/design.md §3.3).

  s_b_BxT: [B, T] behaviour logprobs; t_JxBxT: [J, B, T] teacher logprobs (any value, even NaN,
    where teacher j is not routed record i: a teacher never scores records routed away from
    it); kl_coef_J: [J] per-teacher coefficients c_j; route_BxJ: [B, J] 1 where teacher j
    handles record i, else 0. A record routed to no teacher gets A = 0.
  estimator, clamp: as in reverse_kl.
  Returns (adv_BxT [B, T] nats, kl_JxBxT [J, B, T] per-teacher estimates, 0 where unrouted).
  """
  if estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(
        f'opd_advantage: estimator {estimator!r} is not offered as an advantage (offered: '
        f'{", ".join(ADVANTAGE_ESTIMATORS)}). k3 estimates the KL value without bias, but its '
        'expected policy gradient is that of KL(π‖q) − KL(q‖π), not of KL(π‖q); use it for '
        'metrics (reverse_kl)')
  weight_JxBx1, routed_JxBx1 = _teacher_weights(s_b_BxT, t_JxBxT, kl_coef_J, route_BxJ)
  kl_JxBxT = reverse_kl(s_b_BxT[None], t_JxBxT, estimator, clamp)
  # Select rather than multiply: 0 * NaN from an unscored record would poison A.
  kl_JxBxT = jnp.where(routed_JxBx1, kl_JxBxT, 0.)
  return -jnp.sum(weight_JxBx1 * kl_JxBxT, axis=0), kl_JxBxT


def gopd_advantage(s_b_BxT, t_JxBxT, r_BxT, kl_coef_J, route_BxJ, reward_scale):
  """G-OPD advantage (arXiv 2602.12125): Σ_j c_j · route_ij · [λ(t_j − r) − (s_b − r)].

  s_b_BxT, r_BxT: [B, T] behaviour and reference logprobs; t_JxBxT, kl_coef_J, route_BxJ: as
  in opd_advantage; reward_scale: λ (1 = pure OPD with k1 whatever r is; > 1 = ExOPD, reward
  extrapolation).
  Returns (adv_BxT [B, T] nats, kl_JxBxT [J, B, T] k1 estimates s_b − t_j, 0 where unrouted).
  """
  _expect_shape('r_BxT', r_BxT, s_b_BxT.shape)
  weight_JxBx1, routed_JxBx1 = _teacher_weights(s_b_BxT, t_JxBxT, kl_coef_J, route_BxJ)
  s_b, t, r = _sg(s_b_BxT), _sg(t_JxBxT), _sg(r_BxT)
  # λ(t − r) − (s_b − r) written as (t − s_b) + (λ − 1)(t − r): at λ = 1 the second term is
  # exactly 0, so G-OPD reproduces OPD bit for bit rather than up to rounding in r.
  per_teacher_JxBxT = (t - s_b) + (reward_scale - 1.) * (t - r)
  per_teacher_JxBxT = jnp.where(routed_JxBx1, per_teacher_JxBxT, 0.)
  kl_JxBxT = jnp.where(routed_JxBx1, s_b - t, 0.)
  return jnp.sum(weight_JxBx1 * per_teacher_JxBxT, axis=0), kl_JxBxT


def mixed_advantage(outcome_adv_B, opd_adv_BxT, mask_BxT):
  """Mixed RL + OPD: A = A_est (per sequence, broadcast over its tokens) + A_opd; 0 off-mask.

  outcome_adv_B: [B] from advantages.outcome_advantage; opd_adv_BxT, mask_BxT: [B, T].
  Returns adv_BxT [B, T].
  """
  _expect_shape('outcome_adv_B', outcome_adv_B, opd_adv_BxT.shape[:1])
  _expect_shape('mask_BxT', mask_BxT, opd_adv_BxT.shape)
  adv = _sg(jnp.asarray(outcome_adv_B))[:, None] + _sg(opd_adv_BxT)
  return jnp.where(mask_BxT != 0, adv, 0.)


# ----------------------------------------------------------------------------- policy loss
def _token_log_ratio(log_ratio_BxT, m_BxT):
  del m_BxT  # a uniform signature for RATIO_LEVELS
  return log_ratio_BxT


def _sequence_log_ratio(log_ratio_BxT, m_BxT):
  # GSPO: the length-normalised sequence log-ratio, differentiable through the mean.
  n_B = jnp.maximum(jnp.sum(m_BxT, axis=-1, keepdims=True), 1.)
  return jnp.broadcast_to(jnp.sum(log_ratio_BxT * m_BxT, -1, keepdims=True) / n_B,
                          log_ratio_BxT.shape)


RATIO_LEVELS = {'token': _token_log_ratio, 'sequence': _sequence_log_ratio}


def truncated_is_weight(s_b_train_BxT, s_b_sampler_BxT, cap):
  """Truncated IS weight min(exp(s_b,train − s_b,sampler), cap) for a sampler whose logprobs
  differ from the trainer's (e.g. lower precision). [...] -> [...], no gradient."""
  return jnp.minimum(jnp.exp(_sg(s_b_train_BxT) - _sg(s_b_sampler_BxT)), cap)


def policy_loss(s_BxT, s_b_BxT, adv_BxT, mask_BxT, *, clip_eps=None, clip_eps_high=None,
                tis_weight_BxT=None, ratio_level='token'):
  """Importance-sampled policy-gradient loss per token, PPO-clipped when clip_eps is given.

  ρ = exp(s − s_b); loss = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A), or −ρ·A when clip_eps is
  None (plain IS). Its gradient is −A·ρ·∇s, the REINFORCE form, on unclipped tokens; clipped
  tokens get none.
  s_BxT: [..., T] student logprobs of the sampled tokens (differentiable); s_b_BxT, adv_BxT,
    mask_BxT: [..., T] behaviour logprobs, advantages, response mask (constants; values off
    the mask are ignored, even NaN).
  clip_eps, clip_eps_high: ε and ε_high (defaults to ε; "clip-higher" when larger).
  tis_weight_BxT: optional [..., T] truncated-IS weight multiplying each token's loss.
  ratio_level: 'token', or 'sequence' (GSPO: ρ_i = exp(Σ_k m(s − s_b) / Σ_k m) for every
    token of sequence i, clipped per token against that token's A).
  Returns (loss_BxT [..., T], 0 off the mask; stats {'ratio_BxT': ρ, 'clipped_BxT': bool,
  True where the clipped branch was taken on a response token}).
  """
  for name, x in (('s_b_BxT', s_b_BxT), ('adv_BxT', adv_BxT), ('mask_BxT', mask_BxT)):
    _expect_shape(name, x, s_BxT.shape)
  if clip_eps is None and clip_eps_high is not None:
    raise ValueError('policy_loss: clip_eps_high is set but clip_eps is None (plain IS); '
                     'set clip_eps too')
  if clip_eps is not None and (clip_eps < 0 or (clip_eps_high or 0) < 0):
    raise ValueError(f'policy_loss: clip_eps={clip_eps}, clip_eps_high={clip_eps_high} '
                     'must be >= 0')
  level_fn = _lookup(RATIO_LEVELS, 'ratio_level', ratio_level)
  on = mask_BxT != 0
  m = on.astype(s_BxT.dtype)
  # Zero padding before any arithmetic: padded logprobs may be ±inf or NaN, and a NaN in
  # the unselected branch of a where() still turns its gradient into NaN.
  adv = jnp.where(on, _sg(adv_BxT), 0.)
  log_ratio = level_fn(jnp.where(on, s_BxT - _sg(s_b_BxT), 0.), m)
  ratio = jnp.exp(log_ratio)
  objective = ratio * adv
  if clip_eps is None:
    clipped = jnp.zeros(on.shape, bool)
  else:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped_objective = jnp.clip(ratio, 1. - clip_eps, 1. + high) * adv
    # min() takes the clipped branch exactly when it is strictly smaller; ρ is then outside
    # the range, so clip(ρ) is constant and the token has no gradient. where() instead of
    # minimum() keeps ties (ρ inside the range) on the differentiable branch.
    clipped = (clipped_objective < objective) & on
    objective = jnp.where(clipped, clipped_objective, objective)
  loss = -objective
  if tis_weight_BxT is not None:
    _expect_shape('tis_weight_BxT', tis_weight_BxT, s_BxT.shape)
    loss = loss * jnp.where(on, _sg(tis_weight_BxT), 0.)
  loss = jnp.where(on, loss, 0.)
  return loss, {'ratio_BxT': _sg(ratio), 'clipped_BxT': clipped}


def truncated_is_policy_loss(s_BxT, s_b_BxT, adv_BxT, mask_BxT, *, cap: float):
  """Truncated importance sampling of the policy loss (`loss.tis_cap` = C, docs/design.md
  §3.6): per token ℓ = −w·exp(s − sg(s))·A with w = truncated_is_weight(s, s_b, C) =
  min(ρ, C), ρ = exp(s − s_b), so ℓ's value is −min(ρ, C)·A and its gradient
  −min(ρ, C)·A·∇s: plain IS with the ratio truncated at C. The current parameters are the
  proximal policy (the ratio inside policy_loss is 1 in value), so there is no PPO clip.
  A token that left the kept set (s = −∞) has ρ = 0: loss 0, gradient 0.
  Returns (loss_BxT, stats {'ratio_BxT': ρ, 'clipped_BxT': all False, 'truncated_BxT':
  ρ > C on response tokens}).
  """
  if not cap > 0:
    raise ValueError(f'truncated_is_policy_loss: cap={cap} must be > 0')
  _expect_shape('s_b_BxT', s_b_BxT, s_BxT.shape)
  on = mask_BxT != 0
  finite = on & jnp.isfinite(s_BxT)
  # sg(s) where s is finite: exp(s − sg(s)) is 1 with gradient ∇s; a −∞ token keeps ρ = 0.
  proximal = jnp.where(finite, _sg(s_BxT), 0.)
  weight = truncated_is_weight(jnp.where(on, s_BxT, 0.), jnp.where(on, s_b_BxT, 0.), cap)
  loss, stats = policy_loss(s_BxT, proximal, adv_BxT, mask_BxT, tis_weight_BxT=weight)
  ratio = jnp.where(on, jnp.exp(jnp.where(on, _sg(s_BxT) - _sg(s_b_BxT), 0.)), 0.)
  return loss, dict(stats, ratio_BxT=ratio, truncated_BxT=(ratio > cap) & on)


def importance_metrics(ratio_BxT, clipped_BxT, mask_BxT):
  """Masked scalars for logging: {'ratio_mean', 'ratio_min', 'ratio_max', 'clip_frac'}
  (ratio 1 and clip_frac 0 when the mask is empty)."""
  on = mask_BxT != 0
  n = jnp.maximum(jnp.sum(on), 1)
  any_on = jnp.any(on)
  return {
      'ratio_mean': jnp.where(any_on, jnp.sum(jnp.where(on, ratio_BxT, 0.)) / n, 1.),
      'ratio_min': jnp.where(any_on, jnp.min(jnp.where(on, ratio_BxT, jnp.inf)), 1.),
      'ratio_max': jnp.where(any_on, jnp.max(jnp.where(on, ratio_BxT, -jnp.inf)), 1.),
      'clip_frac': jnp.sum(clipped_BxT & on) / n,
  }


# ----------------------------------------------------------------------------- aggregation
def _token_mean(loss_BxT, m_BxT):
  return jnp.sum(jnp.where(m_BxT > 0, loss_BxT * m_BxT, 0.)), jnp.sum(m_BxT)


def _seq_mean_token_mean(loss_BxT, m_BxT):
  n_B = jnp.sum(m_BxT, axis=-1)
  seq_sum_B = jnp.sum(jnp.where(m_BxT > 0, loss_BxT * m_BxT, 0.), axis=-1)
  has_tokens_B = n_B > 0  # an all-padding row is not a sequence: it must not dilute the mean
  per_seq_B = jnp.where(has_tokens_B, seq_sum_B / jnp.maximum(n_B, 1.), 0.)
  return jnp.sum(per_seq_B), jnp.sum(has_tokens_B).astype(m_BxT.dtype)


# Each returns (sum, count) whose ratio is the loss; pairs from micro-batches (split along
# B) add up to exactly the full batch's pair, so gradient accumulation needs no correction.
AGGREGATIONS = {'token-mean': _token_mean, 'seq-mean-token-mean': _seq_mean_token_mean}


def aggregate(loss_BxT, mask_BxT, mode='token-mean'):
  """(sum, count) of per-token losses [..., T] under mask [..., T] for AGGREGATIONS[mode]:
  'token-mean' -> (Σ l·m, Σ m); 'seq-mean-token-mean' -> (Σ_i Σ_k l_ik m_ik / n_i over
  sequences with n_i = Σ_k m_ik > 0, their number). Both are float scalars."""
  fn = _lookup(AGGREGATIONS, 'aggregation', mode)
  _expect_shape('mask_BxT', mask_BxT, loss_BxT.shape)
  return fn(loss_BxT, jnp.asarray(mask_BxT).astype(loss_BxT.dtype))


def finalize(total, count):
  """The aggregated loss total / max(count, 1) (0 for an empty batch, never NaN)."""
  return total / jnp.maximum(count, 1.)


# ------------------------------------------------------------- full-vocabulary / top-k
def _kl(logp_xV, logq_xV):
  """KL(p ‖ q) = Σ_v p (log p − log q) over the last axis; p = 0 terms count 0 (also where
  log p = −inf, e.g. a masked vocabulary entry)."""
  p = jnp.exp(logp_xV)
  live = p > 0
  return jnp.sum(p * jnp.where(live, logp_xV - jnp.where(live, logq_xV, 0.), 0.), axis=-1)


def forward_kl(student_logp_xV, teacher_logp_xV):
  """KL(p_t ‖ p_s) per position (nats): [..., V] log-probabilities -> [...]."""
  return _kl(_sg(teacher_logp_xV), student_logp_xV)


def reverse_kl_full(student_logp_xV, teacher_logp_xV):
  """KL(p_s ‖ p_t) per position (nats): [..., V] log-probabilities -> [...]."""
  return _kl(student_logp_xV, _sg(teacher_logp_xV))


def generalized_jsd(student_logp_xV, teacher_logp_xV, beta=0.5):
  """Generalized JSD(β) per position (nats), GKD's divergence: [..., V] -> [...].

  m = β·p_t + (1 − β)·p_s; JSD = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m). beta is a static
  Python float in [0, 1]. Matches TRL's GKDTrainer.generalized_jsd_loss per position (its
  value summed over V, before TRL's 'batchmean' over tokens), including its endpoints:
  β = 0 is the forward KL(p_t ‖ p_s) and β = 1 the reverse KL(p_s ‖ p_t), not the formula's
  limit (which is 0 at both ends).
  """
  beta = float(beta)
  if not 0. <= beta <= 1.:
    raise ValueError(f'generalized_jsd: beta must be in [0, 1], got {beta}')
  if beta == 0.:
    return forward_kl(student_logp_xV, teacher_logp_xV)
  if beta == 1.:
    return reverse_kl_full(student_logp_xV, teacher_logp_xV)
  teacher = _sg(teacher_logp_xV)
  # Where both are −inf (a masked vocabulary entry) logaddexp's gradient is NaN; both KL
  # terms ignore that entry (p = 0), so any finite log m does.
  dead = jnp.isneginf(student_logp_xV) & jnp.isneginf(teacher)
  log_m = jnp.logaddexp(jnp.where(dead, 0., student_logp_xV) + math.log1p(-beta),
                        jnp.where(dead, 0., teacher) + math.log(beta))
  return beta * _kl(teacher, log_m) + (1. - beta) * _kl(student_logp_xV, log_m)


FULL_VOCAB_LOSSES = {'forward_kl': forward_kl, 'reverse_kl': reverse_kl_full,
                     'jsd': generalized_jsd}


def full_vocab_loss(name, student_logp_xV, teacher_logp_xV, **kw):
  """FULL_VOCAB_LOSSES[name](student, teacher, **kw) per position; kw is beta for 'jsd'."""
  return _lookup(FULL_VOCAB_LOSSES, 'full-vocabulary loss', name)(
      student_logp_xV, teacher_logp_xV, **kw)


# No top-k bucket holds less than this much mass: the tail log never is log(0) or log(<0)
# when float32 rounding puts Σ top-k probabilities at or above 1 (e.g. K = V).
_TAIL_FLOOR = 1e-12
_MAX_TOPK_LOG_MASS = math.log1p(-_TAIL_FLOOR)


def _log1mexp(x):
  """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012); safe gradients."""
  near_zero = x > -math.log(2.)
  a = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.)))
  b = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1., x)))
  return jnp.where(near_zero, a, b)


def with_tail(topk_logp_xK):
  """Appends a tail bucket log(1 − Σ_k exp(logp_k)) (floored at 1e-12 mass): [..., K] ->
  [..., K+1] log-probabilities of a proper distribution, so that mass outside the top-k
  is not free. Entries may be −inf, even all of them (a truncated student policy with
  none of its kept tokens among the teacher's top-k: the tail then holds all its mass)."""
  # logsumexp of an all −inf row has a NaN gradient, which would leak through the where()
  # that masks the position: such rows get 0 inside and −inf outside, with no gradient.
  dead = jnp.all(jnp.isneginf(topk_logp_xK), axis=-1, keepdims=True)
  log_mass = jax.nn.logsumexp(jnp.where(dead, 0., topk_logp_xK), axis=-1, keepdims=True)
  log_mass = jnp.where(dead, -jnp.inf, log_mass)
  tail = _log1mexp(jnp.minimum(log_mass, _MAX_TOPK_LOG_MASS))
  return jnp.concatenate([topk_logp_xK, tail.astype(topk_logp_xK.dtype)], axis=-1)


def gather_topk(logp_xV, ids_xK):
  """logp at given ids along the last axis: [..., V], int [..., K] -> [..., K] (e.g. the
  student's logprobs at the teacher's top-k ids)."""
  return jnp.take_along_axis(logp_xV, ids_xK, axis=-1)


def topk_loss(name, student_topk_logp_xK, teacher_topk_logp_xK, **kw):
  """A FULL_VOCAB_LOSSES loss on the teacher's top-k ids plus a tail bucket each side.

  student_topk_logp_xK: [..., K] student logprobs at the teacher's top-k ids (gather_topk);
  teacher_topk_logp_xK: [..., K] the teacher's top-k logprobs; kw: beta for 'jsd'.
  Returns [...] nats. With K = V it equals full_vocab_loss (tail ~0 on both sides).
  """
  _expect_shape('student_topk_logp_xK', student_topk_logp_xK, teacher_topk_logp_xK.shape)
  return full_vocab_loss(name, with_tail(student_topk_logp_xK),
                         with_tail(_sg(teacher_topk_logp_xK)), **kw)


def entropy_from_logp(logp_xV):
  """Entropy −Σ_v p log p per position (nats): [..., V] log-probabilities -> [...]."""
  p = jnp.exp(logp_xV)
  # p · log p with log p zeroed where p = 0: a −inf entry must give 0, and 0 in its gradient.
  return -jnp.sum(p * jnp.where(p > 0, logp_xV, 0.), axis=-1)


# --------------------------------------- exact / student-top-k divergences, streamed
# `loss.full_vocab` options (docs/design.md §3.9, §3.10). The top-k ones compare the
# teacher's top-k (returned by its scoring, served or in process) plus a tail bucket; the
# others need the in-process teacher's final hidden states and output projection, and are
# computed here chunk by chunk over positions and vocabulary.
TOPK_OPTIONS = tuple(FULL_VOCAB_LOSSES)
EXACT_OPTIONS = {'forward_kl_exact': 'forward_kl', 'reverse_kl_exact': 'reverse_kl',
                 'jsd_exact': 'jsd'}
STUDENT_TOPK_OPTIONS = {'reverse_kl_student_topk': 'reverse_kl'}
FULL_VOCAB_OPTIONS = TOPK_OPTIONS + tuple(EXACT_OPTIONS) + tuple(STUDENT_TOPK_OPTIONS)

DEFAULT_VOCAB_CHUNK = 8192     # vocabulary entries per chunk
DEFAULT_BLOCK_BUDGET = 2**26   # bytes of one fp32 [B, C, Vc] logits block (64 MiB)


def needs_teacher_hidden(option) -> bool:
  """True for the options computed from the teacher's hidden states in the update."""
  return option in EXACT_OPTIONS or option in STUDENT_TOPK_OPTIONS


def streamed_chunk_sizes(batch: int, length: int, vocab: int, chunk_size=None,
                         vocab_chunk=None, budget_bytes: int = DEFAULT_BLOCK_BUDGET):
  """(C positions, Vc vocabulary entries) per block of `streamed_divergence`: Vc =
  `vocab_chunk` (default 8192) capped at V; C = `chunk_size`, or the largest power of two
  whose fp32 [B, C, Vc] block fits `budget_bytes`, capped at T."""
  vc = int(min(vocab, vocab_chunk or DEFAULT_VOCAB_CHUNK))
  if chunk_size:
    return int(min(chunk_size, max(1, length))), vc
  c = max(1, budget_bytes // max(1, batch * vc * 4))
  c = 1 << (c.bit_length() - 1)
  return int(min(c, max(1, length))), vc


def _finite_max(m):
  """A running max to subtract: 0 while it is still −inf (every entry so far masked, as
  a vocabulary chunk wholly outside a truncated policy's kept set), so that exp(−inf − m)
  is 0 rather than exp(NaN)."""
  return jnp.where(jnp.isneginf(m), 0., m)


def _online_lse(m, s, z):
  """One step of a streamed logsumexp: running max m (no gradient: the result does not
  depend on it) and sum s of exp(z − m); z [..., Vc] may hold −inf, even everywhere."""
  m_new = jnp.maximum(m, _sg(jnp.max(z, axis=-1)))
  safe = _finite_max(m_new)
  return m_new, s * jnp.exp(m - safe) + jnp.sum(jnp.exp(z - safe[..., None]), axis=-1)


def refuses_truncation(option, beta: float = 0.5) -> bool:
  """True for the `loss.full_vocab` options that weight by the teacher, KL(p_t ‖ ·) (the
  forward KLs, and JSD at β = 0, defined as the forward KL): against a truncated student
  policy they are infinite wherever the teacher has mass outside the kept set."""
  name = EXACT_OPTIONS.get(option, option)
  return name == 'forward_kl' or (name == 'jsd' and float(beta) == 0.)


def streamed_divergence(option, student_h_BxTxD, student_w_VxD, teacher_h_BxTxD,
                        teacher_w_VxD, *, temperature: float = 1.0, beta: float = 0.5,
                        top_k: int = 20, chunk_size=None, vocab_chunk=None,
                        keep_min_BxT=None):
  """A `loss.full_vocab` divergence per position from hidden states, never forming [B, T, V].

  student_h_BxTxD, student_w_VxD: the student's final hidden states and output projection
    (differentiable); teacher_h_BxTxD, teacher_w_VxD: the teacher's (constants; its hidden
    size may differ). Position t's logits are h[t] @ w.T / temperature for each model.
  option: a key of EXACT_OPTIONS (KL(p_t ‖ p_s), KL(p_s ‖ p_t) or JSD(β) over all V) or of
    STUDENT_TOPK_OPTIONS (reverse KL on the student's top_k tokens plus a tail bucket each
    side, the teacher's logprobs at those tokens).
  keep_min_BxT: None (the student is its untruncated tempered softmax), or the student
    policy's top-k / top-p truncation (docs/design.md §3.2) as a cut per position on its
    untruncated tempered log-softmax (policy.keep_threshold): entries below it are outside
    the policy's support. The student side is then the truncated, renormalised policy π;
    the teacher's stays untruncated. Refused for the forward KL (refuses_truncation).
  Returns [B, T] nats, equal to full_vocab_loss / topk_loss on the full log-softmaxes
  (the student's truncated and renormalised when keep_min_BxT is given).

  Positions run in chunks of C (a `lax.scan`), and within a chunk the vocabulary in chunks
  of Vc (a nested `lax.scan` whose body is under `jax.checkpoint`), with streamed
  logsumexps and sums: the largest live array is one [B, C, Vc] block per model, in the
  forward pass and in the backward pass, which recomputes each block's logits. The KLs and
  the student top-k take one pass over the vocabulary; JSD takes two (the log-normalisers
  first, since log m needs normalised probabilities). Under truncation a first, forward-only
  pass over the vocabulary finds the student's untruncated log-normaliser, which turns the
  cut into one on the chunk's logits.
  """
  truncated = keep_min_BxT is not None
  if truncated and refuses_truncation(option, beta):
    raise ValueError(f'streamed_divergence: {option!r} (beta={beta}) weights by the teacher '
                     'and is infinite against a truncated student policy (keep_min_BxT)')
  if option in EXACT_OPTIONS:
    kind = EXACT_OPTIONS[option]
  elif option in STUDENT_TOPK_OPTIONS:
    kind = 'student_topk'
  else:
    raise ValueError(f'streamed_divergence: unknown option {option!r}; known: '
                     f'{", ".join(list(EXACT_OPTIONS) + list(STUDENT_TOPK_OPTIONS))}')
  b, t, _ = student_h_BxTxD.shape
  vocab = student_w_VxD.shape[0]
  _expect_shape('teacher_h_BxTxD', teacher_h_BxTxD, (b, t, teacher_w_VxD.shape[1]))
  _expect_shape('teacher_w_VxD', teacher_w_VxD, (vocab, teacher_w_VxD.shape[1]))
  c, vc = streamed_chunk_sizes(b, t, vocab, chunk_size, vocab_chunk)
  k = int(min(top_k, vocab))
  if kind == 'student_topk' and k < 1:
    raise ValueError(f'streamed_divergence: top_k must be >= 1, got {top_k}')
  nv = -(-vocab // vc)
  ws, wt = student_w_VxD, _sg(teacher_w_VxD)
  inv_t = 1.0 / float(temperature)

  def logits(h, w):
    z = jnp.einsum('bcd,vd->bcv', h, w, preferred_element_type=jnp.float32)
    return z * inv_t if inv_t != 1.0 else z

  steps = jnp.arange(nv)

  def dup_mask(i):
    # Chunk i covers entries [i·Vc, (i + 1)·Vc); the last one starts at V − Vc instead
    # (slices of the weights as they are: no padded copy) and masks the entries its
    # predecessor covered. The mask is additive on a [Vc] vector: a [B, C, Vc] boolean
    # built from i alone would be saved for the backward pass at every step.
    start = jnp.minimum(i * vc, vocab - vc)
    return start, jnp.where(start + jnp.arange(vc) < i * vc, -jnp.inf, 0.)

  def position_chunk(_, hs):
    h_s, h_t, keep_min = hs
    zeros = jnp.zeros((b, c), jnp.float32)
    cut = None
    if truncated:  # the cut on the logits: keep_min + the untruncated log-normaliser
      def lse_pass(carry, i):  # forward only: the cut carries no gradient
        start, dup = dup_mask(i)
        z = logits(_sg(h_s), jax.lax.dynamic_slice_in_dim(_sg(ws), start, vc)) + dup
        return _online_lse(*carry, z), None
      (m0, s0), _ = jax.lax.scan(lse_pass, (zeros - jnp.inf, zeros), steps)
      # Never above the largest logit, so that the most likely entry is always kept.
      cut = jnp.minimum(keep_min + m0 + jnp.log(s0), m0)

    def block(i):  # the chunk's logits on vocabulary chunk i, and with −inf where masked
      start, dup = dup_mask(i)
      zs = logits(h_s, jax.lax.dynamic_slice_in_dim(ws, start, vc))
      zt = logits(h_t, jax.lax.dynamic_slice_in_dim(wt, start, vc))
      zs_m = zs + dup
      if truncated:  # outside the student policy's support: −inf on the student side only
        zs_m = jnp.where(_sg(zs) >= cut[..., None], zs_m, -jnp.inf)
      return zs, zt, zs_m, zt + dup

    def first_pass(carry, i):
      zs, zt, zs_m, zt_m = block(i)
      new = dict(carry)
      new['ms'], new['ss'] = _online_lse(carry['ms'], carry['ss'], zs_m)
      new['mt'], new['st'] = _online_lse(carry['mt'], carry['st'], zt_m)
      if kind in ('reverse_kl', 'forward_kl'):
        # Σ_v exp(z_p − m_p)(z_p − z_q), p the distribution KL(p ‖ q) weights by
        zp_m, zp, zq, mp_old, mp = ((zs_m, zs, zt, carry['ms'], new['ms'])
                                    if kind == 'reverse_kl' else
                                    (zt_m, zt, zs, carry['mt'], new['mt']))
        # exp(−inf) = 0 on masked entries, times a finite difference
        mp = _finite_max(mp)
        term = jnp.exp(zp_m - mp[..., None]) * (zp - zq)
        new['a'] = carry['a'] * jnp.exp(mp_old - mp) + jnp.sum(term, axis=-1)
      elif kind == 'student_topk':
        vs, idx = jax.lax.top_k(zs_m, min(k, vc))
        top_s = jnp.concatenate([carry['top_s'], vs], -1)
        top_t = jnp.concatenate([carry['top_t'], jnp.take_along_axis(zt, idx, -1)], -1)
        new['top_s'], sel = jax.lax.top_k(top_s, k)
        new['top_t'] = jnp.take_along_axis(top_t, sel, -1)
      return new, None

    carry = {'ms': zeros - jnp.inf, 'ss': zeros, 'mt': zeros - jnp.inf, 'st': zeros}
    if kind in ('reverse_kl', 'forward_kl'):
      carry['a'] = zeros
    if kind == 'student_topk':
      carry['top_s'] = carry['top_t'] = jnp.full((b, c, k), -jnp.inf, jnp.float32)
    out, _ = jax.lax.scan(jax.checkpoint(first_pass), carry, steps)
    lse_s = out['ms'] + jnp.log(out['ss'])
    lse_t = out['mt'] + jnp.log(out['st'])
    if kind == 'reverse_kl':
      return None, out['a'] / out['ss'] - lse_s + lse_t
    if kind == 'forward_kl':
      return None, out['a'] / out['st'] - lse_t + lse_s
    if kind == 'student_topk':
      return None, topk_loss('reverse_kl', out['top_s'] - lse_s[..., None],
                             out['top_t'] - lse_t[..., None])

    def second_pass(total, i):  # JSD on normalised logprobs, summed over vocabulary chunks
      _, _, zs_m, zt_m = block(i)
      return total + generalized_jsd(zs_m - lse_s[..., None], zt_m - lse_t[..., None],
                                     beta), None
    total, _ = jax.lax.scan(jax.checkpoint(second_pass), zeros, steps)
    return None, total

  n = -(-t // c)

  def to_chunks(x, fill=0.):  # [B, T, ...] -> [W, B, C, ...]
    x = jnp.pad(x, ((0, 0), (0, n * c - t)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)
  if truncated:
    _expect_shape('keep_min_BxT', keep_min_BxT, (b, t))
    # padded positions keep everything (a cut above their uniform logits would empty them)
    keep = to_chunks(_sg(keep_min_BxT).astype(jnp.float32), -jnp.inf)
  else:
    keep = jnp.zeros((n, 0))  # unused
  _, out = jax.lax.scan(position_chunk, None, (to_chunks(student_h_BxTxD),
                                               to_chunks(_sg(teacher_h_BxTxD)), keep))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * c)[:, :t]
