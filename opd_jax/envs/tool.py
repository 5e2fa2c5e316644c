"""'tool': a deterministic tool-use environment. The student calls a calculator or Python in
a tagged block, the environment runs it in the sandbox that the code rewards use
(opd_jax.rewards.sandbox) and answers with the result; a turn without a call is the final
answer.

Record: {"id", "prompt" | "messages", "tag", "ground_truth"}; e.g. prompt "What is 37*58?
Use <calc>...</calc>, then <answer>...</answer>." and ground_truth "2146".

A student turn is read as follows (a call counts before an answer; the last block of a kind):
  <calc>EXPR</calc>        runs `print(EXPR)`; observation `<result>OUTPUT</result>`
  <python>CODE</python>    runs CODE; observation `<result>STDOUT</result>`
  <answer>X</answer>       the final answer: reward 1 when the last number in X equals the
                           ground truth (as numbers), else 0; the episode ends
  neither                  observation `no tool call or answer` and the episode goes on
                           (with `require_answer_tag=False`: the turn is the final answer)
A call that fails (exit status != 0, timeout, output over the limit) raises ToolError, which
ends the episode with the error recorded, or with `errors_end_episode=False` is answered
`<error>LAST LINE OF STDERR</error>` and the episode goes on. `max_calls` (None: no limit)
ends the episode with reward 0 when the student keeps calling. Results of identical programs
are cached per process (the sandbox is deterministic), so repeated calls cost nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from opd_jax.envs.registry import ToolError, register_env

_CALL = re.compile(r'<(calc|python)>(.*?)</\1>', re.DOTALL)
_ANSWER = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)
_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')


def last_number(text: str) -> str | None:
  """The last integer or decimal number in `text`, else None."""
  found = _NUMBER.findall(text)
  return found[-1] if found else None


def same_number(a: str | None, b: Any) -> bool:
  if a is None or b is None:
    return False
  try:
    return float(a) == float(str(b).strip())
  except ValueError:
    return str(a).strip() == str(b).strip()


@functools.lru_cache(maxsize=4096)
def _run(program: str, timeout_s: float, memory_mb: int):
  from opd_jax.rewards.sandbox import run_python
  r = run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=1 << 14)
  return r.returncode, r.stdout, r.stderr, r.timed_out, r.output_overflow


def run_call(kind: str, body: str, *, timeout_s: float = 5.0, memory_mb: int = 256) -> str:
  """The stdout (stripped) of one tool call; ToolError when it fails."""
  program = f'print({body.strip()})' if kind == 'calc' else body
  code, out, err, timed_out, overflow = _run(program, float(timeout_s), int(memory_mb))
  if timed_out:
    raise ToolError(f'{kind} call timed out after {timeout_s} s')
  if overflow:
    raise ToolError(f'{kind} call printed more than the output limit')
  if code != 0:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    raise ToolError(f'{kind} call failed: {lines[-1] if lines else f"exit status {code}"}')
  return out.strip()


@register_env('tool')
class ToolEnv:
  """See the module docstring."""

  def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 256,
               errors_end_episode: bool = True, max_calls: int | None = None,
               require_answer_tag: bool = True):
    self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
    self.errors_end_episode = bool(errors_end_episode)
    self.max_calls = max_calls
    self.require_answer_tag = bool(require_answer_tag)
    self.calls = 0
    self.answer = None

  def reset(self, record: Mapping[str, Any]) -> str:
    if record.get('ground_truth') is None:
      raise ValueError(f"record {record.get('id')!r} (tag {record.get('tag')!r}): environment "
                       "'tool' needs a 'ground_truth' field")
    self.answer = record['ground_truth']
    self.calls = 0
    return record['messages'][-1]['content']

  def step(self, student_text: str) -> tuple[str | None, bool, float]:
    calls = _CALL.findall(student_text)
    if not calls:
      answers = _ANSWER.findall(student_text)
      if answers or not self.require_answer_tag:
        final = answers[-1] if answers else student_text
        return None, True, float(same_number(last_number(final), self.answer))
      return 'no tool call or answer', False, 0.0
    self.calls += 1
    if self.max_calls is not None and self.calls > self.max_calls:
      return None, True, 0.0
    kind, body = calls[-1]
    try:
      out = run_call(kind, body, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
    except ToolError as e:
      if self.errors_end_episode:
        raise
      return f'<error>{e}</error>', False, 0.0
    return f'<result>{out}</result>', False, 0.0
