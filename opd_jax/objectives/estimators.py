"""Outcome-reward advantage estimators: one advantage per sequence from its scalar reward.

Dimension legend (used in names):
  B sequences = Q prompts × G samples per prompt (`group_size`). The G rows of one prompt
  are adjacent: rows [q·G, (q+1)·G) belong to prompt q, as the sampler emits them.

Standard deviations are population std (ddof = 0, NumPy's default) unless `ddof` says
otherwise; verl's and TRL's GRPO use torch.std (ddof = 1), which is larger by sqrt(G/(G−1)),
so pass ddof=1 to reproduce their numbers. Every estimator is
`fn(rewards_B, *, group_size, eps=1e-6, **options) -> adv_B`, pure jnp (NumPy input is fine,
jit-able with group_size static); an option an estimator does not take is a TypeError
rather than silently ignored. Mixing with OPD is losses.mixed_advantage.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp


def _grouped(rewards_B, group_size):
  """rewards as float [Q, G] after checking the batch layout."""
  rewards_B = jnp.asarray(rewards_B)
  if rewards_B.ndim != 1:
    raise ValueError(f'rewards must be one value per sequence, [B]; got shape '
                     f'{tuple(rewards_B.shape)}')
  if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) \
      or group_size < 1:
    raise ValueError(f'group_size must be a positive int, got {group_size!r}')
  b = rewards_B.shape[0]
  if b % group_size:
    raise ValueError(f'batch of {b} rewards is not a whole number of groups of '
                     f'group_size={group_size}')
  if not jnp.issubdtype(rewards_B.dtype, jnp.floating):
    rewards_B = rewards_B.astype(jnp.float32)  # 0/1 integer or bool rewards
  return rewards_B.reshape(b // group_size, group_size)


def _check_ddof(ddof, n, what):
  if not 0 <= ddof < n:
    raise ValueError(f'ddof={ddof} needs more than {ddof} rewards per {what}; got {n}')


def _centered(r_QxG):
  """R − mean over the last axis, exactly 0 in a group whose rewards are all equal.

  The float mean of G equal values need not equal them (8 × float32(2/3) averages to 2/3
  + 6e-8), and dividing that residue by a std of ~0 + eps made it an advantage of 0.056."""
  equal = jnp.all(r_QxG == r_QxG[..., :1], axis=-1, keepdims=True)
  return jnp.where(equal, 0., r_QxG - jnp.mean(r_QxG, axis=-1, keepdims=True)), equal


def grpo(rewards_B, *, group_size, eps=1e-6, normalize_std=True, ddof=0):
  """GRPO: (R − group mean) / (group std + eps); normalize_std=False is Dr. GRPO (R − mean).

  rewards_B: [B]; returns adv_B [B]. A group with identical rewards gets exactly 0.
  """
  r_QxG = _grouped(rewards_B, group_size)
  adv_QxG, equal = _centered(r_QxG)
  if normalize_std:
    _check_ddof(ddof, group_size, 'group')
    std = jnp.std(r_QxG, axis=-1, keepdims=True, ddof=ddof)
    adv_QxG = jnp.where(equal, 0., adv_QxG / (std + eps))
  return adv_QxG.reshape(-1)


def rloo(rewards_B, *, group_size, eps=1e-6):
  """RLOO: R_i − mean of the other G − 1 rewards of its group. [B] -> [B]; G >= 2.
  eps is unused (no division by a data-dependent scale)."""
  del eps
  r_QxG = _grouped(rewards_B, group_size)
  if group_size < 2:
    raise ValueError(f'rloo needs group_size >= 2 (a leave-one-out baseline needs another '
                     f'sample of the same prompt); got group_size={group_size}')
  others_mean_QxG = (jnp.sum(r_QxG, axis=-1, keepdims=True) - r_QxG) / (group_size - 1)
  equal = jnp.all(r_QxG == r_QxG[..., :1], axis=-1, keepdims=True)
  return jnp.where(equal, 0., r_QxG - others_mean_QxG).reshape(-1)


def reinforce_pp(rewards_B, *, group_size, eps=1e-6, ddof=0):
  """REINFORCE++: (R − batch mean) / (batch std + eps), one baseline for the whole batch
  (no per-prompt groups; group_size only checks the layout). [B] -> [B]."""
  r_1xB = _grouped(rewards_B, group_size).reshape(1, -1)
  _check_ddof(ddof, r_1xB.shape[1], 'batch')
  adv_1xB, equal = _centered(r_1xB)
  return jnp.where(equal, 0., adv_1xB / (jnp.std(r_1xB, ddof=ddof) + eps)).reshape(-1)


def reinforce(rewards_B, *, group_size, eps=1e-6):
  """Plain REINFORCE: the reward itself, no baseline. [B] -> [B]; eps unused."""
  del eps
  return _grouped(rewards_B, group_size).reshape(-1)


ESTIMATORS = {'grpo': grpo, 'rloo': rloo, 'reinforce_pp': reinforce_pp,
              'reinforce': reinforce}


def groups_with_signal(rewards_B, group_size) -> float:
  """The share of groups whose rewards are not all equal: the groups that give a group-
  baselined estimator (GRPO, RLOO) any gradient at all (a group of equal rewards has
  advantage 0 everywhere)."""
  r = _grouped(rewards_B, group_size)
  return float(jnp.mean(jnp.any(r != r[:, :1], axis=1)))


def outcome_advantage(name, rewards_B, group_size, **kw):
  """ESTIMATORS[name](rewards_B, group_size=group_size, **kw): [B] rewards -> [B] advantages.

  Unknown name -> ValueError listing the known estimators.
  """
  if name not in ESTIMATORS:
    raise ValueError(f'unknown advantage estimator {name!r}; known: '
                     f'{", ".join(sorted(ESTIMATORS))}')
  return ESTIMATORS[name](rewards_B, group_size=group_size, **kw)
