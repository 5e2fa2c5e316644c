"""'exact_match': the response's final answer, normalised, equals the ground truth.

The final answer is the content of the last \\boxed{...}; else the text after the last
'answer:' (any case) or '####' marker (GSM8K style); else the whole response (after any
</think>). Normalisation strips the ends and collapses runs of whitespace, nothing more, so
'Paris.' does not match 'Paris' (use the math reward for numbers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from opd_jax.rewards.registry import register_reward, require_field
from opd_jax.rewards.text import final_text, last_boxed

_MARKER = re.compile(r'answer:|####', re.IGNORECASE)


def normalize(text: str) -> str:
  """Ends stripped and every run of whitespace replaced by one space."""
  return ' '.join(text.split())


def extract_final_answer(response: str) -> str:
  """The final answer of a response (see the module docstring), normalised."""
  text = final_text(response)
  boxed = last_boxed(text)
  if boxed is not None:
    return normalize(boxed)
  markers = list(_MARKER.finditer(text))
  if markers:
    return normalize(text[markers[-1].end():])
  return normalize(text)


@register_reward('exact_match')
def exact_match_reward(response: str, record: Mapping[str, Any]) -> float:
  """1.0 when the final answer equals (a) normalised ground_truth, else 0.0.

  ground_truth may be a string, a number or a list of acceptable answers.
  """
  truth = require_field(record, 'ground_truth', 'exact_match')
  answers = truth if isinstance(truth, (list, tuple)) else [truth]
  answer = extract_final_answer(response)
  return float(any(answer == normalize(str(a)) for a in answers))
