"""JSONL prompt records in ROLL's format: parsing, validation, loading domains of files.

Host-side only (no JAX): the trainer places the padded arrays on devices.

Records follow ROLL's format, one JSON object per line:
  {"id", "prompt" | "messages", "tag", "ground_truth"?, "test_cases"?, "source"?}
Every error names the file, the line and the field (`path:line: field 'x': what is wrong`),
so a bad line in a million-line file is found at start-up, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Mapping, Sequence
from typing import Any


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


def record_dict(r: Record) -> dict:
  """The plain dict the reward functions read (ROLL's field names)."""
  return {**r.extra, 'id': r.id, 'tag': r.tag, 'ground_truth': r.ground_truth,
          'test_cases': r.test_cases, 'messages': r.messages}


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
