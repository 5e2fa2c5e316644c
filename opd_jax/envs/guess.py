"""'guess': a feedback game. The environment holds a secret integer and answers each guess
with `higher`, `lower` or `correct`.

Record: {"id", "prompt" | "messages", "tag", "ground_truth": SECRET}; e.g. prompt "Guess my
number between 1 and 20. Answer with a number." The student's guess is the last integer in
its turn; a turn without one is answered `say a number`. The episode ends when the guess is
right (reward 1, or 1 - penalty x (guesses - 1) with `penalty` > 0, never below 0) or after
`max_guesses` (None: the rollout's turn budget ends it) with reward 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from opd_jax.envs.registry import register_env

_INT = re.compile(r'-?\d+')


@register_env('guess')
class GuessEnv:
  """See the module docstring."""

  def __init__(self, *, max_guesses: int | None = None, penalty: float = 0.0):
    self.max_guesses, self.penalty = max_guesses, float(penalty)
    self.secret = None
    self.guesses = 0

  def reset(self, record: Mapping[str, Any]) -> str:
    try:
      self.secret = int(str(record.get('ground_truth')).strip())
    except ValueError:
      raise ValueError(f"record {record.get('id')!r} (tag {record.get('tag')!r}): environment "
                       f"'guess' needs an integer 'ground_truth', got "
                       f"{record.get('ground_truth')!r}") from None
    self.guesses = 0
    return record['messages'][-1]['content']

  def step(self, student_text: str) -> tuple[str | None, bool, float]:
    found = _INT.findall(student_text)
    if not found:
      return 'say a number', False, 0.0
    self.guesses += 1
    guess = int(found[-1])
    if guess == self.secret:
      return None, True, max(0.0, 1.0 - self.penalty * (self.guesses - 1))
    if self.max_guesses is not None and self.guesses >= self.max_guesses:
      return None, True, 0.0
    return ('higher' if guess < self.secret else 'lower'), False, 0.0
