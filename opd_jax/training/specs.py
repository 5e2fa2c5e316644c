"""The config boundary: the typed, frozen specs that the layers below the trainer take, made
from the `ConfigDict` (docs/design.md §1). `teachers/`, `models/` and `rollout/` never read
a config; the builder, the checks and the episode glue call these."""

from __future__ import annotations

import dataclasses

from opd_jax.models.lora import LoraSpec
from opd_jax.rollout.multiturn import Budgets
from opd_jax.teachers.local import TeacherSpec


def teacher_spec(name: str, cfg) -> TeacherSpec:
  """The `TeacherSpec` of `config.teachers.NAME`; ValueError naming the field otherwise."""
  d = dict(cfg)
  unknown = set(d) - {f.name for f in dataclasses.fields(TeacherSpec)}
  if unknown:
    raise ValueError(f'config.teachers.{name}: unknown fields {sorted(unknown)}')
  d['tags'] = tuple(d.get('tags') or ())
  spec = TeacherSpec(name=name, **d)
  if bool(spec.model) == bool(spec.remote_url):
    raise ValueError(f'config.teachers.{name}: set exactly one of model (in-process) and '
                     f'remote_url (served elsewhere); got model={spec.model!r}, '
                     f'remote_url={spec.remote_url!r}')
  return spec


def lora_spec(config) -> LoraSpec | None:
  """The LoraSpec of `config.student.lora`, or None when rank is 0 (validated by
  checks.validate, which names the field on bad values)."""
  lc = config.student.lora
  if not int(lc.rank):
    return None
  return LoraSpec(rank=int(lc.rank), alpha=float(lc.alpha), targets=str(lc.targets))


def budgets(agent) -> Budgets:
  """The `Budgets` of the `config.agent` section."""
  return Budgets(**{f.name: agent[f.name] for f in dataclasses.fields(Budgets)})
