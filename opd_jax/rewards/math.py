"""'math': the response's final answer is checked against ground_truth with math-verify.

The prediction is the last \\boxed{...} answer (boxed answers take priority), else the last
number or expression math-verify finds; equivalent forms match (1/2 = 0.5 = \\frac{1}{2},
3 = 3.0, \\sqrt{2} = 2^{1/2}). Wrong, missing or unparsable answers score 0; nothing raises
except a record without ground_truth.

Bounding the time (math-verify + sympy can run for ever on inputs such as 9^{9^{9^9}}):
  * math-verify's own timeouts use signal.alarm, a ValueError in worker threads, so they are
    switched off (parsing_timeout=None, timeout_seconds=None) and replaced by one deadline
    around the whole check: in the main thread an interval timer (SIGALRM) whose handler raises,
    exactly as math-verify does; in other threads a watchdog that injects the same exception
    into the checking thread (PyThreadState_SetAsyncExc). Both interrupt Python code; only the
    signal also interrupts CPython's big-integer loops, which check for signals.
  * Because no deadline can stop a single huge C-level computation in a worker thread, the
    parsed expressions are screened before they are compared: a power whose exact value would
    exceed ~8M bits, or a factorial of more than 100000, scores 0 without being evaluated.
  * Only `max_answer_chars` characters are parsed: from the last \\boxed on, or the tail of the
    response when it has no box, so that degenerate, very long outputs stay cheap.
  * Checks are serialised by a lock: math-verify's ANTLR parser is not known to be thread-safe,
    and threads would not run it faster under the GIL anyway.
math_verify (and sympy) are imported on first use, so importing opd_jax.rewards stays cheap.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from opd_jax.rewards.registry import register_reward, record_id, require_field
from opd_jax.rewards.text import final_text, last_boxed_start

log = logging.getLogger(__name__)

T = TypeVar('T')

_MAX_BITS = 1 << 23        # exact numbers above ~2.5M digits are not built (seconds of bignum work)
_MAX_FACTORIAL = 100_000   # 100000! has 456574 digits and takes ~0.3 s
_REFIRE_S = 0.25           # re-raise this often in case a bare `except:` swallowed the deadline

_LOCK = threading.Lock()


class DeadlineExceeded(BaseException):
  """Raised inside a check that ran past its deadline.

  A BaseException, so that math-verify's and sympy's `except Exception` do not swallow it.
  """


# ------------------------------------------------------------------------------ deadline
def _with_alarm(fn: Callable[[], T], timeout_s: float) -> T:
  armed = [True]

  def on_alarm(signum, frame):
    if armed[0]:
      signal.setitimer(signal.ITIMER_REAL, _REFIRE_S)
      raise DeadlineExceeded

  previous = signal.signal(signal.SIGALRM, on_alarm)
  try:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
      return fn()
    finally:
      armed[0] = False
  finally:
    # Disarmed first, so the handler can no longer raise while the timer and handler are restored.
    armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    # None: the previous handler was not installed from Python, i.e. the default one.
    signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


class _Watchdog:
  """Raises DeadlineExceeded in the calling thread after timeout_s, then every _REFIRE_S."""

  def __init__(self, timeout_s: float):
    import ctypes
    self._ctypes = ctypes
    self._thread_id = threading.get_ident()
    self._lock = threading.Lock()
    self._done = False
    self._timer = threading.Timer(timeout_s, self._fire)
    self._timer.daemon = True
    self._timer.start()

  def _set_async_exc(self, exc) -> None:
    self._ctypes.pythonapi.PyThreadState_SetAsyncExc(
        self._ctypes.c_ulong(self._thread_id),
        None if exc is None else self._ctypes.py_object(exc))

  def _fire(self) -> None:
    with self._lock:
      if self._done:
        return
      self._set_async_exc(DeadlineExceeded)
      self._timer = threading.Timer(_REFIRE_S, self._fire)
      self._timer.daemon = True
      self._timer.start()

  def stop(self) -> None:
    """Stops firing and drops an exception that is set but not yet raised (idempotent).

    An exception already on its way may still be raised in here (at most one per firing);
    retrying until the flag is set under the lock guarantees none is raised afterwards.
    """
    while True:
      try:
        with self._lock:
          self._done = True
          self._set_async_exc(None)
          self._timer.cancel()
        return
      except DeadlineExceeded:
        continue


def call_with_deadline(fn: Callable[[], T], timeout_s: float, on_timeout: T) -> T:
  """fn(), or on_timeout when it runs longer than timeout_s seconds (see the module docstring).

  Uses SIGALRM in the main thread when no other interval timer is pending, else a watchdog
  thread. Either way the deadline interrupts Python code only between bytecodes.
  """
  if (threading.current_thread() is threading.main_thread()
      and signal.getitimer(signal.ITIMER_REAL)[0] == 0):
    try:
      return _with_alarm(fn, timeout_s)
    except DeadlineExceeded:
      return on_timeout
  watchdog = _Watchdog(timeout_s)
  try:
    try:
      return fn()
    finally:
      watchdog.stop()
  except DeadlineExceeded:
    watchdog.stop()  # again, in case the first stop was itself interrupted
    return on_timeout


# ------------------------------------------------------------------------- math-verify
class _DropTimeoutWarning(logging.Filter):
  # math-verify warns once that its own timeout is off; ours replaces it, so the warning misleads.
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Timeout is disabled')


@functools.lru_cache(maxsize=None)
def _math_verify():
  import math_verify
  for name in ('math_verify.parser', 'math_verify.grader'):
    logging.getLogger(name).addFilter(_DropTimeoutWarning())
  pred_config = (math_verify.LatexExtractionConfig(boxed_match_priority=0),
                 math_verify.ExprExtractionConfig())
  return math_verify, pred_config


def _bound(node) -> float:
  """A rough upper bound of |value| of a sympy subtree as a float (inf when huge).

  Symbols and constants count as 1; it only needs to be right about the order of magnitude
  of exponents and factorial arguments.
  """
  import sympy
  if node.is_Number:
    try:
      return abs(float(node))
    except (OverflowError, TypeError, ValueError):
      return math.inf
  if not node.args:
    return 1.0
  args = [_bound(a) for a in node.args]
  try:
    if isinstance(node, sympy.Pow):
      return float(args[0] ** args[1])
    if isinstance(node, sympy.factorial):
      return math.inf if args[0] > 170 else math.gamma(args[0] + 1)
    if node.is_Mul:
      return math.prod(args)
  except (OverflowError, ZeroDivisionError):
    return math.inf
  return math.fsum(args) if all(math.isfinite(a) for a in args) else math.inf


def _too_large(obj) -> bool:
  """True when comparing obj may build an exact number too large to compute in bounded time."""
  import sympy
  if isinstance(obj, sympy.MatrixBase):
    return any(_too_large(x) for x in obj)
  if not isinstance(obj, sympy.Basic):
    return False
  for node in sympy.preorder_traversal(obj):
    if isinstance(node, sympy.Pow):
      if node.base in (sympy.S.Zero, sympy.S.One, sympy.S.NegativeOne):
        continue
      base = _bound(node.base)
      bits_per_unit = max(1.0, math.log2(base)) if base > 0 else 1.0
      if _bound(node.exp) * bits_per_unit > _MAX_BITS:
        return True
    elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial)):
      if _bound(node.args[0]) > _MAX_FACTORIAL:
        return True
  return False


@functools.lru_cache(maxsize=4096)
def _parse_gold(truth: str) -> tuple:
  """Parsed ground truth (cached: the n samples of one prompt share it).

  A plain answer ('0.5', '\\frac{1}{2}', '(1,2)') is boxed first so that LaTeX without $...$
  parses; already boxed or $-delimited answers are parsed as they are.
  """
  mv, _ = _math_verify()
  candidates = [truth] if ('\\boxed' in truth or '$' in truth) else ['\\boxed{' + truth + '}',
                                                                     truth]
  for text in candidates:
    parsed = mv.parse(text, parsing_timeout=None)
    if parsed:
      return tuple(parsed)
  return ()


def _answer_region(text: str, max_chars: int) -> str:
  start = last_boxed_start(text)
  return text[start:start + max_chars] if start >= 0 else text[-max_chars:]


_warned: set[tuple[str, ...]] = set()


def _warn_once(truths: list[str], record, problem: str) -> None:
  # A bad ground truth is a data problem worth one line, not one per sample and epoch.
  if tuple(truths) not in _warned:
    _warned.add(tuple(truths))
    log.warning('math reward: ground_truth %r of record %s %s; it scores 0', truths,
                record_id(record), problem)


def _check(truths: list[str], response: str, max_answer_chars: int, record) -> float:
  mv, pred_config = _math_verify()
  gold = [g for t in truths for g in _parse_gold(t)]
  if not gold:
    _warn_once(truths, record, 'does not parse')
    return 0.0
  if any(_too_large(g) for g in gold):
    _warn_once(truths, record, 'is too large to compare')
    return 0.0
  pred = mv.parse(_answer_region(final_text(response), max_answer_chars),
                  extraction_config=pred_config, parsing_timeout=None)
  if not pred or any(_too_large(p) for p in pred):
    return 0.0
  return float(mv.verify(gold, pred, timeout_seconds=None))


@register_reward('math')
def math_reward(response: str, record: Mapping[str, Any], *, timeout_s: float = 5.0,
                max_answer_chars: int = 1000) -> float:
  """1.0 when the response's final answer equals ground_truth mathematically, else 0.0.

  ground_truth: a string ('0.5', '1/2', '\\frac{1}{2}', '\\boxed{3}'), a number, or a list of
    acceptable answers.
  timeout_s: wall-clock bound on parsing and comparing one response (0.0 when exceeded).
  max_answer_chars: how much of the response is parsed (see the module docstring).
  """
  truth = require_field(record, 'ground_truth', 'math')
  truths = [str(t).strip() for t in (truth if isinstance(truth, (list, tuple)) else [truth])]
  _math_verify()  # imported before the deadline starts: an interrupted import leaves modules broken
  with _LOCK:
    return call_with_deadline(lambda: _check(truths, response, max_answer_chars, record),
                              timeout_s, 0.0)
