"""Analytic FLOP counts of the phases of an OPD training step (pure Python / NumPy, no JAX).

Legend: B rows, T query positions, S key positions, D hidden, F MLP hidden, H query heads,
Hk kv heads, E head dim, V vocabulary, L layers, P prompt slots, N max new tokens.

Conventions
  * A multiply-add is 2 FLOPs; every count is an exact Python int of FLOPs.
  * Counted: the matmuls of the decoder (`opd_jax.models.decoder`), per layer and token
      q/k/v/o projections  2 * D * E * (2 H + 2 Hk)    (GQA: k and v have Hk heads)
      gated MLP            2 * 3 * D * F                (gate, up, down)
    per layer, (query, key) pair attended
      QK^T and AV          2 * 2 * H * E                (every query head reads its kv head)
    and the output projection (unembedding) 2 * D * V per position whose logits are computed.
  * Not counted: RMSNorms, rotary embedding, softmax / log-softmax (exp, max, sums),
    masking (`where`), biases, residual adds, SiLU and the gate product, the embedding
    gather, the sampler's top-k / top-p / Gumbel draws and the optimizer (AdamW is ~10-20
    elementwise FLOPs per parameter per update, once per step, not per token). For the tiny
    model of tests/training/test_flops.py (D = 128, E = 32) they are 1.5-3.4 % of what XLA's cost
    analysis reports (measured there); they shrink roughly as 1 / D and 1 / E, so for real
    models (D >= 1024, E = 128) they are ~1 % or less.
  * Causal attention: query i (0-based, of a row's real tokens) attends i + 1 keys, itself
    included, so a row of n tokens attends n (n + 1) / 2 (query, key) pairs.
  * Backward = 2 x forward (a matmul's backward is two matmuls of the same size: the input
    and the weight gradient), so an update is 3 x forward. With rematerialisation
    (`remat=True`: the backward pass recomputes each layer's forward) nearly 4 x forward:
    the recomputation skips each layer's MLP down projection, whose output (the next
    layer's saved input) the backward does not need; XLA drops it as dead code.

Two accounting modes:
  useful   (`forward_flops`, `prefill_flops`, `decode_flops`, `rollout_flops`,
           `score_flops`, `update_flops`): from the real (unpadded) token counts per row;
           this is what runs log and what MFU-style numbers should use (pass `remat=False`
           to `update_flops` for "model FLOPs", `remat=True` for "hardware FLOPs").
  executed (`padded_*`): for the static padded shapes XLA runs: B rows padded to T, full
           [T, S] score matrices (masked positions are computed, then discarded), the
           vocabulary chunks of `scoring.map_vocab_chunks` padded to whole chunks, the decode
           loop's N (or `steps`) iterations over all B rows and all S = P + N cache slots.
           These are what `tests/training/test_flops.py` checks against XLA's cost analysis.

Phase by phase (what the code computes):
  rollout   prefill of the prompt (logits of its last position only), then one decode step
            per response token: step k (1-based) of a row forwards the k-th response token,
            which attends prompt_len + k keys, and computes its logits (the last step's
            logits are never used; that is still one step per response token). So a rollout
            of p + r tokens is one causal forward of p + r tokens with r + 1 unembeddings.
  scoring   (teacher, reference, frozen student) one forward over prompt + response; the
            unembedding runs on the n - 1 positions that predict a next token.
  update    forward + backward of the same forward as scoring (x3, or ~x4 with remat).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Mirrors of `opd_jax.models.decoder.QUERY_BLOCK` and
# `opd_jax.teachers.scoring.DEFAULT_LOGITS_BUDGET`
# (kept here so this module needs no JAX; tests/training/test_flops.py checks that they agree).
QUERY_BLOCK = 512
DEFAULT_LOGITS_BUDGET = 2**28


# ------------------------------------------------------------------------- per-unit costs
def layer_token_flops(cfg) -> int:
  """FLOPs of one layer's weight matmuls (q/k/v/o projections and gated MLP) per token."""
  d, e, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  attn_proj = d * e * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return 2 * (attn_proj + 3 * d * f)


def layer_pair_flops(cfg) -> int:
  """FLOPs of one layer's attention (QK^T and AV) per (query, key) pair."""
  return 2 * 2 * cfg.num_heads * cfg.head_dim


def unembed_position_flops(cfg) -> int:
  """FLOPs of the output projection [D] -> [V] for one position."""
  return 2 * cfg.hidden_size * cfg.vocab_size


def _ints(x) -> np.ndarray:
  a = np.asarray(x, dtype=np.int64).reshape(-1)
  if np.any(a < 0):
    raise ValueError(f'token counts must be >= 0, got {a[a < 0][:4].tolist()}')
  return a


def _causal_pairs(n: np.ndarray) -> np.ndarray:
  return n * (n + 1) // 2


def forward_breakdown(cfg, tokens: int, pairs: int, unembed: int) -> dict[str, int]:
  """Forward FLOPs by component for totals over a batch.

  tokens: query positions run through the layers; pairs: (query, key) pairs attended, per
  layer; unembed: positions whose logits are computed. Returns {'projections', 'mlp',
  'attention', 'unembed', 'total'} in FLOPs.
  """
  d, e, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  nl = cfg.num_layers
  out = {
      'projections': nl * tokens * 2 * d * e * (2 * cfg.num_heads + 2 * cfg.num_kv_heads),
      'mlp': nl * tokens * 2 * 3 * d * f,
      'mlp_down': nl * tokens * 2 * d * f,
      'attention': nl * int(pairs) * layer_pair_flops(cfg),
      'unembed': int(unembed) * unembed_position_flops(cfg),
  }
  out = {k: int(v) for k, v in out.items()}
  out['total'] = out['projections'] + out['mlp'] + out['attention'] + out['unembed']
  return out


def _forward(cfg, tokens, pairs, unembed) -> int:
  return forward_breakdown(cfg, int(tokens), int(pairs), int(unembed))['total']


# ------------------------------------------------------------------------- useful FLOPs
def forward_flops(cfg, lengths, *, attended=None, unembed=None) -> int:
  """Useful FLOPs of one forward pass over rows of real tokens.

  lengths: [B] real tokens per row (or an int for one row).
  attended: [B] (query, key) pairs attended per row; default causal, n (n + 1) / 2.
  unembed: [B] positions per row whose logits are computed; default every position (n).
  """
  n = _ints(lengths)
  pairs = _causal_pairs(n) if attended is None else _ints(attended)
  u = n if unembed is None else _ints(unembed)
  return _forward(cfg, n.sum(), pairs.sum(), u.sum())


def prefill_flops(cfg, prompt_lens) -> int:
  """Useful FLOPs of the sampler's prefill: causal forward of each prompt [B], logits of the
  last position only."""
  p = _ints(prompt_lens)
  return forward_flops(cfg, p, unembed=np.minimum(p, 1))


def decode_flops(cfg, prompt_lens, response_lens) -> int:
  """Useful FLOPs of the decode steps: a row with prompt p and response r runs r single-token
  steps; step k = 1..r attends p + k keys and computes one position's logits."""
  p, r = _ints(prompt_lens), _ints(response_lens)
  if p.shape != r.shape:
    raise ValueError(f'{p.shape[0]} prompt lengths but {r.shape[0]} response lengths')
  return _forward(cfg, r.sum(), (r * p + _causal_pairs(r)).sum(), r.sum())


def rollout_flops(cfg, prompt_lens, response_lens) -> int:
  """Useful FLOPs of a rollout: prefill + decode."""
  return prefill_flops(cfg, prompt_lens) + decode_flops(cfg, prompt_lens, response_lens)


def score_flops(cfg, seq_lens) -> int:
  """Useful FLOPs of scoring sequences (prompt + response, [B] real tokens per row) under a
  teacher / reference model `cfg`: causal forward, logits on the n - 1 predicting positions."""
  n = _ints(seq_lens)
  return forward_flops(cfg, n, unembed=np.maximum(n - 1, 0))


def _update_from_parts(parts: dict[str, int], remat: bool) -> int:
  """3 x forward, plus with remat the recomputed forward less the MLP down projections."""
  total = 3 * parts['total']
  if remat:
    total += parts['total'] - parts['mlp_down']
  return total


def update_flops(cfg, seq_lens, *, remat: bool) -> int:
  """Useful FLOPs of the student's update on sequences [B] (real tokens per row).

  3 x the scoring forward (backward = 2 x forward); with `remat` the backward pass first
  recomputes each layer's forward, except its MLP down projection: that output is the next
  layer's (saved) input, which the backward never needs, so XLA removes it as dead code
  (about 4 x forward, a little less; measured in tests/training/test_flops.py).
  """
  n = _ints(seq_lens)
  parts = forward_breakdown(cfg, int(n.sum()), int(_causal_pairs(n).sum()),
                            int(np.maximum(n - 1, 0).sum()))
  return _update_from_parts(parts, remat)


# Vocabulary passes of `losses.streamed_divergence` per `loss.full_vocab` option (the exact
# and student-top-k options, computed in the update from the teacher's hidden states).
STREAMED_PASSES = {'forward_kl_exact': 1, 'reverse_kl_exact': 1, 'jsd_exact': 2,
                   'reverse_kl_student_topk': 1}


def streamed_loss_flops(student_cfg, teacher_cfg, seq_lens, option,
                        truncated: bool = False) -> int:
  """Useful FLOPs that an exact / student-top-k `loss.full_vocab` option adds to the update
  on sequences [B] (real tokens per row); 0 for the other options (None, top-k).

  Per predicting position (n - 1 per row) and vocabulary pass: the forward computes the
  student's and the teacher's logits (2 D V each); the backward pass recomputes both (each
  vocabulary chunk is under `jax.checkpoint`) and runs the student's two gradient matmuls
  (hidden states and output projection, 2 D V each); the teacher gets no gradient. So a
  pass is 4 x the student's unembedding + 2 x the teacher's. Not counted, as elsewhere: the
  exponentials, sums and top-k. This is in addition to `update_flops`, whose unembedding
  term is the pass that computes the sampled tokens' logprobs. With `truncated` (rollout
  top-k / top-p) a forward-only pass first finds the student's untruncated normaliser: one
  more student unembedding per position.
  """
  passes = STREAMED_PASSES.get(option, 0)
  if not passes:
    return 0
  if int(teacher_cfg.vocab_size) != int(student_cfg.vocab_size):
    raise ValueError(f'teacher vocabulary {teacher_cfg.vocab_size} != student vocabulary '
                     f'{student_cfg.vocab_size}')
  positions = int(np.maximum(_ints(seq_lens) - 1, 0).sum())
  per_position = 4 * unembed_position_flops(student_cfg) + 2 * unembed_position_flops(
      teacher_cfg)
  extra = unembed_position_flops(student_cfg) if truncated else 0
  return positions * (passes * per_position + extra)


# ------------------------------------------------------------------------- executed FLOPs
def auto_chunk_size(batch: int, length: int, vocab: int,
                    budget_bytes: int = DEFAULT_LOGITS_BUDGET) -> int:
  """Same as `opd_jax.teachers.scoring.auto_chunk_size` (positions per vocabulary chunk)."""
  c = max(1, budget_bytes // max(1, batch * vocab * 4))
  c = 1 << (c.bit_length() - 1)
  return int(min(c, max(1, length)))


def _chunked_positions(cfg, batch: int, positions: int, chunk_size, rows_per_call: int) -> int:
  """Positions `map_vocab_chunks` unembeds for [batch, positions]: padded to whole chunks."""
  c = chunk_size or auto_chunk_size(rows_per_call, positions, cfg.vocab_size)
  return batch * (-(-positions // c)) * c


def padded_forward_flops(cfg, batch: int, length: int) -> int:
  """Executed FLOPs of `Decoder.__call__` on [B, T]: every row, the full [T, T] score matrix,
  logits [B, T, V]."""
  return _forward(cfg, batch * length, batch * length * length, batch * length)


def padded_prefill_flops(cfg, batch: int, prompt_slots: int) -> int:
  """Executed FLOPs of `rollout.decode.prefill` on [B, P]: [P, P] scores, logits of slot P - 1."""
  return _forward(cfg, batch * prompt_slots, batch * prompt_slots**2, batch)


def padded_decode_step_flops(cfg, batch: int, cache_slots: int) -> int:
  """Executed FLOPs of one iteration of the decode loop: B tokens attend all S slots of the
  cache (masked slots included), logits [B, V]."""
  return _forward(cfg, batch, batch * cache_slots, batch)


def padded_decode_flops(cfg, batch: int, prompt_slots: int, max_new_tokens: int, *,
                        steps: int | None = None) -> int:
  """Executed FLOPs of `rollout.sampler._decode`: `steps` loop iterations (the rollout's
  `decode_steps`; default N, the loop exits early once every row is done)."""
  steps = max_new_tokens if steps is None else int(steps)
  return steps * padded_decode_step_flops(cfg, batch, prompt_slots + max_new_tokens)


def padded_rollout_flops(cfg, batch: int, prompt_slots: int, max_new_tokens: int, *,
                         steps: int | None = None) -> int:
  """Executed FLOPs of a rollout: padded prefill + padded decode."""
  return (padded_prefill_flops(cfg, batch, prompt_slots)
          + padded_decode_flops(cfg, batch, prompt_slots, max_new_tokens, steps=steps))


def padded_score_flops(cfg, batch: int, length: int, *, chunk_size: int | None = None,
                       micro_batches: int = 1) -> int:
  """Executed FLOPs of `scoring.make_score_fn(...)` on [B, T]: the forward over all B x T
  positions with [T, T] scores, logits of the T - 1 predicting positions padded to whole
  vocabulary chunks. `micro_batches`: the number of row groups actually used (see
  `scoring.row_groups`); it only changes the automatic chunk size."""
  rows = batch // max(1, micro_batches)
  u = _chunked_positions(cfg, batch, length - 1, chunk_size, rows)
  return _forward(cfg, batch * length, batch * length * length, u)


def padded_update_flops(cfg, batch: int, length: int, *, remat: bool,
                        chunk_size: int | None = None, micro_batches: int = 1) -> int:
  """Executed FLOPs of `update.make_update_fn(...)` on [B, T] batches: 3 x the padded
  scoring forward, plus with remat its recomputation less the down projections (see
  `update_flops`); the optimizer is not counted.

  The attention of a sequence longer than QUERY_BLOCK (a multiple of it) runs block by block
  under `jax.checkpoint` (with or without remat), so the backward pass recomputes its QK^T
  scores once more (the AV product's output is not needed there): + half the attention term.
  That term follows from the code, not from XLA: the cross-check unrolls loops, which lets
  XLA merge the recomputation with the forward.
  """
  rows = batch // max(1, micro_batches)
  u = _chunked_positions(cfg, batch, length - 1, chunk_size, rows)
  parts = forward_breakdown(cfg, batch * length, batch * length * length, u)
  blocked = length > QUERY_BLOCK and length % QUERY_BLOCK == 0
  return _update_from_parts(parts, remat) + (parts['attention'] // 2 if blocked else 0)


# ------------------------------------------------------------------------- accounting
PHASES = ('rollout', 'reference', 'teacher_sampling', 'update')


class FlopCounter:
  """Cumulative FLOPs per phase of training.

  Phases: 'rollout', 'scoring/<teacher name>', 'reference', 'teacher_sampling', 'update'.
  Usage (once per step):
    counter.add('rollout', rollout_flops(cfg, prompt_lens, response_lens))
    counter.add(f'scoring/{name}', score_flops(teacher_cfg, seq_lens))
    counter.add('update', update_flops(cfg, seq_lens, remat=True))
    metrics.update(counter.metrics())
  ('teacher_sampling': `rollout_flops` with the teacher's config; 'reference':
  `score_flops` with the reference model's.)
  `metrics()` returns floats: 'compute/flops/<phase>' and 'compute/flops/total' (cumulative
  since the start of training), and 'compute/step_flops/<phase>' / '.../total' (added since
  the previous `metrics()` call, i.e. this step's when called once per step). To resume,
  save `counter.totals` and pass it back as `FlopCounter(totals)`.
  """

  def __init__(self, totals: Mapping[str, float] | None = None):
    self.totals: dict[str, float] = {}
    self._step: dict[str, float] = {}
    for phase, v in (totals or {}).items():
      self.totals[self._check(phase)] = float(v)

  @staticmethod
  def _check(phase: str) -> str:
    if phase in PHASES or (phase.startswith('scoring/') and len(phase) > len('scoring/')):
      return phase
    raise ValueError(f'unknown phase {phase!r}; expected one of {", ".join(PHASES)} or '
                     "'scoring/<teacher name>'")

  def add(self, phase: str, flops) -> None:
    """Adds `flops` (>= 0) to `phase`."""
    phase = self._check(phase)
    flops = float(flops)
    if flops < 0:
      raise ValueError(f'negative FLOPs {flops} for {phase!r}')
    self.totals[phase] = self.totals.get(phase, 0.0) + flops
    self._step[phase] = self._step.get(phase, 0.0) + flops

  @property
  def total(self) -> float:
    return float(sum(self.totals.values()))

  def metrics(self) -> dict[str, float]:
    """Cumulative and since-last-call FLOPs per phase (see the class docstring)."""
    out = {f'compute/flops/{k}': float(v) for k, v in sorted(self.totals.items())}
    out['compute/flops/total'] = self.total
    for k in sorted(self.totals):
      out[f'compute/step_flops/{k}'] = float(self._step.get(k, 0.0))
    out['compute/step_flops/total'] = float(sum(self._step.values()))
    self._step = {}
    return out
