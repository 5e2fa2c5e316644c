"""Verifiable rewards, registered by name; the config maps each data tag to one of them.

  REWARDS                 {name: fn(response, record, **kwargs) -> float in [0, 1]}
  get_reward(name)        the function (unknown name: ValueError listing the known ones)
  register_reward(name)   decorator adding a reward (concurrent=True: runs in the thread pool)
  compute_rewards(...)    float32 [B] rewards, each record scored by the reward of its tag
  pass_at_k(n, c, k)      unbiased pass@k estimator (Chen et al. 2021)
  pass_at_k_by_tag(...)   {'eval/pass@k': ..., 'eval/pass@k/<tag>': ...} for logging

Built in: 'math' (math-verify, math.py), 'code' (sandboxed subprocess, code.py, sandbox.py)
and 'exact_match' (exact.py). Host-side only: nothing here imports jax, and math-verify
(sympy) is imported on first use.
"""

from opd_jax.rewards.passk import pass_at_k, pass_at_k_by_tag
from opd_jax.rewards.registry import (CONCURRENT_REWARDS, REWARDS, compute_rewards, get_reward,
                                      register_reward)
# Imported for their registrations.
from opd_jax.rewards import code as _code  # noqa: E402,F401
from opd_jax.rewards import exact as _exact  # noqa: E402,F401
from opd_jax.rewards import math as _math  # noqa: E402,F401

__all__ = ['CONCURRENT_REWARDS', 'REWARDS', 'compute_rewards', 'get_reward', 'pass_at_k',
           'pass_at_k_by_tag', 'register_reward']
