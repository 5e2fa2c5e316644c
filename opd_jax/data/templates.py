"""Chat templates per tag: record -> prompt token ids (`PromptEncoder`), prompt padding, and
the check that a teacher's tokenizer maps the same strings to the same ids as the student's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from opd_jax.data.records import DataError, Record, VocabMismatchError


# ------------------------------------------------------------------------ chat templates
# name -> kwargs for `tokenizer.apply_chat_template`; None = no chat template ('raw': the
# prompt text as is, for base models). Add an entry here to make a template selectable.
TEMPLATES: dict[str, dict[str, Any] | None] = {
    'default': {},
    'qwen3_think': {'enable_thinking': True},
    'qwen3_no_think': {'enable_thinking': False},
    'raw': None,
}

ON_TOO_LONG = ('error', 'skip')


class PromptEncoder:
  """Record -> prompt token ids, with a chat template chosen per tag.

  `template` is the global template name; `tag_to_template` overrides it for some tags.
  A prompt longer than `max_prompt_len` tokens raises DataError (`on_too_long='error'`) or
  is skipped: `encode` returns None and `skipped[tag]` counts it (`'skip'`).
  """

  def __init__(self, tokenizer, *, template: str = 'default',
               tag_to_template: Mapping[str, str] | None = None, max_prompt_len: int,
               on_too_long: str = 'error'):
    self.tokenizer = tokenizer
    self.template = template
    self.tag_to_template = dict(tag_to_template or {})
    for where, name in [('template', template)] + [
        (f'tag_to_template[{t!r}]', n) for t, n in self.tag_to_template.items()]:
      if name not in TEMPLATES:
        raise ValueError(f'data.{where}: unknown chat template {name!r}; known: '
                         f'{", ".join(TEMPLATES)}')
      if TEMPLATES[name] is not None and not getattr(tokenizer, 'chat_template', None):
        raise ValueError(f'data.{where}: template {name!r} needs a chat template, but the '
                         "tokenizer has none (use 'raw' for a base model)")
    if on_too_long not in ON_TOO_LONG:
      raise ValueError(f'data.on_too_long: {on_too_long!r}; expected one of {ON_TOO_LONG}')
    if max_prompt_len < 1:
      raise ValueError(f'data.max_prompt_len must be positive, got {max_prompt_len}')
    self.max_prompt_len = int(max_prompt_len)
    self.on_too_long = on_too_long
    self.skipped: Counter[str] = Counter()

  def template_for(self, tag: str) -> str:
    """The template name used for records with this tag."""
    return self.tag_to_template.get(tag, self.template)

  def text(self, record: Record) -> str:
    """The prompt text after the record's chat template (ends with the assistant header)."""
    name = self.template_for(record.tag)
    kwargs = TEMPLATES[name]
    if kwargs is None:
      if len(record.messages) != 1:
        raise DataError(f"{record.where}: field 'messages': template 'raw' takes a single "
                        f'message, record {record.id!r} has {len(record.messages)}')
      return record.messages[0]['content']
    return self.tokenizer.apply_chat_template(
        record.messages, add_generation_prompt=True, tokenize=False, **kwargs)

  def encode(self, record: Record) -> list[int] | None:
    """Prompt token ids, or None if too long and `on_too_long='skip'`."""
    return self.encode_batch([record])[0]

  def encode_batch(self, records: Sequence[Record]) -> list[list[int] | None]:
    """`encode` of each record, in order (None where a too-long prompt was skipped).

    One tokenizer call per kind of template, so a fast tokenizer works in parallel.
    """
    is_raw = [TEMPLATES[self.template_for(r.tag)] is None for r in records]
    out: list[list[int] | None] = [None] * len(records)
    for raw in (False, True):
      rows = [i for i, r in enumerate(is_raw) if r == raw]
      if not rows:
        continue
      # A chat template already wrote BOS/special tokens as text; adding them again would
      # double them. Raw text gets the tokenizer's usual ones (e.g. Llama's BOS).
      ids = self.tokenizer([self.text(records[i]) for i in rows], add_special_tokens=raw)
      for i, row_ids in zip(rows, ids['input_ids']):
        out[i] = self._within_budget(records[i], list(row_ids))
    return out

  def _within_budget(self, record: Record, ids: list[int]) -> list[int] | None:
    if len(ids) <= self.max_prompt_len:
      return ids
    if self.on_too_long == 'error':
      raise DataError(
          f"{record.where}: field 'prompt': record {record.id!r} is {len(ids)} tokens with "
          f"template '{self.template_for(record.tag)}', over the budget "
          f"max_prompt_len={self.max_prompt_len} (raise it, or set on_too_long='skip')")
    self.skipped[record.tag] += 1
    return None

  def drop_too_long(self, records: Sequence[Record]) -> list[Record]:
    """The records whose prompts fit (counting the others in `skipped`, or raising).

    Run once on the loaded domains so that every sampled batch is full: the same filter
    runs on every host, so batches stay identical across hosts.
    """
    return [r for r, ids in zip(records, self.encode_batch(records)) if ids is not None]


def pad_prompts(ids: Sequence[Sequence[int]], *, pad_id: int, length: int | None = None,
                side: str = 'left') -> tuple[np.ndarray, np.ndarray]:
  """(ids [B, L] int32, mask [B, L] int32) with 1 on real tokens.

  `length` defaults to the longest row; a longer row is an error. Left padding (the default)
  puts every prompt's last token in the last column, where decoding continues.
  """
  if side not in ('left', 'right'):
    raise ValueError(f"pad side {side!r}; expected 'left' or 'right'")
  longest = max((len(x) for x in ids), default=0)
  length = longest if length is None else int(length)
  if longest > length:
    raise ValueError(f'a prompt of {longest} tokens does not fit length={length}')
  out = np.full((len(ids), length), pad_id, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for i, row in enumerate(ids):
    n = len(row)
    cols = slice(length - n, length) if side == 'left' else slice(0, n)
    out[i, cols] = row
    mask[i, cols] = 1
  return out, mask


# ---------------------------------------------------------------------------- tokenizers
def check_tokenizers_match(student_tok, teacher_tok, *, student_name: str = 'student',
                           teacher_name: str = 'teacher') -> None:
  """Raises VocabMismatchError unless both tokenizers map the same strings to the same ids.

  Teachers score the student's token ids, so any difference (added and special tokens
  included) would silently score other tokens. Only tokenizers are compared: a model whose
  embedding table is padded beyond the tokenizer's length is fine.
  """
  s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
  if s_vocab == t_vocab:
    return
  s_by_id = {i: t for t, i in s_vocab.items()}
  t_by_id = {i: t for t, i in t_vocab.items()}
  sizes = f'({student_name}: {len(s_vocab)} tokens, {teacher_name}: {len(t_vocab)})'
  for i in sorted(set(s_by_id) | set(t_by_id)):
    s, t = s_by_id.get(i), t_by_id.get(i)
    if s != t:
      if s is None or t is None:
        longer, tok = (teacher_name, t) if s is None else (student_name, s)
        raise VocabMismatchError(
            f'{student_name} and {teacher_name} tokenizers differ: token id {i} ({tok!r}) '
            f'exists only in the {longer} tokenizer, which is longer {sizes}')
      raise VocabMismatchError(
          f'{student_name} and {teacher_name} tokenizers differ at token id {i}: '
          f'{student_name} has {s!r}, {teacher_name} has {t!r} {sizes}')
  # Same id -> string maps but different dicts: a string mapped to two ids on one side.
  raise VocabMismatchError(f'{student_name} and {teacher_name} tokenizers map some token '
                           f'strings to different ids {sizes}')
