"""The student's train state, optimizer and jitted update step.

Legend (docs/design.md §7): B sequences (the update batch), M micro-batches, T = prompt +
response positions, C positions per vocabulary chunk,
K teacher top-k entries.

One update consumes a batch of whole sequences (prompt + response) with per-position
arrays aligned to token positions (`loss_mask` is 1 on response tokens). The loss is

  'pg'   the importance-sampled policy loss with advantages (OPD, G-OPD, mixed, RL), plus
         optionally `full_vocab_coef` x a top-k GKD loss against the teacher's top-k;
  'nll'  negative log-likelihood of the response tokens (SFT / off-policy distillation).

Micro-batches run inside the jitted step with `lax.scan`; the normaliser (token count or
sequence count) is taken from the whole batch first, so the summed gradient is exactly the
full-batch gradient. The state is donated: its buffers are reused for the new state.
Parameters and optimizer state are float32; `compute_dtype` bfloat16 casts the parameters
inside the step (mixed precision).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax.objectives import losses
from opd_jax import policy as policy_lib
from opd_jax.teachers.scoring import map_vocab_chunks, split_rows

SCHEDULES = {
    'constant': lambda lr, total, warmup: optax.constant_schedule(lr),
    'cosine': lambda lr, total, warmup: optax.cosine_decay_schedule(lr, max(1, total - warmup)),
    'linear': lambda lr, total, warmup: optax.linear_schedule(lr, 0.0, max(1, total - warmup)),
}


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup into `optim.schedule`, global-norm clipping; (tx, schedule)."""
  if optim.schedule not in SCHEDULES:
    raise ValueError(f'config.optim.schedule={optim.schedule!r}; known: {", ".join(SCHEDULES)}')
  warmup = int(optim.warmup_steps)
  decay = SCHEDULES[optim.schedule](optim.lr, total_steps, warmup)
  schedule = (optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay],
                                   [warmup]) if warmup else decay)
  parts = []
  if optim.grad_clip:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts), schedule


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static loss settings (hashable: a change recompiles)."""
  kind: str = 'pg'                      # 'pg' | 'nll'
  temperature: float = 1.0              # the policy is softmax(truncate(logits / temperature))
  top_k: int = 0                        # the rollout's truncation ('pg' only), so that the
  top_p: float = 1.0                    # update's s is the sampler's s_b on fresh rollouts
  clip_eps: float | None = None
  clip_eps_high: float | None = None
  ratio_level: str = 'token'
  tis_cap: float | None = None          # truncated IS at this cap instead of plain IS / clip
  aggregation: str = 'token-mean'
  full_vocab: str | None = None         # None | a key of losses.FULL_VOCAB_OPTIONS
  full_vocab_coef: float = 0.0
  full_vocab_top_k: int = 20            # K of 'reverse_kl_student_topk'
  vocab_chunk_size: int | None = None   # Vc of the streamed (exact / student top-k) options
  jsd_beta: float = 0.5
  chunk_size: int | None = None
  remat: bool = True
  compute_dtype: str = 'float32'

  def __post_init__(self):
    if (self.kind == 'pg' and (self.top_k or self.top_p < 1.0) and self.full_vocab
        and losses.refuses_truncation(self.full_vocab, self.jsd_beta)):
      raise ValueError(
          f'LossSpec: full_vocab={self.full_vocab!r} (jsd_beta={self.jsd_beta}) weights by '
          f'the teacher and is infinite against the truncated policy (top_k={self.top_k}, '
          f'top_p={self.top_p}); use a reverse KL or a JSD with 0 < beta (docs/design.md '
          '§3.2)')


# ------------------------------------------------------------------------- the batch
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
  """One update's input: whole sequences (prompt + response), [B, T] per position.

  tokens, attention_mask: the sequences and their real-token mask; loss_mask: 1 on response
  tokens. For the 'pg' loss, behaviour_logprobs (s_b) and advantages (A), aligned to the
  positions they score (0 elsewhere); for a top-k distillation term, teacher_top_ids /
  teacher_top_logprobs [B, T, K]. Unused fields are None (a different pytree: another
  compile, never a silent default)."""
  tokens: Any
  attention_mask: Any
  loss_mask: Any
  behaviour_logprobs: Any = None
  advantages: Any = None
  teacher_top_ids: Any = None
  teacher_top_logprobs: Any = None
  # The exact / student-top-k options (losses.needs_teacher_hidden): the in-process teacher's
  # final hidden states [B, T, Dt] (aligned like its logprobs) and its output projection
  # [V, Dt]. The projection is the one field that is not per row: the update and the
  # trainer's mini-batches never split it (`rows`).
  teacher_hidden: Any = None
  teacher_unembed: Any = None
  # [B] float, 1 on the rows the `loss.full_vocab` teacher scored (its route): the divergence
  # applies to those rows only, since the teacher's fields hold zeros on the others. None:
  # every row was scored.
  teacher_rows: Any = None

  def rows(self, lo: int, hi: int) -> 'UpdateBatch':
    """Rows [lo, hi) of every per-row field."""
    return _map_rows(lambda x: x[lo:hi], self)

  @classmethod
  def of(cls, batch) -> 'UpdateBatch':
    """An UpdateBatch from itself or from a mapping with the same field names."""
    if isinstance(batch, cls):
      return batch
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(batch) - names
    if unknown:
      raise ValueError(f'update batch: unknown fields {sorted(unknown)}; expected {sorted(names)}')
    return cls(**batch)

  def check(self, spec: 'LossSpec') -> None:
    need = []
    if spec.kind == 'pg':
      need += ['behaviour_logprobs', 'advantages']
      if losses.needs_teacher_hidden(spec.full_vocab):
        need += ['teacher_hidden', 'teacher_unembed']
      elif spec.full_vocab:
        need += ['teacher_top_ids', 'teacher_top_logprobs']
    missing = [n for n in need if getattr(self, n) is None]
    if missing:
      raise ValueError(f'update batch for the {spec.kind!r} loss lacks {missing}')


def _map_rows(fn, batch: UpdateBatch) -> UpdateBatch:
  """`fn` applied to every per-row field (all but teacher_unembed)."""
  w = batch.teacher_unembed
  out = jax.tree.map(fn, dataclasses.replace(batch, teacher_unembed=None))
  return dataclasses.replace(out, teacher_unembed=w)


# ---------------------------------------------------------------- metric accumulators
# Per-micro-batch statistics say how they combine: summed, averaged by a count, or the
# max / min. `merge` is associative, so the accumulation over micro-batches is exact.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mean:
  total: Any
  count: Any

  def merge(self, other):
    return Mean(self.total + other.total, self.count + other.count)

  def result(self):
    return self.total / jnp.maximum(self.count, 1.0)

  def identity(self):
    return Mean(jnp.zeros_like(self.total), jnp.zeros_like(self.count))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Max:
  value: Any

  def merge(self, other):
    return Max(jnp.maximum(self.value, other.value))

  def result(self):
    return self.value

  def identity(self):
    return Max(jnp.full_like(self.value, -jnp.inf))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Min:
  value: Any

  def merge(self, other):
    return Min(jnp.minimum(self.value, other.value))

  def result(self):
    return self.value

  def identity(self):
    return Min(jnp.full_like(self.value, jnp.inf))


_METRICS = (Mean, Max, Min)


def _is_metric(x):
  return isinstance(x, _METRICS)


def merge_metrics(a: dict, b: dict) -> dict:
  return {k: a[k].merge(b[k]) for k in a}


def _cast(params, dtype):
  if dtype == 'float32':
    return params
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                      params)


def _position_terms(logp_BxCxV, ex, *, spec: LossSpec):
  """Per position: logprob of the next token under the policy, the policy's entropy, and the
  optional top-k GKD loss. `logp` is the tempered, untruncated log-softmax; with top-k /
  top-p the policy renormalises over the kept set exactly as the sampler does
  (docs/design.md §3.2), and every `full_vocab` term compares that same policy π with the
  untruncated teacher (the forward KL, infinite then, is refused). For the streamed options
  `keep_min` passes the kept set on as a cut on `logp` (policy.keep_threshold)."""
  logp_pi = logp_BxCxV
  truncated = bool(spec.top_k) or spec.top_p < 1.0
  if truncated:
    logp_pi = jax.nn.log_softmax(policy_lib.truncate(logp_BxCxV, spec.top_k, spec.top_p), -1)
  out = {'logprobs': jnp.take_along_axis(logp_pi, ex['target'][..., None], -1)[..., 0],
         'entropy': jax.lax.stop_gradient(losses.entropy_from_logp(logp_pi))}
  if truncated and losses.needs_teacher_hidden(spec.full_vocab):
    out['keep_min'] = policy_lib.keep_threshold(logp_BxCxV, kept_xV=jnp.isfinite(logp_pi))
  if spec.full_vocab and not losses.needs_teacher_hidden(spec.full_vocab):
    student_topk = losses.gather_topk(logp_pi, ex['teacher_top_ids'])
    kw = {'beta': spec.jsd_beta} if spec.full_vocab == 'jsd' else {}
    out['gkd'] = losses.topk_loss(spec.full_vocab, student_topk, ex['teacher_top_logprobs'],
                                  **kw)
  return out


def _loss_terms(params, graphdef, batch: UpdateBatch, spec: LossSpec):
  """(sum, metrics) of the loss on one (micro-)batch; the caller divides the sum by the
  global count. Metrics are Mean / Max / Min accumulators named as they are logged."""
  model = nnx.merge(graphdef, _cast(params, spec.compute_dtype))
  tokens, attn, lmask = batch.tokens, batch.attention_mask, batch.loss_mask
  hidden, _ = model.hidden(tokens, attn, remat=spec.remat)
  extras = {'target': tokens[:, 1:].astype(jnp.int32)}
  streamed = losses.needs_teacher_hidden(spec.full_vocab)
  if spec.full_vocab and not streamed:
    extras.update(teacher_top_ids=batch.teacher_top_ids[:, 1:],
                  teacher_top_logprobs=batch.teacher_top_logprobs[:, 1:])
  # hidden[t - 1] predicts tokens[t]: shift, then pad position 0 (never a loss position).
  out = map_vocab_chunks(hidden[:, :-1], model.unembed_weight(),
                         functools.partial(_position_terms, spec=spec), extras,
                         chunk_size=spec.chunk_size, temperature=spec.temperature,
                         remat=spec.remat)
  keep_min = out.pop('keep_min', None)  # the truncated policy's kept set, for the stream
  if streamed:  # a second pass over the same hidden states, vocabulary chunk by chunk
    out['gkd'] = losses.streamed_divergence(
        spec.full_vocab, hidden[:, :-1], model.unembed_weight(), batch.teacher_hidden[:, 1:],
        batch.teacher_unembed, temperature=spec.temperature, beta=spec.jsd_beta,
        top_k=spec.full_vocab_top_k, chunk_size=spec.chunk_size,
        vocab_chunk=spec.vocab_chunk_size, keep_min_BxT=keep_min)
  out = {k: jnp.pad(v, ((0, 0), (1, 0))) for k, v in out.items()}
  s = out['logprobs']
  m = lmask.astype(jnp.float32)
  n = jnp.sum(m)

  def mean(x):  # a token mean over the whole batch, accumulated as (sum, count)
    return Mean(jnp.sum(x * m), n)
  stats = {'policy/entropy': mean(out['entropy'])}
  if spec.kind == 'nll':
    per_token = jnp.where(m > 0, -s, 0.0)
  else:
    if spec.tis_cap is None:
      per_token, is_stats = losses.policy_loss(
          s, batch.behaviour_logprobs, batch.advantages, lmask, clip_eps=spec.clip_eps,
          clip_eps_high=spec.clip_eps_high, ratio_level=spec.ratio_level)
    else:  # loss.tis_cap: the ratio truncated at the cap (docs/design.md §3.6)
      per_token, is_stats = losses.truncated_is_policy_loss(
          s, batch.behaviour_logprobs, batch.advantages, lmask, cap=spec.tis_cap)
      stats['is/tis_frac'] = mean(is_stats['truncated_BxT'])
    ratio = jax.lax.stop_gradient(is_stats['ratio_BxT'])
    # The train-inference gap: |s − s_b| before any step on this batch is the sampler's
    # numerical disagreement with the update (precision, kernels), not policy change.
    gap = jnp.abs(jax.lax.stop_gradient(s) - batch.behaviour_logprobs)
    stats.update({'is/sampler_logprob_gap': mean(jnp.where(jnp.isfinite(gap), gap, 0.0)),
                  'is/ratio_mean': mean(ratio),
                  'is/ratio_max': Max(jnp.max(jnp.where(m > 0, ratio, -jnp.inf))),
                  'is/ratio_min': Min(jnp.min(jnp.where(m > 0, ratio, jnp.inf))),
                  'is/clip_frac': mean(is_stats['clipped_BxT'])})
    if spec.full_vocab:
      # Only the rows the teacher scored: an unscored row's teacher fields are zeros (hidden
      # state 0 = uniform logits; top-k ids 0 = the pad), never a target. Selected, not
      # multiplied, so such a row gets exactly 0 in value and gradient.
      on = m > 0
      if batch.teacher_rows is not None:
        on = on & (batch.teacher_rows[:, None] > 0)
      gkd = jnp.where(on, out['gkd'], 0.0)
      per_token = per_token + spec.full_vocab_coef * gkd
      stats['loss/full_vocab'] = Mean(jnp.sum(jax.lax.stop_gradient(gkd)),
                                      jnp.sum(on.astype(jnp.float32)))
  total, _ = losses.aggregate(per_token, lmask, spec.aggregation)
  return total, stats


def make_train_state(params, tx):
  return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}


def make_update_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule,
                   spec: LossSpec, micro_batches: int = 1, state_shardings=None,
                   frozen=None):
  """A jitted `(state, batch) -> (state, metrics)` with the state donated.

  `frozen` (a LoRA student's base parameters, docs/design.md §9) is joined to the trained
  `state['params']` (the adapters) for the forward: it is an argument of the jitted step,
  never differentiated nor donated, and not in the optimizer state.

  `state_shardings` (see sharding.match_shardings) pins the new state's layout to the old
  one's, so the step compiles once instead of again when XLA picks other output shardings;
  the step is also traced under their mesh, so the model's activation constraints
  (sharding.constrain) apply whatever mesh context the caller has or lacks.

  `batch` holds [B, T] arrays: tokens, attention_mask, loss_mask, and for 'pg'
  behaviour_logprobs and advantages (plus teacher_top_ids / teacher_top_logprobs [B, T, K]
  for a full-vocabulary term). B must be divisible by `micro_batches`.
  """
  def loss_terms(params, frozen_params, mb):
    if frozen_params is not None:
      params = nnx.merge_state(frozen_params, params)
    return _loss_terms(params, graphdef, mb, spec)

  def update(state, batch: UpdateBatch, frozen_params=None):
    b = batch.tokens.shape[0]
    if b % micro_batches:
      raise ValueError(f'update batch of {b} rows is not divisible by micro_batches='
                       f'{micro_batches}')
    _, count = losses.aggregate(jnp.zeros(batch.loss_mask.shape), batch.loss_mask,
                                spec.aggregation)
    count = jnp.maximum(count, 1.0)
    value_and_grad = jax.value_and_grad(lambda p, mb: loss_terms(p, frozen_params, mb),
                                        has_aux=True)

    def micro(carry, mb):
      grads, loss_sum, stats = carry
      (lv, st), g = value_and_grad(state['params'], with_unembed(mb))
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, loss_sum + lv, merge_metrics(stats, st)), None

    # Micro-batch m takes rows m, M + m, 2M + m, ...: the batch's row sharding stays on the
    # rows of every micro-batch (a contiguous split would hand whole micro-batches to single
    # devices, and XLA would then compute each one replicated).
    # The teacher's output projection is shared by every micro-batch, not split by rows.
    split = split_rows(dataclasses.replace(batch, teacher_unembed=None), micro_batches)

    def with_unembed(mb):
      return dataclasses.replace(mb, teacher_unembed=batch.teacher_unembed)
    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    first = with_unembed(jax.tree.map(lambda x: x[0], split))
    stats0 = jax.eval_shape(lambda: loss_terms(state['params'], frozen_params, first)[1])
    stats0 = {k: jax.tree.map(jnp.zeros_like, v).identity() for k, v in stats0.items()}
    (grads, loss_sum, stats), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), stats0), split)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
    metrics = {'loss': loss_sum / count, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(state['step'])}
    metrics.update({k: v.result() for k, v in stats.items()})
    return new_state, metrics

  if state_shardings is None:
    jitted = jax.jit(update, donate_argnums=(0,))
  else:
    mesh = jax.tree.leaves(state_shardings)[0].mesh

    def update_on_mesh(state, batch, *frozen_params):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return update(state, batch, *frozen_params)
    frozen_in = () if frozen is None else (jax.tree.map(lambda x: x.sharding, frozen),)
    jitted = jax.jit(update_on_mesh, donate_argnums=(0,),
                     in_shardings=(state_shardings, None) + frozen_in,
                     out_shardings=(state_shardings, NamedSharding(mesh, P())))

  return _UpdateFn(jitted, spec, frozen)


class _UpdateFn:
  """The jitted update, called (or lowered, for the AOT check) with an UpdateBatch or a
  mapping of its fields, which is checked against the loss first."""

  def __init__(self, jitted, spec: LossSpec, frozen=None):
    self.jitted, self.spec = jitted, spec
    self.frozen = () if frozen is None else (frozen,)  # a LoRA student's base

  def _batch(self, batch) -> UpdateBatch:
    batch = UpdateBatch.of(batch)
    batch.check(self.spec)
    return batch

  def __call__(self, state, batch):
    return self.jitted(state, self._batch(batch), *self.frozen)

  def lower(self, state, batch):
    return self.jitted.lower(state, self._batch(batch), *self.frozen)
