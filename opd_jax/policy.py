"""The student's policy as one definition: softmax of tempered, truncated logits.

Legend: V vocabulary; a leading `x` means any leading shape (`logits_xV` is [..., V]).

The rollout sampler draws from this distribution and the update differentiates the same
distribution's log-probability, so on fresh rollouts the importance ratio
ρ = exp(s − s_b) is 1 to float precision for any temperature, top-k and top-p
(docs/design.md §3.2):
  1. x = logits / temperature;
  2. top-k: entries below the k-th largest x are removed (ties at the k-th value are kept);
  3. top-p: of what is left, the smallest prefix by descending probability whose mass
     reaches top_p is kept (the most likely token always is);
  4. log π = log_softmax over the kept entries; removed entries get −inf.
The kept set depends on the logits but is piecewise constant in them, so it carries no
gradient: ∇ log π(a) = ∇x_a − Σ_{v kept} π(v) ∇x_v for a kept token a.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
  """Static policy settings (hashable). temperature > 0; top_k 0 = off; top_p 1 = off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f'policy temperature must be > 0, got {self.temperature} (greedy '
                       'decoding is a point mass with no policy gradient)')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')

  @property
  def truncated(self) -> bool:
    return bool(self.top_k) or self.top_p < 1.0


def truncate(x_xV, top_k: int = 0, top_p: float = 1.0):
  """Tempered logits x [..., V] with the entries outside the top-k / top-p set set to −inf.

  The decision of what is kept is made without gradient; kept entries keep theirs.
  """
  v = x_xV.shape[-1]
  if top_k and top_k < v:
    kth = jax.lax.stop_gradient(jax.lax.top_k(x_xV, top_k)[0][..., -1:])
    x_xV = jnp.where(x_xV < kth, -jnp.inf, x_xV)
  if top_p < 1.0:
    xs = jax.lax.stop_gradient(x_xV)
    order = jnp.argsort(-xs, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(xs, order, axis=-1), axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before; first kept
    # Back to vocabulary order: the rank of each entry is the inverse permutation.
    rank = jnp.argsort(order, axis=-1)
    keep = jnp.take_along_axis(keep_sorted, rank, axis=-1)
    x_xV = jnp.where(keep, x_xV, -jnp.inf)
  return x_xV


def keep_threshold(x_xV, top_k: int = 0, top_p: float = 1.0, kept_xV=None):
  """Per position [...], the kept set of `truncate` as a cut on the same values: halfway
  between the smallest kept and the largest removed entry (−inf when nothing is removed),
  without gradient. `x ≥ cut` then reproduces the kept set from values recomputed
  elsewhere (e.g. vocabulary chunk by chunk, losses.streamed_divergence) to within their
  rounding, which a cut at the kept value itself would not. x may be tempered logits or
  their log-softmax; the cut is in the units given. Where entries exactly tied with the
  last kept one are removed by top-p's order (measure zero), `x ≥ cut` keeps them too.
  kept_xV: the kept mask when already known (e.g. isfinite of the truncated values).
  """
  xs = jax.lax.stop_gradient(x_xV)
  kept = jnp.isfinite(truncate(xs, top_k, top_p)) if kept_xV is None else kept_xV
  lo = jnp.min(jnp.where(kept, xs, jnp.inf), axis=-1)
  hi = jnp.max(jnp.where(kept, -jnp.inf, xs), axis=-1)
  return jnp.where(jnp.isneginf(hi), -jnp.inf, lo + 0.5 * (hi - lo))


def log_policy(logits_xV, policy: Policy):
  """log π [..., V] (float32) of the tempered, truncated policy; −inf off its support."""
  x = logits_xV.astype(jnp.float32)
  if policy.temperature != 1.0:
    x = x / policy.temperature
  return jax.nn.log_softmax(truncate(x, policy.top_k, policy.top_p), axis=-1)
