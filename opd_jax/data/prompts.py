"""Prompt sampling: global batches of records, interleaving domains with fixed
probabilities (`PromptSampler`, resumable), and each host's slice of a batch.

Multi-host: every host builds the same `PromptSampler` (same files, same seed), so the global
batch of each step is identical everywhere without communication; each host then encodes
only its `host_slice` of it and the trainer assembles the global array from the slices.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from opd_jax.data.records import Record

log = logging.getLogger(__name__)


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
