"""Teacher roles: frozen models that score the student's samples, routed by data tag.

Legend (docs/design.md §7): B rows of the batch, T = prompt + response positions, J teachers,
K top-k.

A teacher scores only the rows routed to it: the rows are gathered (padded up to a batch
bucket so few shapes compile), scored, and scattered back; other rows get logprob 0 and
route 0, so they contribute nothing (losses.opd_advantage ignores unrouted values).
`tokens_scored` / `rows_forwarded` count what each teacher really ran on.

An in-process teacher lives on the student's mesh or on its own device slice
(`devices='4:8'`); scoring calls are dispatched without waiting, so teachers on disjoint
devices run concurrently. A remote teacher (`remote_url`) is served over HTTP by
`opd_jax.teachers.server` or any SGLang / vLLM server (opd_jax.teachers.remote).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import typing
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax import sharding as shd
from opd_jax.models import load_pretrained
from opd_jax.buckets import batch_bucket
from opd_jax.teachers.scoring import make_score_fn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TeacherSpec:
  """One teacher: an entry of `config.teachers` read by `training.specs.teacher_spec` (see
  configs/ and README's config reference)."""
  name: str
  model: str | None = None
  kl_coef: float = 1.0
  tags: tuple[str, ...] = ()            # empty: every record
  sharding: str = 'fsdp_tp'
  dtype: str = 'float32'
  devices: str | None = None            # a device slice such as '4:8'; None: the student mesh
  mesh: dict | None = None              # mesh shape on those devices (default all on fsdp)
  remote_url: str | None = None
  remote_protocol: str = 'sglang'       # 'sglang' | 'vllm'
  remote_timeout_s: float = 60.0
  remote_retries: int = 3
  remote_concurrency: int = 16
  cross_tokenizer: bool = False         # another tokenizer: score aligned text (teachers/cross.py)
  tokenizer: str | None = None          # the teacher's tokenizer (None: model's; remote: needed)

  def handles(self, tag: str) -> bool:
    return not self.tags or tag in self.tags


def route_matrix(tags: Sequence[str], specs: Sequence[TeacherSpec]) -> np.ndarray:
  """route[i, j] = 1.0 when teacher j handles row i's tag. [B, J] float32."""
  return np.asarray([[1.0 if s.handles(t) else 0.0 for s in specs] for t in tags],
                    np.float32).reshape(len(tags), len(specs))


@typing.runtime_checkable
class Teacher(typing.Protocol):
  """What the trainer needs of a teacher (or the G-OPD reference), in process or remote.

  `cfg` is the architecture (a ModelConfig) when known, for FLOP accounting, else None.
  `score` returns {'logprobs' [B, T], plus 'top_logprobs' / 'top_ids' [B, T, K] when
  top_k} for all B rows (zeros on rows not in `rows`), or None when `rows` is empty; the
  logprobs are of softmax(logits / temperature) (docs/design.md §3.2). Both kinds are built
  by `opd_jax.training.builder.make_teacher` with the same settings."""
  name: str
  spec: TeacherSpec
  cfg: typing.Any
  top_k: int
  tokens_scored: int
  rows_forwarded: int

  def score(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None): ...

  def submit(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None):
    """`score` without waiting: a handle whose `.result()` is score's value. An in-process
    teacher's is its dispatched (not yet computed) arrays; a remote one's has its requests in
    flight."""


class Ready:
  """A handle whose result is already there: an in-process teacher's `submit` (its device
  arrays are dispatched, not waited for)."""

  def __init__(self, value):
    self.value = value

  def done(self) -> bool:
    return True

  def result(self):
    return self.value


def teacher_mesh(spec: TeacherSpec, student_mesh, devices=None):
  """The mesh an in-process teacher runs on: its device slice (`devices='4:8'`, taken from
  `devices` or all devices), its own mesh shape, or the student's mesh."""
  if spec.devices:
    return shd.make_mesh(spec.mesh or {'fsdp': -1},
                         devices=shd.parse_devices(spec.devices, devices))
  if spec.mesh:
    return shd.make_mesh(spec.mesh, devices=devices)
  return student_mesh


class LocalTeacher:
  """A frozen model on the mesh that returns per-token logprobs of given sequences.

  `model` (a Decoder) or `parts` = (graphdef, params, cfg) skip loading `spec.model`;
  params may be ShapeDtypeStructs (the AOT check compiles `score_fn` on them)."""

  def __init__(self, spec: TeacherSpec, *, student_mesh, top_k: int = 0,
               temperature: float = 1.0, model=None, micro_batches: int = 1, parts=None,
               devices=None, with_hidden: bool = False):
    self.spec = spec
    self.name = spec.name
    self.mesh = teacher_mesh(spec, student_mesh, devices)
    if parts is None:
      if model is None:
        model = load_pretrained(spec.model, mesh=self.mesh, dtype=jnp.dtype(spec.dtype),
                                rules=spec.sharding)
      parts = (*nnx.split(model), model.cfg)
    self.graphdef, self.params, self.cfg = parts
    self.score_fn = make_score_fn(self.graphdef, top_k=top_k, temperature=temperature,
                                  micro_batches=micro_batches, with_hidden=with_hidden)
    self.top_k = top_k
    self.with_hidden = with_hidden  # score() also returns 'hidden' [B, T, D]
    self.tokens_scored = 0
    self.rows_forwarded = 0

  def unembed_on(self, mesh):
    """The teacher's output projection [V, D] (its dtype) on `mesh`: the same array on the
    teacher's own mesh, else a copy sharded like an LM head there (ShapeDtypeStructs when
    the parameters are abstract). The exact full-vocabulary losses read it in the update."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params)):
      leaves = {shd.path_str(kp): x for kp, x in
                jax.tree_util.tree_leaves_with_path(self.params)}
      w = leaves.get('lm_head/weight', leaves.get('embed_tokens/weight'))  # tied: embedding
    else:
      w = nnx.merge(self.graphdef, self.params).unembed_weight()
    if mesh is self.mesh:
      return w
    spec = shd.spec_for('lm_head/weight', w.shape, mesh, shd.get_rules(self.spec.sharding))
    sharding = NamedSharding(mesh, spec)
    if isinstance(w, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding)
    return jax.device_put(w, sharding)

  def submit(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None) -> Ready:
    """`score`, already dispatched and never waited for (the Teacher protocol's `submit`)."""
    return Ready(self.score(tokens_BxT, mask_BxT, rows, out_sharding=out_sharding))

  def score(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None):
    """Scores `rows` of the (device) batch; returns {'logprobs' [B, T], ...} for all B rows
    (zeros on unrouted rows) with `out_sharding`, or None when no row is routed here.
    Does not block. The caller adds the routed rows' real tokens to `tokens_scored`."""
    b = tokens_BxT.shape[0]
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
      return None
    mult = shd.batch_size_multiple(self.mesh)
    full = len(rows) == b and np.array_equal(rows, np.arange(b)) and b % mult == 0
    if full:
      sub_tokens, sub_mask = tokens_BxT, mask_BxT
    else:
      n = batch_bucket(len(rows), mult)
      idx = np.concatenate([rows, np.full(n - len(rows), rows[0])])  # pad with a real row
      sub_tokens = jnp.take(tokens_BxT, jnp.asarray(idx), axis=0)
      sub_mask = jnp.take(mask_BxT, jnp.asarray(idx), axis=0)
    sharding = NamedSharding(self.mesh, shd.batch_spec(2))
    sub_tokens, sub_mask = jax.device_put((sub_tokens, sub_mask), sharding)
    with jax.set_mesh(self.mesh):
      out = self.score_fn(self.params, sub_tokens, sub_mask)
    self.rows_forwarded += int(sub_tokens.shape[0])
    if full:
      return out if out_sharding is None else jax.device_put(out, jax.tree.map(
          lambda x: shd.rows_sharding(out_sharding.mesh, b, x.ndim), out))
    if out_sharding is not None:  # the routed rows are few: move them replicated, scatter there
      out = jax.device_put(out, NamedSharding(out_sharding.mesh, P()))
    return _scatter_rows(out, jnp.asarray(rows), b, out_sharding)


def _scatter_rows(sub, rows, b: int, out_sharding):
  """[n, ...] results of rows `rows` into zeros [b, ...], batch-sharded like the student."""
  mesh = None if out_sharding is None else out_sharding.mesh
  ndims = tuple(sorted((k, v.ndim) for k, v in sub.items()))
  return _scatter_fn(b, mesh, ndims)(sub, rows)


@functools.lru_cache(maxsize=64)
def _scatter_fn(b: int, mesh, ndims):
  def scatter(sub, rows):
    return {k: jnp.zeros((b,) + x.shape[1:], x.dtype).at[rows].set(x[:rows.shape[0]])
            for k, x in sub.items()}
  if mesh is None:
    return jax.jit(scatter)
  return jax.jit(scatter, out_shardings={k: shd.rows_sharding(mesh, b, nd) for k, nd in ndims})


def score_teachers(teachers, tokens_BxT, mask_BxT, route_BxJ: np.ndarray, *,
                   host_mask_BxT: np.ndarray | None = None, out_sharding=None,
                   count: bool = True, context=None):
  """Scores the batch with every teacher on its routed rows.

  Returns (t_JxBxT logprobs, {teacher: top-k dict or None}) on the student's sharding.
  With `count`, each teacher's `tokens_scored` grows by the real tokens of its routed rows
  (from `host_mask_BxT` when given, else summed on device); a cross-tokenizer teacher
  (`counts_own_tokens`, teachers/cross.py) counts its own tokens instead, and gets
  `context` (a `cross.ScoreContext`: the rows' records and the loss mask).
  In-process teachers are dispatched without waiting (they run concurrently on disjoint
  devices), remote ones have their HTTP requests in flight together, then cross-tokenizer
  teachers score (they block); this waits for the remote answers only. `submit_teachers` is
  the same without waiting.
  """
  return submit_teachers(teachers, tokens_BxT, mask_BxT, route_BxJ, host_mask_BxT=host_mask_BxT,
                         out_sharding=out_sharding, count=count, context=context).result()


class PendingTeachers:
  """Every teacher's scoring of one batch, submitted (`submit_teachers`); `.result()` gives
  (t_JxBxT, extras) as `score_teachers` does, waiting only for remote answers. `own_lens`:
  {teacher: [B] its own real tokens per row} of the cross-tokenizer teachers for this batch
  (what `count_scored` and the FLOP count use: a teacher's `last_seq_lens` may be another
  batch's by the time a pipelined batch is finished)."""

  def __init__(self, teachers, handles: dict, shape, own_lens: dict | None = None):
    self.teachers, self.handles, self.shape = teachers, handles, shape
    self.own_lens = own_lens or {}

  def done(self) -> bool:
    return all(h.done() for h in self.handles.values())

  def result(self):
    b, l = self.shape
    if not self.teachers:  # pure RL: no teacher term
      return jnp.zeros((0, b, l), jnp.float32), {}
    logprobs, extra = [], {}
    for t in self.teachers:
      o = self.handles[t.name].result()
      if o is None:
        logprobs.append(jnp.zeros((b, l), jnp.float32))
        extra[t.name] = None
        continue
      logprobs.append(o['logprobs'])
      extra[t.name] = {k: v for k, v in o.items() if k != 'logprobs'} or None
    return jnp.stack(logprobs), extra

  def seq_lens(self, name: str, student_lens_B: np.ndarray) -> np.ndarray:
    """[B] the tokens teacher `name` scored per row: its own for a cross-tokenizer teacher,
    else the student's `student_lens_B`."""
    return self.own_lens.get(name, student_lens_B)

  def count_scored(self, mask_BxT, route_BxJ: np.ndarray, *,
                   host_mask_BxT: np.ndarray | None = None) -> int:
    """Adds the real tokens of each teacher's routed rows to its `tokens_scored` (a
    cross-tokenizer teacher's own tokens; otherwise from `host_mask_BxT` when given, else
    summed on device); returns the total added."""
    total = 0
    for j, t in enumerate(self.teachers):
      rows = np.nonzero(route_BxJ[:, j])[0]
      if not len(rows):
        continue
      if t.name in self.own_lens:
        n = int(self.own_lens[t.name][rows].sum())
      else:
        n = int(host_mask_BxT[rows].sum() if host_mask_BxT is not None
                else jnp.sum(jnp.take(mask_BxT, jnp.asarray(rows), axis=0)))
      t.tokens_scored += n
      total += n
    return total


def submit_teachers(teachers, tokens_BxT, mask_BxT, route_BxJ: np.ndarray, *,
                    host_mask_BxT: np.ndarray | None = None, out_sharding=None,
                    count: bool = True, context=None) -> PendingTeachers:
  """`score_teachers` without waiting: every teacher's `submit` (in-process ones dispatch
  their device work, remote ones post their requests), no host synchronisation on the
  results, except for cross-tokenizer teachers, which score after the others are submitted
  and block (their rows are re-tokenized on the host; teachers/cross.py). `.result()` of the
  returned handle gives score_teachers' value."""
  handles, own = {}, {}
  for j, t in enumerate(teachers):
    if not getattr(t, 'counts_own_tokens', False):
      rows = np.nonzero(route_BxJ[:, j])[0]
      handles[t.name] = t.submit(tokens_BxT, mask_BxT, rows, out_sharding=out_sharding)
  for j, t in enumerate(teachers):
    if getattr(t, 'counts_own_tokens', False):
      rows = np.nonzero(route_BxJ[:, j])[0]
      out = t.score(tokens_BxT, mask_BxT, rows, out_sharding=out_sharding, context=context)
      handles[t.name] = Ready(out)
      own[t.name] = (np.asarray(t.last_seq_lens).copy() if out is not None
                     else np.zeros(tokens_BxT.shape[0], np.int64))
  pending = PendingTeachers(teachers, handles, tokens_BxT.shape, own)
  if count:
    pending.count_scored(mask_BxT, route_BxJ, host_mask_BxT=host_mask_BxT)
  return pending
