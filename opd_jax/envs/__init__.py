"""Environments for multi-turn (agentic) rollouts, registered by name like the rewards; the
config maps a data tag to one of them (`config.agent.tag_to_env`).

  Environment             the protocol: reset(record) -> first observation;
                          step(student_text) -> (observation | None, done, reward)
  ENVS                    {name: factory(**kwargs) -> Environment}
  register_env(name)      decorator adding a factory (a class, usually)
  make_env(name, **kw)    a fresh environment for one episode (unknown name: ValueError)
  ToolError               raised by `step` when a tool call fails: the rollout ends that
                          episode and records the error (the rest of the batch goes on)

One environment object runs one episode: the rollout makes one per row with
`make_env(name, **config.agent.env_kwargs[name])`, calls `reset(record)` with the record as
the plain dict the rewards read (`opd_jax.data.record_dict`), then `step(text)` with the
decoded text of each student turn (special tokens removed). `reset` returns the text of the
episode's first user message (it replaces the record's last message; the chat template of
the record's tag renders it). `step` returns the next observation (None: no more), whether
the episode is over, and this step's reward; the episode's reward is the sum of its steps'
rewards and must lie in [0, 1]. An exception from `reset` or `step` ends that episode with
the error recorded (docs/design.md §10).

Built in: 'tool' (tool.py: a calculator / Python call in a tagged block, run in the code
rewards' sandbox) and 'guess' (guess.py: a number-guessing game answered higher / lower).
Host-side only: nothing here imports jax.
"""

from opd_jax.envs.registry import (ENVS, Environment, EnvFactory, ToolError, get_env, make_env,
                                  register_env)
# Imported for their registrations.
from opd_jax.envs import guess as _guess  # noqa: F401
from opd_jax.envs import tool as _tool  # noqa: F401

__all__ = ['ENVS', 'Environment', 'ToolError', 'get_env', 'make_env', 'register_env']
