"""Per-chip figures of TPU generations and an analytic time estimate per phase (no JAX).

The one table of chip figures in the package (`opd_jax.tools.aot` reads its HBM sizes here):
bf16 matmul peak, HBM capacity and bandwidth, and ICI bandwidth, per chip, from Cloud TPU's
published system-architecture figures. An estimate is a roofline:

  time = max(FLOPs / peak, HBM bytes / HBM bandwidth) + ICI bytes / ICI bandwidth
         + collectives x latency

Matmuls and memory traffic overlap on a TPU; the collectives of a step are counted as not
overlapped (a decode step's all-reduces sit between its matmuls, and XLA can hide an FSDP
gather only partly), which makes the estimate an upper bound on what the schedule can do.
`binding` names the largest term. Every input is per chip: divide a phase's FLOPs by the
chips that share it, and give the bytes each chip moves (the busiest device's, from the
compiled program).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: bf16 peak FLOP/s, HBM bytes, HBM and ICI bandwidth (bytes/s, ICI summed
  over the chip's links), and TensorCores per chip (v4 and v5p are megacores; compile-only
  topologies show one device per TensorCore)."""
  name: str
  peak_flops: float
  hbm_bytes: int
  hbm_bw: float
  ici_bw: float
  cores: int = 1


CHIPS = {
    'v4': Chip('v4', 275e12, 32 * GiB, 1228e9, 300e9, cores=2),
    'v5e': Chip('v5e', 197e12, 16 * GiB, 819e9, 200e9),
    'v5p': Chip('v5p', 459e12, 95 * GiB, 2765e9, 600e9, cores=2),
    'v6e': Chip('v6e', 918e12, 32 * GiB, 1640e9, 448e9),
}

# Fixed cost per collective (synchronisation and a few ICI hops); tens of microseconds on
# a real slice, so it only matters for the many small all-reduces of a decode step.
COLLECTIVE_LATENCY_S = 10e-6


@dataclasses.dataclass
class Estimate:
  """Seconds per term and their estimate; `binding` is the largest term."""
  flops: float
  hbm_bytes: float
  ici_bytes: float
  collectives: float
  compute_s: float
  hbm_s: float
  ici_s: float
  latency_s: float

  @property
  def seconds(self) -> float:
    return max(self.compute_s, self.hbm_s) + self.ici_s + self.latency_s

  @property
  def binding(self) -> str:
    terms = {'compute': self.compute_s, 'HBM': self.hbm_s, 'ICI': self.ici_s,
             'latency': self.latency_s}
    return max(terms, key=terms.get)


def estimate(chip: Chip, *, flops: float, hbm_bytes: float, ici_bytes: float = 0.0,
             collectives: float = 0.0) -> Estimate:
  """The roofline of one phase on one chip (every input per chip)."""
  return Estimate(flops, hbm_bytes, ici_bytes, collectives, flops / chip.peak_flops,
                  hbm_bytes / chip.hbm_bw, ici_bytes / chip.ici_bw,
                  collectives * COLLECTIVE_LATENCY_S)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, rows: int,
                   slots: float, itemsize: int) -> float:
  """Bytes of the keys and values of `rows` rows over `slots` cache slots."""
  return 2.0 * num_layers * rows * slots * num_kv_heads * head_dim * itemsize
