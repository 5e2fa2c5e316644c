"""Per-token advantages of a batch from the scored log-probabilities (pure OPD, G-OPD, none,
plus an outcome advantage when mixed), with the k1 / k3 reverse-KL bookkeeping for metrics.
The formulas themselves are in `losses` (docs/design.md §3.3-3.5).

Legend (docs/design.md §7): B rows, T token positions, J teachers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opd_jax.objectives import losses


@functools.partial(jax.jit, static_argnames=('mode', 'estimator', 'clamp', 'reward_scale',
                                             'constant'))
def advantages(s_b_BxT, t_JxBxT, r_BxT, kl_coef_J, route_BxJ, loss_mask_BxT, outcome_B, *,
               mode: str, estimator: str = 'k1', clamp: float | None = None,
               reward_scale: float = 1.0, constant: float | None = None):
  """Per-token advantages and the k1 reverse-KL bookkeeping for metrics.

  mode: 'opd' (−Σ c route KL), 'gopd' (λ(t − r) − (s_b − r) per routed teacher), 'none'
  (no teacher term) or 'constant' (the control: `constant` on every response token, no
  teacher term); `outcome_B` (or None) adds an outcome-reward advantage (mixed / RL).
  Returns (adv [B, T] zero off the loss mask, kl_sum [J, B], kl_count [J, B]): per teacher
  and row, the sum of k1 KL (s_b − t) over routed response tokens and their number.
  """
  m = loss_mask_BxT.astype(jnp.float32)
  if mode == 'opd':
    adv, _ = losses.opd_advantage(s_b_BxT, t_JxBxT, kl_coef_J, route_BxJ, estimator=estimator,
                                  clamp=clamp)
  elif mode == 'gopd':
    adv, _ = losses.gopd_advantage(s_b_BxT, t_JxBxT, r_BxT, kl_coef_J, route_BxJ, reward_scale)
  elif mode == 'none':
    adv = jnp.zeros_like(s_b_BxT)
  elif mode == 'constant':
    if constant is None:
      raise ValueError("advantage mode 'constant' needs `constant` (a float)")
    adv = jnp.full_like(s_b_BxT, float(constant))
  else:
    raise ValueError(f'unknown advantage mode {mode!r}')
  if outcome_B is not None:
    adv = losses.mixed_advantage(outcome_B, adv, loss_mask_BxT)
  adv = jnp.where(m > 0, adv, 0.0)
  routed = route_BxJ.T[:, :, None] * m[None]                 # [J, B, T]
  kl1 = jnp.where(routed > 0, s_b_BxT[None] - t_JxBxT, 0.0)
  return adv, kl1.sum(-1), routed.sum(-1)


@jax.jit
def k3_sum(s_b_BxT, t_JxBxT, route_BxJ, loss_mask_BxT):
  """Σ over routed response tokens of the k3 estimate exp(t − s_b) − (t − s_b) − 1, per
  teacher and row [J, B]: a lower-variance estimate of the KL value, for metrics only (as an
  advantage its policy gradient is not that of the reverse KL; docs/design.md §3.1)."""
  routed = route_BxJ.T[:, :, None] * loss_mask_BxT.astype(jnp.float32)[None]
  k3 = losses.reverse_kl(s_b_BxT[None], t_JxBxT, 'k3')
  return jnp.where(routed > 0, k3, 0.0).sum(-1)
