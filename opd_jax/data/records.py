"""Prompt data: JSONL records, validation, chat templates per tag, domain interleaving.

Host-side only (no JAX): the trainer places the padded arrays on devices.

Records follow ROLL's format, one JSON object per line:
  {"id", "prompt" | "messages", "tag", "ground_truth"?, "test_cases"?, "source"?}
Every error names the file, the line and the field (`path:line: field 'x': what is wrong`),
so a bad line in a million-line file is found at start-up, not hours into a run.

Multi-host: every host builds the same `PromptSampler` (same files, same seed), so the global
batch of each step is identical everywhere without communication; each host then encodes
only its `host_slice` of it and the trainer assembles the global array from the slices.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Bad input data: the message starts with `path:line:` where the record came from."""


class VocabMismatchError(ValueError):
  """Teacher and student tokenizers map some token id to different strings."""


# ------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class Record:
  """One prompt. `messages` is a chat (a list of {'role', 'content'} dicts); a plain
  `prompt` string becomes one user message. `file`/`line` say where it was read from."""
  id: str
  tag: str
  messages: list[dict[str, Any]]
  ground_truth: Any = None
  test_cases: Any = None
  source: str | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  file: str = '<memory>'
  line: int = 0

  @property
  def where(self) -> str:
    """'path:line' for error messages."""
    return f'{self.file}:{self.line}'


_KNOWN_FIELDS = ('id', 'prompt', 'messages', 'tag', 'ground_truth', 'test_cases', 'source')


def _type_name(x) -> str:
  return 'null' if x is None else type(x).__name__


def _from_json_string(value, field, err):
  # ROLL files often store nested fields (messages, test_cases) as JSON strings.
  if not isinstance(value, str):
    return value
  try:
    return json.loads(value)
  except json.JSONDecodeError as e:
    raise err(field, f'a string that is not valid JSON ({e.msg}, column {e.colno})') from None


def _parse_messages(value, err) -> list[dict[str, Any]]:
  value = _from_json_string(value, 'messages', err)
  if not isinstance(value, list) or not value:
    raise err('messages', 'expected a non-empty list of {role, content} objects (or a JSON '
              f'string of one), got {_type_name(value)}')
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise err(f'messages[{i}]', f'expected an object with role and content, got '
                f'{_type_name(m)}')
    for key in ('role', 'content'):
      if not isinstance(m.get(key), str):
        raise err(f'messages[{i}].{key}', 'missing' if key not in m else
                  f'expected a string, got {_type_name(m[key])}')
    if not m['role']:
      raise err(f'messages[{i}].role', 'empty')
  return value


def _parse_record(obj: dict, err, default_tag: str | None, path: str, line: int) -> Record:
  rid = obj.get('id')
  if rid is None:
    raise err('id', 'missing')
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == '':
    raise err('id', f'expected a non-empty string or an integer, got {rid!r}')
  has_prompt, has_messages = obj.get('prompt') is not None, obj.get('messages') is not None
  if has_prompt == has_messages:
    raise err('prompt', 'a record needs exactly one of "prompt" and "messages"; it has '
              + ('both' if has_prompt else 'neither'))
  if has_prompt:
    if not isinstance(obj['prompt'], str) or not obj['prompt']:
      raise err('prompt', f'expected a non-empty string, got {obj["prompt"]!r:.60}')
    messages = [{'role': 'user', 'content': obj['prompt']}]
  else:
    messages = _parse_messages(obj['messages'], err)
  tag = obj.get('tag', default_tag)
  if tag is None:
    raise err('tag', 'missing (or pass default_tag)')
  if not isinstance(tag, str) or not tag:
    raise err('tag', f'expected a non-empty string, got {tag!r}')
  test_cases = _from_json_string(obj.get('test_cases'), 'test_cases', err)
  if test_cases is not None and not isinstance(test_cases, (list, dict)):
    raise err('test_cases', f'expected a list or an object, got {_type_name(test_cases)}')
  source = obj.get('source')
  if source is not None and not isinstance(source, str):
    raise err('source', f'expected a string, got {_type_name(source)}')
  extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
  return Record(id=str(rid), tag=tag, messages=messages, ground_truth=obj.get('ground_truth'),
                test_cases=test_cases, source=source, extra=extra, file=path, line=line)


def read_jsonl(path: str, *, default_tag: str | None = None) -> list[Record]:
  """Reads and validates one JSONL file of records; blank lines are skipped.

  Raises DataError (`path:line: field 'x': ...`) on the first bad line, on an id used twice
  in the file (naming both lines) and on a file with no records.
  """
  path = str(path)
  records: list[Record] = []
  first_line: dict[str, int] = {}
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, start=1):
      def err(field, what, _n=line_no):
        return DataError(f"{path}:{_n}: field '{field}': {what}")
      try:
        text = raw.decode('utf-8-sig' if line_no == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        raise DataError(f'{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})')
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})') from None
      if not isinstance(obj, dict):
        raise DataError(f'{path}:{line_no}: expected a JSON object, got {_type_name(obj)}')
      rec = _parse_record(obj, err, default_tag, path, line_no)
      if rec.id in first_line:
        raise err('id', f'duplicate id {rec.id!r} (first at line {first_line[rec.id]})')
      first_line[rec.id] = line_no
      records.append(rec)
  if not records:
    raise DataError(f'{path}: no records (the file is empty)')
  return records


def _expand(pattern: str) -> list[str]:
  if not glob.has_magic(pattern):
    return [pattern]
  matches = sorted(glob.glob(pattern))
  if not matches:
    raise DataError(f'{pattern}: the pattern matches no files')
  return matches


def load_domains(files: Mapping[str, str | Sequence[str]], *,
                 default_tag: str | None = None) -> dict[str, list[Record]]:
  """{domain: records} from config's {domain: path or list of paths (globs allowed)}.

  A domain's files are concatenated in the order given; an id that appears in two files of
  one domain is an error naming both places.
  """
  if not files:
    raise DataError('no data files configured (config.data.files is empty)')
  domains = {}
  for name, paths in files.items():
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
      raise DataError(f"domain '{name}': no files")
    records, seen = [], {}
    for path in (p for pattern in paths for p in _expand(str(pattern))):
      for rec in read_jsonl(path, default_tag=default_tag):
        if rec.id in seen:
          raise DataError(f"{rec.where}: field 'id': duplicate id {rec.id!r} in domain "
                          f"'{name}' (first at {seen[rec.id]})")
        seen[rec.id] = rec.where
        records.append(rec)
    domains[name] = records
  return domains


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


# ------------------------------------------------------------------ domain interleaving
def _fingerprint(records: Sequence[Record]) -> int:
  # Detects data that changed under a checkpoint: resuming would silently draw other rows.
  return zlib.crc32('\n'.join(r.id for r in records).encode())


class PromptSampler:
  """Draws global batches of records, interleaving domains with fixed probabilities.

  Each slot's domain is drawn from `interleave` (normalised; None = proportional to domain
  size); the record comes from that domain's shuffled order, reshuffled every epoch. Both
  are pure functions of (seed, batch index) and (seed, domain, epoch), so the state is a few
  counters and every host draws the same batches.
  """

  STATE_VERSION = 1

  def __init__(self, domains: Mapping[str, Sequence[Record]], *,
               interleave: Mapping[str, float] | None = None, seed: int = 0):
    if not domains:
      raise ValueError('PromptSampler: no domains')
    for name, recs in domains.items():
      if not recs:
        raise ValueError(f"PromptSampler: domain '{name}' has no records")
    if not isinstance(seed, int) or seed < 0:
      raise ValueError(f'PromptSampler: seed must be a non-negative int, got {seed!r}')
    self.names = sorted(domains)  # sorted: indices do not depend on config dict order
    self.domains = {n: list(domains[n]) for n in self.names}
    self.seed = seed
    self.probs = self._probabilities(interleave)
    self._epoch = {n: 0 for n in self.names}
    self._cursor = {n: 0 for n in self.names}
    self._order: dict[str, tuple[int, np.ndarray]] = {}  # domain -> (epoch, permutation)
    self._batches = 0

  def _probabilities(self, interleave) -> np.ndarray:
    if interleave is None:
      w = np.array([len(self.domains[n]) for n in self.names], np.float64)
      return w / w.sum()
    unknown = sorted(set(interleave) - set(self.names))
    if unknown:
      raise ValueError(f'data.interleave: unknown domains {unknown}; the domains are '
                       f'{self.names}')
    missing = sorted(set(self.names) - set(interleave))
    if missing:
      raise ValueError(f'data.interleave: no weight for domains {missing} (give every '
                       'domain a weight, 0 to leave one out, or no interleave at all)')
    w = np.array([float(interleave[n]) for n in self.names])
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f'data.interleave: weights must be finite, non-negative and not all '
                       f'zero, got {dict(interleave)}')
    return w / w.sum()

  @property
  def probabilities(self) -> dict[str, float]:
    """The normalised sampling probability of each domain."""
    return dict(zip(self.names, self.probs.tolist()))

  def _order_of(self, name: str) -> np.ndarray:
    epoch = self._epoch[name]
    cached = self._order.get(name)
    if cached is None or cached[0] != epoch:
      rng = np.random.default_rng([self.seed, 1, zlib.crc32(name.encode()), epoch])
      self._order[name] = cached = (epoch, rng.permutation(len(self.domains[name])))
    return cached[1]

  def next_batch(self, n: int) -> list[Record]:
    """The next global batch of `n` records (identical on every host)."""
    if n < 1:
      raise ValueError(f'batch size must be positive, got {n}')
    rng = np.random.default_rng([self.seed, 0, self._batches])
    choice = rng.choice(len(self.names), size=n, p=self.probs)
    batch = []
    for d in choice:
      name = self.names[d]
      if self._cursor[name] == len(self.domains[name]):
        self._epoch[name] += 1
        self._cursor[name] = 0
      batch.append(self.domains[name][self._order_of(name)[self._cursor[name]]])
      self._cursor[name] += 1
    self._batches += 1
    return batch

  def state(self) -> dict:
    """A JSON-serialisable snapshot; `restore` of it continues with the same batches."""
    return {
        'version': self.STATE_VERSION, 'seed': self.seed, 'batches': self._batches,
        'probabilities': self.probabilities,
        'domains': {n: {'epoch': self._epoch[n], 'cursor': self._cursor[n],
                        'size': len(self.domains[n]),
                        'fingerprint': _fingerprint(self.domains[n])} for n in self.names},
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state()`; the domains and their records must be the same as then."""
    if state.get('version') != self.STATE_VERSION:
      raise ValueError(f'sampler state version {state.get("version")!r}; expected '
                       f'{self.STATE_VERSION}')
    if state['seed'] != self.seed:
      raise ValueError(f'sampler state has seed {state["seed"]}, this sampler {self.seed}')
    if sorted(state['domains']) != self.names:
      raise ValueError(f'sampler state has domains {sorted(state["domains"])}, the data has '
                       f'{self.names}')
    for n, d in state['domains'].items():
      if (d['size'], d['fingerprint']) != (len(self.domains[n]), _fingerprint(self.domains[n])):
        raise ValueError(f"domain '{n}': its records changed since the state was saved "
                         f"({d['size']} then, {len(self.domains[n])} now); resuming would "
                         'not draw the same batches')
    saved = state.get('probabilities', {})
    if any(not math.isclose(saved.get(n, -1), p) for n, p in self.probabilities.items()):
      log.warning('data.interleave changed since the state was saved (%s -> %s)', saved,
                  self.probabilities)
    self._batches = int(state['batches'])
    self._epoch = {n: int(state['domains'][n]['epoch']) for n in self.names}
    self._cursor = {n: int(state['domains'][n]['cursor']) for n in self.names}
    self._order.clear()


def host_slice(batch: Sequence[Any], process_index: int, process_count: int) -> Sequence[Any]:
  """The contiguous rows of a global batch that host `process_index` encodes.

  Rows [i*B/P, (i+1)*B/P): concatenating the slices of processes 0..P-1 gives the batch back.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  if len(batch) % process_count:
    raise ValueError(f'global batch of {len(batch)} rows does not divide over '
                     f'{process_count} processes')
  k = len(batch) // process_count
  return batch[process_index * k:(process_index + 1) * k]


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
