"""The reward registry and `compute_rewards`, which routes each record to a reward by its tag.

A reward is `fn(response: str, record: dict, **kwargs) -> float` in [0, 1]. Records follow
ROLL's format: {"id", "prompt" | "messages", "tag", "ground_truth"?, "test_cases"?, "source"?}.
Rewards that spend their time waiting on a subprocess (code) are registered with
`concurrent=True` and run in a thread pool; all others run one after another in the calling
thread, because math-verify (sympy + an ANTLR parser) gains nothing from threads under the GIL
and its time limit is only fully reliable in the main thread (see math.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

RewardFn = Callable[..., float]

REWARDS: dict[str, RewardFn] = {}
# Names of rewards that block on a subprocess and so are worth running in a thread pool.
CONCURRENT_REWARDS: set[str] = set()


def register_reward(name: str, *, concurrent: bool = False) -> Callable[[RewardFn], RewardFn]:
  """Decorator adding `fn(response, record, **kwargs) -> float in [0, 1]` to REWARDS as `name`.

  `concurrent=True` marks a reward that mostly waits on a subprocess; compute_rewards runs
  those in a thread pool. Registering a name twice is an error (it would silently change what
  an existing config computes).
  """
  def decorator(fn: RewardFn) -> RewardFn:
    if name in REWARDS and REWARDS[name] is not fn:
      raise ValueError(f'reward {name!r} is already registered (by {REWARDS[name].__module__}.'
                       f'{REWARDS[name].__qualname__})')
    REWARDS[name] = fn
    if concurrent:
      CONCURRENT_REWARDS.add(name)
    return fn
  return decorator


def get_reward(name: str) -> RewardFn:
  """The reward registered as `name`; unknown names raise ValueError listing the known ones."""
  if name not in REWARDS:
    raise ValueError(f'unknown reward {name!r}; known rewards: {", ".join(sorted(REWARDS))}')
  return REWARDS[name]


def record_id(record: Mapping[str, Any]) -> str:
  """The record's id for error messages ('<no id>' when it has none)."""
  return repr(record.get('id', '<no id>'))


def require_field(record: Mapping[str, Any], field: str, reward: str) -> Any:
  """record[field], or a ValueError naming the record id, the field and the reward needing it."""
  value = record.get(field)
  if value is None or (isinstance(value, (str, list, dict)) and not value):
    raise ValueError(f'record {record_id(record)} (tag {record.get("tag")!r}): reward '
                     f'{reward!r} needs a non-empty {field!r} field')
  return value


def _reward_name(record: Mapping[str, Any], tag_to_reward: Mapping[str, str],
                 default: str | None) -> str:
  tag = record.get('tag')
  name = tag_to_reward.get(tag, default) if isinstance(tag, str) else default
  if name is None:
    raise ValueError(f'record {record_id(record)} has tag {tag!r}, which has no reward; '
                     f'configured tags: {sorted(tag_to_reward)} and no default reward')
  return name


def _checked(value: Any, name: str, record: Mapping[str, Any]) -> float:
  # A custom reward outside [0, 1] would silently skew advantages; stop instead.
  value = float(value)
  if not (math.isfinite(value) and 0.0 <= value <= 1.0):
    raise ValueError(f'reward {name!r} returned {value} for record {record_id(record)}; '
                     f'rewards must lie in [0, 1]')
  return value


def compute_rewards(responses: Sequence[str], records: Sequence[Mapping[str, Any]],
                    tag_to_reward: Mapping[str, str], *, default: str | None = None,
                    max_workers: int = 8,
                    reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                    ) -> np.ndarray:
  """Rewards [B] float32 in [0, 1] for B responses, each scored by its record's tag.

  tag_to_reward: {tag: reward name}; a tag missing from it uses `default` (None: an error
    naming the record, its tag and the configured tags).
  max_workers: threads for concurrent (subprocess) rewards; each runs its own subprocesses.
  reward_kwargs: {reward name: kwargs} passed to that reward, e.g.
    {'code': {'timeout_s': 10, 'all_or_nothing': True}}.
  Errors raised by a reward (e.g. a record without ground_truth) propagate.
  """
  if len(responses) != len(records):
    raise ValueError(f'compute_rewards: {len(responses)} responses but {len(records)} records')
  for name in [*tag_to_reward.values(), *([default] if default is not None else [])]:
    get_reward(name)  # a config naming an unknown reward fails even if no record uses it
  reward_kwargs = dict(reward_kwargs or {})
  for name in reward_kwargs:
    get_reward(name)
  names = [_reward_name(rec, tag_to_reward, default) for rec in records]

  def score(i: int) -> float:
    fn = REWARDS[names[i]]
    return _checked(fn(responses[i], records[i], **reward_kwargs.get(names[i], {})),
                    names[i], records[i])

  out = np.zeros(len(records), np.float32)
  pooled = [i for i, name in enumerate(names) if name in CONCURRENT_REWARDS]
  pool = ThreadPoolExecutor(max(1, min(max_workers, len(pooled)))) if pooled else None
  try:
    # Subprocess rewards are submitted first so that they run while this thread does the rest.
    futures = {i: pool.submit(score, i) for i in pooled} if pool else {}
    for i, name in enumerate(names):
      if name not in CONCURRENT_REWARDS:
        out[i] = score(i)
    for i, future in futures.items():
      out[i] = future.result()
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  return out
