"""Text helpers shared by the rewards: the part of a response after its reasoning, and the
content of its last \\boxed{...}."""

from __future__ import annotations

import re

_BOXED = re.compile(r'\\(?:boxed|fbox)\s*\{')


def final_text(response: str) -> str:
  """The response after its last '</think>' (the whole response when there is none).

  Answers written while thinking are drafts; only what follows the reasoning is graded.
  """
  head, sep, tail = response.rpartition('</think>')
  return tail if sep else response


def last_boxed(text: str) -> str | None:
  """The content of the last complete \\boxed{...} (or \\fbox{...}) in text, else None.

  Braces are matched, so '\\boxed{\\frac{1}{2}}' gives '\\frac{1}{2}'; an unclosed box is
  skipped in favour of an earlier complete one.
  """
  # If a later box never closes, an earlier box still open where the later one starts cannot
  # close either, so each box only needs scanning up to the next box: linear time even for
  # degenerate outputs that repeat '\boxed{' many times.
  limit = len(text)
  for match in reversed(list(_BOXED.finditer(text))):
    depth, start = 1, match.end()
    for pos in range(start, limit):
      ch = text[pos]
      if ch == '{':
        depth += 1
      elif ch == '}':
        depth -= 1
        if depth == 0:
          return text[start:pos]
    limit = match.start()
  return None


def last_boxed_start(text: str) -> int:
  """Index where the last '\\boxed' / '\\fbox' starts, or -1."""
  starts = [m.start() for m in _BOXED.finditer(text)]
  return starts[-1] if starts else -1
