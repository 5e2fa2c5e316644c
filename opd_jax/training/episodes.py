"""The trainer's rollout engine (`rollout_engine`: single-turn or episodes, one protocol,
opd_jax.rollout.engine), and multi-turn episodes in the trainer (docs/design.md §10): the
`config.agent` section read into the typed `Budgets` and a `MultiTurnSampler`, and its
checks. The engines themselves take no config."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opd_jax import envs as envs_lib
from opd_jax.rollout.engine import EpisodeEngine, RolloutEngine, SingleTurnEngine
from opd_jax.rollout.multiturn import MultiTurnSampler
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



def rollout_engine(config, run, tokenizer=None, encoder=None) -> RolloutEngine:
  """The engine the OPD step samples with: episodes when config.agent.tag_to_env is set,
  otherwise one response per prompt from the run's sampler. Without a tokenizer and an
  encoder (the AOT check) the engine only lists its abstract calls."""
  from opd_jax.training import flops as compute
  flops_fn = functools.partial(compute.rollout_flops, run.student_cfg)
  c = config.rollout
  if not config.agent.tag_to_env:
    return SingleTurnEngine(run.sampler, run.rollout_sp, encoder=encoder, tokenizer=tokenizer,
                            flops_fn=flops_fn)
  a = config.agent
  agent = MultiTurnSampler(
      run.graphdef, mesh=run.mesh, layout=run.layout, tokenizer=tokenizer, encoder=encoder,
      stop_ids=run.stop_ids, pad_id=run.pad_id, tag_to_env=dict(a.tag_to_env),
      env_kwargs={k: dict(v) for k, v in a.env_kwargs.items()}, budgets=budgets(a),
      cache_dtype=jnp.dtype(config.student.compute_dtype))
  return EpisodeEngine(agent, mesh=run.mesh, temperature=c.temperature, top_k=c.top_k,
                       top_p=c.top_p, flops_fn=flops_fn)
