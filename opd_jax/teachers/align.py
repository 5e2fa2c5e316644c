"""The cross-tokenizer alignment rule: a teacher's per-token logprobs of a text, re-attributed
to the student's tokens of the same text by character offsets (docs/design.md §12).

Host-side only (numpy and a tokenizer's `decode`; no JAX, no config).

Offsets. Each token of a tokenization of `text` gets its *end offset*: the number of
characters of `text` covered by the tokens up to and including it,
`end[k] = common_prefix_len(decode(ids[:k+1]), text)`. (A token that ends inside a
multi-byte character decodes to U+FFFD there, so its prefix stops before that character and
the token that completes it carries it.) Both sides go through the same function, so the
offsets do not depend on a tokenizer's offset-mapping conventions.

The rule. With student end offsets e_0 <= ... <= e_{n-1} and teacher end offsets
f_0 <= ... <= f_{m-1} over the same text, teacher token j is attributed to the student
token in which it ends, i(j) = min{i : e_i >= f_j} (the last student token when none), and
the student token's aligned logprob is the sum over the teacher tokens attributed to it:

    t~_i = sum_{j : i(j) = i} t_j.

Exactness. The sum over a response is always preserved: sum_i t~_i = sum_j t_j, the
teacher's log-probability of the whole response text (under its own tokenization of that
text). Per token, t~_i is exactly the teacher's log-probability of the student token's text
given everything before it, log p_T(text(e_{i-1}, e_i] | prompt, text[:e_{i-1}]), whenever
both boundaries e_{i-1} and e_i are also teacher boundaries (one to one: one teacher token
spans the same characters; split: several teacher tokens do). Where a teacher token crosses
a student boundary (merged), its whole logprob goes to the student token where it ends and
the earlier student tokens it overlaps get nothing from it: the per-token split inside the
merged span is the approximation, its total is exact. With identical tokenizations every
token is one to one and t~ = t bit for bit (a sum of one term).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

KINDS = ('one_to_one', 'split', 'merged')


def _common_prefix_len(a: str, b: str) -> int:
  n = min(len(a), len(b))
  if a[:n] == b[:n]:
    return n
  lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if a[:mid] == b[:mid]:
      lo = mid
    else:
      hi = mid
  return lo


def decode(tokenizer, ids) -> str:
  """The text of `ids` exactly as the tokenizer writes it (special tokens kept as their text,
  no clean-up of spaces)."""
  return tokenizer.decode(list(ids), skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)


def end_offsets(tokenizer, ids, text: str | None = None) -> np.ndarray:
  """[n] int64 end offset in `text` (default: the decoded `ids`) of each token: the length
  of the common prefix of `decode(ids[:k+1])` and `text` (non-decreasing).

  Fast paths: when the tokens decode one by one to pieces that concatenate to `text` (char-
  and byte-level vocabularies on whole characters), the cumulative piece lengths; for a
  byte-level BPE, the cumulative bytes of the vocabulary strings (linear, also where tokens
  end inside a character). Otherwise (e.g. SentencePiece, whose lone pieces drop their
  leading space) each prefix is decoded: quadratic in n."""
  ids = [int(i) for i in ids]
  if text is None:
    text = decode(tokenizer, ids)
  pieces = [decode(tokenizer, [i]) for i in ids]
  if ''.join(pieces) == text and not any('\ufffd' in p for p in pieces):
    return np.cumsum([len(p) for p in pieces], dtype=np.int64).reshape(len(ids))
  ends = _byte_level_ends(tokenizer, ids, text)
  if ends is not None:
    return ends
  out = np.zeros(len(ids), np.int64)
  for k in range(len(ids)):
    out[k] = _common_prefix_len(decode(tokenizer, ids[:k + 1]), text)
  return np.maximum.accumulate(out) if len(out) else out


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
  """The inverse of the byte-level BPE alphabet (GPT-2's printable stand-in per byte)."""
  keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
  chars, n = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(keep, chars)}


def _byte_level_ends(tokenizer, ids, text: str) -> np.ndarray | None:
  """End offsets in linear time for a byte-level BPE (GPT-2, Qwen, Llama 3): each token's
  bytes from its vocabulary string, cumulated, then mapped to the characters whose bytes
  are complete by then. None when `tokenizer` is not byte-level or its bytes are not `text`'s
  (the caller then decodes prefixes)."""
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  if backend is None or type(backend.decoder).__name__ != 'ByteLevel':
    return None
  table, added = _unicode_to_byte(), getattr(tokenizer, 'added_tokens_decoder', {})
  lengths = []
  for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
    if i in added:
      lengths.append(len(added[i].content.encode('utf-8')))
    elif tok is None or any(c not in table for c in tok):
      return None
    else:
      lengths.append(len(tok))
  raw = text.encode('utf-8')
  if sum(lengths) != len(raw):
    return None
  char_byte_ends = np.cumsum([len(c.encode('utf-8')) for c in text], dtype=np.int64)
  byte_ends = np.cumsum(lengths, dtype=np.int64)
  return np.searchsorted(char_byte_ends, byte_ends, side='right').astype(np.int64)


def attribute(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
  """[m] index of the student token each teacher token is attributed to: the first student
  token whose end offset is >= the teacher token's (the last student token when none)."""
  e, f = np.asarray(student_ends, np.int64), np.asarray(teacher_ends, np.int64)
  if len(e) == 0:
    raise ValueError('no student tokens to attribute teacher tokens to')
  return np.minimum(np.searchsorted(e, f, side='left'), len(e) - 1)


def aligned_logprobs(teacher_logprobs: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
  """[n] float32: per student token the sum of the teacher logprobs attributed to it."""
  out = np.zeros(n, np.float32)
  np.add.at(out, np.asarray(owner, np.int64), np.asarray(teacher_logprobs, np.float32))
  return out


def kinds(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
  """[n] per student token: 0 one to one (one teacher token spans the same characters),
  1 split (several teacher tokens span exactly its characters), 2 merged (a teacher token
  crosses one of its boundaries: the rule's approximation). Indices into KINDS."""
  e, f = np.asarray(student_ends, np.int64), np.asarray(teacher_ends, np.int64)
  bounds = set(f.tolist()) | {0}
  starts = np.concatenate([[0], e[:-1]]) if len(e) else e
  owner = attribute(e, f) if len(f) and len(e) else np.zeros(0, np.int64)
  count = np.bincount(owner, minlength=len(e)) if len(e) else np.zeros(0, np.int64)
  out = np.full(len(e), 2, np.int64)
  for i in range(len(e)):
    if starts[i] in bounds and e[i] in bounds and count[i] >= 1:
      out[i] = 0 if count[i] == 1 else 1
  return out


@dataclasses.dataclass
class RowAlignment:
  """One response under both tokenizers. `student_ends` / `teacher_ends` cover the response
  text's content tokens; a final stop token on the student side (`stop`) maps one to one to
  the teacher's end-of-turn token, which the teacher ids then end with."""
  text: str
  teacher_ids: list[int]
  student_ends: np.ndarray
  teacher_ends: np.ndarray
  stop: bool

  @property
  def owner(self) -> np.ndarray:
    """[m teacher tokens] -> student token index (the stop token last when `stop`)."""
    n = len(self.student_ends)
    own = attribute(self.student_ends, self.teacher_ends) if n else np.zeros(0, np.int64)
    if self.stop:
      own = np.concatenate([own, [n]]).astype(np.int64)
    return own

  def aligned(self, teacher_logprobs: np.ndarray) -> np.ndarray:
    """[n student tokens (+1 stop)] aligned logprobs from the teacher's [m] response logprobs."""
    n = len(self.student_ends) + int(self.stop)
    if len(self.student_ends) == 0 and len(self.teacher_ends):
      raise ValueError('teacher content tokens but no student content token')
    return aligned_logprobs(teacher_logprobs, self.owner, n)

  def kinds(self) -> np.ndarray:
    k = kinds(self.student_ends, self.teacher_ends)
    return np.concatenate([k, [0]]).astype(np.int64) if self.stop else k


def align_response(student_tok, teacher_tok, response_ids, *, stop_ids=(),
                   teacher_stop_id: int | None = None) -> RowAlignment:
  """The alignment of one student response (its token ids, no padding).

  A last token in `stop_ids` (the student's end of turn) is not text: it maps to
  `teacher_stop_id`. The rest is decoded by the student's tokenizer and re-tokenized by the
  teacher's (no special tokens added)."""
  ids = [int(i) for i in response_ids]
  stop = bool(ids) and ids[-1] in set(int(s) for s in stop_ids)
  if stop:
    if teacher_stop_id is None:
      raise ValueError('the response ends with a stop token but the teacher has no '
                       'end-of-turn token to map it to')
    ids = ids[:-1]
  text = decode(student_tok, ids)
  t_ids = list(teacher_tok(text, add_special_tokens=False)['input_ids']) if text else []
  s_ends = end_offsets(student_tok, ids, text)
  t_ends = end_offsets(teacher_tok, t_ids, text)
  return RowAlignment(text=text, teacher_ids=t_ids + ([int(teacher_stop_id)] if stop else []),
                      student_ends=s_ends, teacher_ends=t_ends, stop=stop)


def alignment_counts(rows) -> dict[str, int]:
  """{'one_to_one', 'split', 'merged'}: student tokens of each kind over `rows`
  (RowAlignments)."""
  counts = np.zeros(len(KINDS), np.int64)
  for r in rows:
    counts += np.bincount(r.kinds(), minlength=len(KINDS))
  return dict(zip(KINDS, (int(c) for c in counts)))
