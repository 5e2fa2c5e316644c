"""Collectives in a compiled program, read from its optimized HLO text.

  stats = collective_stats(compiled.as_text())
  stats.loops[0].per_iter['all-gather']      # bytes gathered per iteration of a top loop

XLA's own `cost_analysis()` counts a loop body once, so a decode loop that gathers every
weight at every token looks the same as one that gathers them once. This module walks the
HLO module instead: each computation's collective instructions, the computations it calls
(fusions, async wrappers, conditionals) and its `while` loops, whose bodies are counted
once per iteration: per iteration for the entry's loops, times their trip count for loops
nested inside them (a scan over layers). A trip count is XLA's `known_trip_count` when it
gives one, else the N of an `i < N` test in the loop's condition: exact for a scan, an upper
bound for a decode loop that also stops when every row is done.

Bytes are the collective's result per device: for an all-gather the gathered array, for an
all-reduce the reduced array, for a reduce-scatter the scattered shard, for a
collective-permute or all-to-all the array sent. An async `-start` op counts its result
(the second element of its tuple for all-gather and collective-permute, whose first element
is the operand); its `-done` counts nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')

_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
          'f8e4m3': 1, 'f8e3m4': 1, 'f8e4m3b11fnuz': 1, 'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1,
          's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(sorted(_BYTES, key=len, reverse=True)) +
                    r')\[([0-9,]*)\]')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_CALLS = re.compile(r'\b(?:calls|to_apply|body|condition|true_computation|'
                    r'false_computation)=%?([\w.\-]+)')
_CALL_LISTS = re.compile(r'\b(?:branch_computations|called_computations)=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _split_type(rest: str) -> tuple[str, str]:
  """(result type, text after it) of an instruction's right-hand side."""
  rest = rest.lstrip()
  if not rest.startswith('('):
    head, _, tail = rest.partition(' ')
    return head, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += ch == '('
    depth -= ch == ')'
    if depth == 0:
      return rest[:i + 1], rest[i + 1:]
  return rest, ''


def _top_level(tuple_type: str) -> list[str]:
  """The top-level elements of a tuple type '(a, (b, c), d)'."""
  inner, out, depth, cur = tuple_type[1:-1], [], 0, ''
  for ch in inner:
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    if ch == ',' and depth == 0:
      out.append(cur)
      cur = ''
    else:
      cur += ch
  if cur.strip():
    out.append(cur)
  return out


def type_bytes(t: str) -> int:
  """Bytes of every array in an HLO type string (a tuple's elements summed)."""
  return sum(_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
             for d, dims in _ARRAY.findall(t))


def _largest_dims(t: str) -> str:
  arrays = _ARRAY.findall(t)
  if not arrays:
    return t
  d, dims = max(arrays, key=lambda a: _BYTES[a[0]] * math.prod(
      int(x) for x in a[1].split(',') if x))
  return f'{d}[{dims}]'


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int
  shape: str
  computation: str


@dataclasses.dataclass
class _Comp:
  name: str
  collectives: list = dataclasses.field(default_factory=list)
  calls: list = dataclasses.field(default_factory=list)     # non-loop callees
  loops: list = dataclasses.field(default_factory=list)     # (body, condition, trips or None)
  constants: dict = dataclasses.field(default_factory=dict)  # scalar integer constants
  bound: str | None = None   # the constant an `i < N` compare tests against (a loop condition)


def parse(text: str) -> tuple[dict[str, _Comp], str | None]:
  """The module's computations and the name of its entry computation."""
  comps: dict[str, _Comp] = {}
  entry = None
  cur = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(' '):
      cur = comps.setdefault(m.group(1), _Comp(m.group(1)))
      if line.startswith('ENTRY'):
        entry = m.group(1)
      continue
    if cur is None:
      continue
    if line.startswith('}'):
      cur = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    rtype, rest = _split_type(m.group(2))
    opcode = rest.lstrip().split('(', 1)[0].strip()
    if opcode == 'constant' and re.fullmatch(r'[su](32|64)\[\](\{.*\})?', rtype):
      cur.constants[m.group(1)] = int(re.search(r'constant\((-?\d+)\)', rest).group(1))
    elif opcode == 'compare' and 'direction=LT' in rest and cur.bound is None:
      args = re.search(r'compare\(([^)]*)\)', rest)
      if args and ',' in args.group(1):
        cur.bound = args.group(1).split(',')[1].strip().lstrip('%')
    base = opcode[:-6] if opcode.endswith('-start') else opcode
    if base in KINDS and not opcode.endswith('-done'):
      counted = rtype
      if opcode.endswith('-start') and rtype.startswith('(') and base in (
          'all-gather', 'collective-permute'):
        parts = _top_level(rtype)
        counted = parts[1] if len(parts) > 1 else rtype
      cur.collectives.append(Collective(base, type_bytes(counted), _largest_dims(counted),
                                        cur.name))
    if opcode == 'while':
      body = re.search(r'\bbody=%?([\w.\-]+)', rest)
      cond = re.search(r'\bcondition=%?([\w.\-]+)', rest)
      trip = _TRIP.search(rest)
      cur.loops.append((body.group(1) if body else None, cond.group(1) if cond else None,
                        int(trip.group(1)) if trip else None))
      continue
    cur.calls += _CALLS.findall(rest)
    for lst in _CALL_LISTS.findall(rest):
      cur.calls += [x.strip().lstrip('%') for x in lst.split(',') if x.strip()]
  # A loop whose condition tests `i < N` runs at most N times (exactly N for a scan; a
  # decode loop that also stops when every row is done, at most N).
  for c in comps.values():
    c.loops = [(body, cond, trips if trips is not None else _bound(comps, cond))
               for body, cond, trips in c.loops]
  return comps, entry


def _bound(comps, cond) -> int | None:
  c = comps.get(cond)
  if c is None or c.bound is None:
    return None
  return c.constants.get(c.bound)


@dataclasses.dataclass
class LoopStats:
  """One loop of the entry computation: bytes by kind per iteration (nested loops times
  their known trip count), its own trip count if XLA knows it, the largest collectives."""
  body: str
  trips: int | None
  per_iter: dict
  largest: list
  unknown_nested_trips: int = 0
  collectives: int = 0         # collective instructions run per iteration

  @property
  def total_per_iter(self) -> int:
    return sum(self.per_iter.values())


@dataclasses.dataclass
class CollectiveStats:
  outside: dict                 # bytes by kind outside any loop (once per call)
  loops: list                   # LoopStats of the entry's loops
  count: int                    # collective instructions in the module

  def total(self, default_trips: int = 1) -> dict:
    """Bytes by kind for one call, loops counted `trips` times (`default_trips` when XLA
    does not know a loop's trip count, e.g. the decode loop's tokens)."""
    out = dict(self.outside)
    for lp in self.loops:
      n = lp.trips if lp.trips is not None else default_trips
      for k, v in lp.per_iter.items():
        out[k] = out.get(k, 0) + v * n
    return out

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


def _accumulate(comps, name, mult, acc, found, unknown, seen):
  """Adds computation `name`'s collectives (and its callees', loops times their trips) to
  `acc` by kind, `mult` times; records each collective in `found`."""
  c = comps.get(name)
  if c is None or name in seen:
    return
  seen = seen | {name}
  for col in c.collectives:
    acc[col.kind] = acc.get(col.kind, 0) + col.bytes * mult
    found.append((col.bytes * mult, col))
  for callee in c.calls:
    _accumulate(comps, callee, mult, acc, found, unknown, seen)
  for body, cond, trips in c.loops:
    if trips is None:
      unknown[0] += 1
    n = mult * (trips or 1)
    for part in (body, cond):
      if part:
        _accumulate(comps, part, n, acc, found, unknown, seen)


def collective_stats(text: str, keep: int = 5) -> CollectiveStats:
  """Collective bytes of an optimized HLO module (see the module docstring)."""
  comps, entry = parse(text)
  if entry is None:
    raise ValueError('no ENTRY computation in this HLO text')
  e = comps[entry]
  outside: dict = {}
  found: list = []
  unknown = [0]
  for col in e.collectives:
    outside[col.kind] = outside.get(col.kind, 0) + col.bytes
  for callee in e.calls:
    _accumulate(comps, callee, 1, outside, found, unknown, frozenset({entry}))
  loops = []
  for body, cond, trips in e.loops:
    acc, lfound, lunknown = {}, [], [0]
    for part in (body, cond):
      if part:
        _accumulate(comps, part, 1, acc, lfound, lunknown, frozenset({entry}))
    lfound.sort(key=lambda x: -x[0])
    runs = sum(b // c.bytes if c.bytes else 1 for b, c in lfound)
    loops.append(LoopStats(body or '?', trips, acc,
                           [dict(kind=c.kind, bytes=b, shape=c.shape) for b, c in lfound[:keep]],
                           lunknown[0], runs))
  count = sum(len(c.collectives) for c in comps.values())
  return CollectiveStats(outside, loops, count)
