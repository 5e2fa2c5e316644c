"""TensorBoard (tensorboardX) event files and the console progress line; process 0 only."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


def _fmt_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class MetricWriter:
  """Scalars and text to `workdir` (TensorBoard) plus a one-line console summary per log step.

  Every scalar is also kept in `history[name] = [(step, value), ...]` so scripts (the demo,
  tests) can read curves without parsing event files.
  """

  def __init__(self, workdir: str, total_steps: int, *, enabled: bool | None = None,
               start_step: int = 0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self.t0 = time.time()
    self.start_step = start_step
    self.history: dict[str, list[tuple[int, float]]] = {}
    self.writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(workdir, flush_secs=10)

  def scalars(self, step: int, values: Mapping[str, float]):
    for k, v in values.items():
      v = float(np.asarray(v))
      self.history.setdefault(k, []).append((step, v))
      if self.writer is not None:
        self.writer.add_scalar(k, v, step)

  def text(self, step: int, tag: str, text: str):
    if self.writer is not None:
      self.writer.add_text(tag, text, step)

  def progress(self, step: int, values: Mapping[str, float], prefix: str = ''):
    """`step 12/200 | 0:01:23 elapsed | ETA 0:10:00 | loss ... | reverse_kl ... | acc ...`"""
    if not self.enabled:
      return
    elapsed = time.time() - self.t0
    done = max(1, step - self.start_step)
    eta = elapsed / done * max(0, self.total_steps - step)
    parts = [f'{prefix}step {step}/{self.total_steps}', f'{_fmt_duration(elapsed)} elapsed',
             f'ETA {_fmt_duration(eta)}']
    if values.get('compute/flops/total') is not None:
      parts.append(f'{float(values["compute/flops/total"]):.3g} FLOPs')
    for key, label in (('loss', 'loss'), ('opd/reverse_kl', 'reverse_kl'),
                       ('reward/mean', 'reward'), ('eval/accuracy', 'acc')):
      if key in values and values[key] is not None and not math.isnan(float(values[key])):
        parts.append(f'{label} {float(values[key]):.4f}')
      elif key == 'eval/accuracy' and key in self.history:
        parts.append(f'{label} {self.history[key][-1][1]:.4f}')
    print(' | '.join(parts), flush=True)

  def flush(self):
    if self.writer is not None:
      self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()
