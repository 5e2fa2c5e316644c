"""The `Environment` protocol, `ToolError` and the registry of environments by name (the
package's docstring describes the protocol)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any


class ToolError(RuntimeError):
  """A tool call failed (its program raised, timed out, or printed nothing usable)."""


@typing.runtime_checkable
class Environment(typing.Protocol):
  """One episode's environment (see the module docstring)."""

  def reset(self, record: Mapping[str, Any]) -> str: ...

  def step(self, student_text: str) -> tuple[str | None, bool, float]: ...


EnvFactory = Callable[..., Environment]
ENVS: dict[str, EnvFactory] = {}


def register_env(name: str) -> Callable[[EnvFactory], EnvFactory]:
  """Decorator adding an environment factory as `name`; a second registration of a name by
  another factory is an error (it would silently change what a config runs)."""
  def decorator(factory: EnvFactory) -> EnvFactory:
    if name in ENVS and ENVS[name] is not factory:
      raise ValueError(f'environment {name!r} is already registered (by '
                       f'{ENVS[name].__module__}.{ENVS[name].__qualname__})')
    ENVS[name] = factory
    return factory
  return decorator


def get_env(name: str) -> EnvFactory:
  if name not in ENVS:
    raise ValueError(f'unknown environment {name!r}; known environments: '
                     f'{", ".join(sorted(ENVS))}')
  return ENVS[name]


def make_env(name: str, **kwargs) -> Environment:
  """A fresh environment `name` for one episode."""
  return get_env(name)(**kwargs)
