"""'code': the program in the response is run against the record's test_cases in the sandbox.

The program is the last ```python (or ```py / ```python3 / unlabelled) fenced block after any
</think>; without one, the whole text. test_cases, possibly as a JSON string, is one of
  * stdin/stdout tests: [{"input": str, "output": str}, ...] (ROLL's "stdin" /
    "expected_stdout" keys too), or {"inputs": [...], "outputs": [...]}. Each test is one run;
    it passes when the program exits with status 0 and its output equals the expected one
    after trailing whitespace is stripped from every line and trailing blank lines dropped.
  * assert tests: ["assert f(1) == 2", ...], {"asserts": [...]} or ROLL's
    [{"assert_code": str}, ...]. One run executes the program, then each snippet in its
    namespace; a snippet passes when it raises nothing (a program that exits early passes none).
The reward is the fraction of tests passed, or 1/0 with all_or_nothing. A run that times out
ends the record: the remaining stdin/stdout tests are not run and count as failed (a program
that hangs on one input almost always hangs on the next, and each run costs timeout_s).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from opd_jax.rewards.registry import record_id, register_reward, require_field
from opd_jax.rewards.sandbox import run_python
from opd_jax.rewards.text import final_text

_FENCE = re.compile(r'```[ \t]*([\w+-]*)[^\n]*\n(.*?)```', re.DOTALL)
_PYTHON_LANGS = ('', 'python', 'py', 'python3')


def extract_program(response: str) -> str:
  """The last python (or unlabelled) fenced block of the response, else the whole text."""
  text = final_text(response)
  blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in _PYTHON_LANGS]
  return blocks[-1] if blocks else text


@dataclasses.dataclass(frozen=True)
class TestCases:
  """Normalised test_cases: `io` pairs (stdin, expected stdout) or `asserts` snippets."""
  io: tuple[tuple[str, str], ...] = ()
  asserts: tuple[str, ...] = ()


def _io_pair(case: Mapping[str, Any]) -> tuple[str, str] | None:
  for in_key, out_key in (('input', 'output'), ('stdin', 'expected_stdout')):
    if in_key in case and out_key in case:
      return str(case[in_key]), str(case[out_key])
  return None


def parse_test_cases(record: Mapping[str, Any]) -> TestCases:
  """record['test_cases'] in any supported format (module docstring) as TestCases.

  A missing, empty or malformed field is a ValueError naming the record id and the field.
  """
  raw = require_field(record, 'test_cases', 'code')

  def bad(why: str) -> ValueError:
    return ValueError(f'record {record_id(record)}: field \'test_cases\' {why}')

  if isinstance(raw, str):
    try:
      raw = json.loads(raw)
    except json.JSONDecodeError as e:
      raise bad(f'is a string but not JSON ({e})') from e
  if isinstance(raw, Mapping):
    if 'asserts' in raw:
      raw = raw['asserts']
    elif 'inputs' in raw and 'outputs' in raw:
      if len(raw['inputs']) != len(raw['outputs']):
        raise bad(f'has {len(raw["inputs"])} inputs but {len(raw["outputs"])} outputs')
      raw = [{'input': i, 'output': o} for i, o in zip(raw['inputs'], raw['outputs'])]
    else:
      raise bad(f'is a dict with keys {sorted(raw)}; expected "asserts" or "inputs"/"outputs"')
  if not isinstance(raw, list) or not raw:
    raise bad('must be a non-empty list of tests')
  if all(isinstance(c, str) for c in raw):
    return TestCases(asserts=tuple(raw))
  if all(isinstance(c, Mapping) and isinstance(c.get('assert_code'), str) for c in raw):
    return TestCases(asserts=tuple(c['assert_code'] for c in raw))
  pairs = [_io_pair(c) if isinstance(c, Mapping) else None for c in raw]
  if any(p is None for p in pairs):
    i = pairs.index(None)
    raise bad(f'item {i} is {str(raw[i])[:200]!r}; expected an assert string, '
              f'{{"input", "output"}}, {{"stdin", "expected_stdout"}} or {{"assert_code"}}')
  return TestCases(io=tuple(pairs))


def _lines(text: str) -> list[str]:
  return [line.rstrip() for line in text.rstrip().splitlines()]


@register_reward('code', concurrent=True)
def code_reward(response: str, record: Mapping[str, Any], *, all_or_nothing: bool = False,
                timeout_s: float = 5.0, memory_mb: int = 512, **sandbox_kwargs) -> float:
  """Fraction of the record's test_cases that the response's program passes, in [0, 1].

  all_or_nothing: 1.0 only when every test passes (stops at the first failure).
  timeout_s, memory_mb and sandbox_kwargs (max_output_bytes, max_open_files, max_processes,
  network_namespace, site_packages, python) go to sandbox.run_python; timeout_s is per run:
  per stdin/stdout test, or for the program plus all of its asserts.
  """
  tests = parse_test_cases(record)
  program = extract_program(response)
  limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, **sandbox_kwargs)
  if tests.asserts:
    result = run_python(program, asserts=list(tests.asserts), **limits)
    passed, total = sum(result.assert_results), len(tests.asserts)
  else:
    passed, total = 0, len(tests.io)
    for stdin, expected in tests.io:
      result = run_python(program, stdin=stdin, **limits)
      ok = (result.returncode == 0 and not result.output_overflow
            and _lines(result.stdout) == _lines(expected))
      passed += ok
      if result.timed_out or (all_or_nothing and not ok):
        break
  if all_or_nothing:
    return float(passed == total)
  return passed / total
