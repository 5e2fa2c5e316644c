"""Outcome-reward estimators against plain NumPy references (float64, ddof stated)."""

import functools

import jax
import numpy as np
import pytest

from opd_jax.objectives import estimators as adv

P, G = 5, 4
RNG = np.random.RandomState(0)
REWARDS = RNG.randn(P * G).astype(np.float32)
REWARDS[4:8] = 1.  # one group with identical rewards: zero signal, never NaN
TOL = dict(rtol=1e-5, atol=1e-5)


def np_grpo(r, g, eps=1e-6, normalize_std=True, ddof=0):
  out = np.empty(len(r))
  for p in range(len(r) // g):
    grp = np.asarray(r[p * g:(p + 1) * g], np.float64)
    a = grp - grp.mean()
    out[p * g:(p + 1) * g] = a / (grp.std(ddof=ddof) + eps) if normalize_std else a
  return out


def np_rloo(r, g):
  out = np.empty(len(r))
  for i in range(len(r)):
    p = i // g
    others = [r[j] for j in range(p * g, (p + 1) * g) if j != i]
    out[i] = r[i] - np.mean(np.asarray(others, np.float64))
  return out


def np_reinforce_pp(r, eps=1e-6, ddof=0):
  r = np.asarray(r, np.float64)
  return (r - r.mean()) / (r.std(ddof=ddof) + eps)


@pytest.mark.parametrize('name, kw, ref', [
    ('grpo', {}, lambda r: np_grpo(r, G)),
    ('grpo', {'ddof': 1}, lambda r: np_grpo(r, G, ddof=1)),
    ('grpo', {'normalize_std': False}, lambda r: np_grpo(r, G, normalize_std=False)),
    ('grpo', {'eps': 0.5}, lambda r: np_grpo(r, G, eps=0.5)),
    ('rloo', {}, lambda r: np_rloo(r, G)),
    ('reinforce_pp', {}, np_reinforce_pp),
    ('reinforce_pp', {'ddof': 1}, lambda r: np_reinforce_pp(r, ddof=1)),
    ('reinforce', {}, lambda r: np.asarray(r, np.float64)),
])
def test_estimators_match_numpy(name, kw, ref):
  out = np.asarray(adv.outcome_advantage(name, REWARDS, G, **kw))
  assert out.shape == (P * G,) and np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref(REWARDS), **TOL)


def test_group_baselines_are_zero_mean_and_ignore_other_groups():
  for name in ('grpo', 'rloo'):
    a = np.asarray(adv.outcome_advantage(name, REWARDS, G)).reshape(P, G)
    np.testing.assert_allclose(a.sum(-1), 0., atol=1e-5)
    np.testing.assert_array_equal(a[1], 0.)  # the identical-reward group
    shifted = REWARDS.copy()
    shifted[:G] += 100.  # another prompt's rewards must not move this group's advantages
    b = np.asarray(adv.outcome_advantage(name, shifted, G)).reshape(P, G)
    np.testing.assert_allclose(b[1:], a[1:], atol=1e-5)


def test_grpo_std_is_population_std():
  r = np.array([0., 1.], np.float32)  # mean .5, population std .5, sample std .707
  np.testing.assert_allclose(adv.grpo(r, group_size=2, eps=0.), [-1., 1.], atol=1e-6)


def test_integer_rewards_and_jit():
  r = (REWARDS > 0).astype(np.int32)
  out = adv.grpo(r, group_size=G)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, np_grpo(r.astype(np.float64), G), **TOL)
  jitted = jax.jit(functools.partial(adv.outcome_advantage, 'rloo', group_size=G))
  np.testing.assert_allclose(jitted(REWARDS), np_rloo(REWARDS, G), **TOL)


@pytest.mark.parametrize('call, err, msg', [
    (lambda: adv.outcome_advantage('ppo', REWARDS, G), ValueError,
     r"unknown advantage estimator 'ppo'; known: grpo, reinforce, reinforce_pp, rloo"),
    (lambda: adv.outcome_advantage('grpo', REWARDS, 3), ValueError,
     'batch of 20 rewards is not a whole number of groups of group_size=3'),
    (lambda: adv.outcome_advantage('rloo', REWARDS, 1), ValueError, 'rloo needs group_size >= 2'),
    (lambda: adv.outcome_advantage('grpo', REWARDS, 0), ValueError, 'positive int'),
    (lambda: adv.outcome_advantage('grpo', REWARDS.reshape(P, G), G), ValueError, r'\[B\]'),
    (lambda: adv.outcome_advantage('grpo', REWARDS, 1, ddof=1), ValueError, 'ddof=1'),
    (lambda: adv.outcome_advantage('rloo', REWARDS, G, normalize_std=False), TypeError,
     'normalize_std'),
])
def test_errors(call, err, msg):
  with pytest.raises(err, match=msg):
    call()


@pytest.mark.parametrize('value', [0.3, 2 / 3, 0.9, 1e6])
@pytest.mark.parametrize('name, kw', [('grpo', {}), ('grpo', {'normalize_std': False}),
                                      ('grpo', {'ddof': 1}), ('rloo', {}),
                                      ('reinforce_pp', {})])
def test_equal_rewards_get_exactly_zero(name, kw, value):
  """A group (or, for REINFORCE++, a batch) of equal rewards carries no signal. The float mean
  of 8 × float32(2/3) is not 2/3, and the residue over std + eps was an advantage of 0.056."""
  r = np.full(8, value, np.float32)
  np.testing.assert_array_equal(adv.outcome_advantage(name, r, 8, **kw), 0.)
  # One equal group next to a varied one: only the varied group gets advantages.
  mixed = np.concatenate([r, np.asarray([0., 1., 0.5, 0.25, 1., 0., 0.75, 0.5], np.float32)])
  out = np.asarray(adv.outcome_advantage(name, mixed, 8, **kw))
  if name != 'reinforce_pp':
    np.testing.assert_array_equal(out[:8], 0.)
  assert np.abs(out[8:]).max() > 0


def test_groups_with_signal_counts_groups_of_unequal_rewards():
  rng = np.random.default_rng(3)
  for g in (1, 2, 4, 8):
    r = rng.integers(0, 2, size=6 * g).astype(np.float32)
    expect = np.mean([len(set(r[q * g:(q + 1) * g].tolist())) > 1 for q in range(6)])
    assert adv.groups_with_signal(r, g) == pytest.approx(expect)
  assert adv.groups_with_signal(np.array([1., 1., 0., 1.]), 2) == 0.5
  with pytest.raises(ValueError, match='whole number of groups'):
    adv.groups_with_signal(np.zeros(5), 2)
