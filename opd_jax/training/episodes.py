"""Multi-turn episodes in the trainer (docs/design.md §10): the `config.agent` section read
into the typed `Budgets` and a `MultiTurnSampler`, its checks, and the outcome rewards,
advantages and FLOPs of a batch of `Episodes`. The engine itself is
`opd_jax.rollout.multiturn`, which takes no config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import envs as envs_lib
from opd_jax.rollout.multiturn import Episodes, MultiTurnSampler
from opd_jax.training.checks import ConfigError
from opd_jax.training.specs import budgets


def validate_config(config) -> None:
  """The agent section's checks (no weights, no data); raises ConfigError naming the field."""
  a = config.agent
  if not a.tag_to_env:
    if a.env_kwargs:
      raise ConfigError('config.agent.env_kwargs is set but config.agent.tag_to_env is empty')
    return
  for tag, name in a.tag_to_env.items():
    if name not in envs_lib.ENVS:
      raise ConfigError(f'config.agent.tag_to_env[{tag!r}]={name!r}: unknown environment; '
                        f'known: {", ".join(sorted(envs_lib.ENVS))}')
  for name, kw in a.env_kwargs.items():
    if name not in envs_lib.ENVS:
      raise ConfigError(f'config.agent.env_kwargs.{name}: unknown environment; known: '
                        f'{", ".join(sorted(envs_lib.ENVS))}')
    try:
      envs_lib.make_env(name, **dict(kw))
    except TypeError as e:
      raise ConfigError(f'config.agent.env_kwargs.{name}: {e}') from None
  try:
    budgets(a)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.mode != 'opd':
    raise ConfigError(f'config.agent.tag_to_env needs config.mode=opd (got {config.mode!r}): '
                      'multi-turn episodes are on-policy rollouts')
  if jax.process_count() > 1:
    raise ConfigError('config.agent.tag_to_env: multi-turn rollouts run on one process only '
                      '(not yet on several)')


def from_config(config, run, tokenizer, encoder) -> MultiTurnSampler | None:
  """The run's multi-turn sampler, or None when config.agent.tag_to_env is empty."""
  a = config.agent
  if not a.tag_to_env:
    return None
  return MultiTurnSampler(
      run.graphdef, mesh=run.mesh, layout=run.layout, tokenizer=tokenizer, encoder=encoder,
      stop_ids=run.stop_ids, pad_id=run.pad_id, tag_to_env=dict(a.tag_to_env),
      env_kwargs={k: dict(v) for k, v in a.env_kwargs.items()}, budgets=budgets(a),
      cache_dtype=jnp.dtype(config.student.compute_dtype))


def outcome_rewards(config, episodes: Episodes, records) -> np.ndarray:
  """Rewards [B] for mixed / RL mode: the episode reward on rows with an environment, the
  tag's reward (config.rl) on the final turn of the others."""
  from opd_jax import rewards as rewards_lib
  from opd_jax.data import record_dict
  rew = episodes.reward.astype(np.float32).copy()
  other = [i for i in range(len(records)) if not episodes.has_env[i]]
  if other:
    texts = episodes.final_texts()
    rew[other] = rewards_lib.compute_rewards(
        [texts[i] for i in other], [record_dict(records[i]) for i in other],
        dict(config.rl.tag_to_reward), default=config.rl.default_reward)
  return rew


def outcome_advantage(config, episodes: Episodes, records, n_samples: int):
  """(outcome advantage [B] on device, rewards [B] host) for mixed / RL mode with episodes."""
  from opd_jax.objectives import estimators as adv_lib
  rew = outcome_rewards(config, episodes, records)
  kw = {'normalize_std': config.rl.normalize_std} if config.rl.estimator == 'grpo' else {}
  return (jnp.asarray(adv_lib.outcome_advantage(config.rl.estimator, rew, n_samples, **kw),
                      jnp.float32), rew)


def rollout_flops(cfg, episodes: Episodes) -> int:
  """Analytic FLOPs of the episodes: the prompt's prefill, then every later token (student
  or observation) as one cached step (observation prefills cost about the same per token)."""
  from opd_jax.training import flops as compute
  prompt = episodes.prompt_mask.sum(-1)
  return compute.rollout_flops(cfg, prompt, episodes.attn.sum(-1))
