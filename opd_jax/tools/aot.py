"""Ahead-of-time compile check: will a recipe fit on a TPU slice before one is booked?

  python -m opd_jax.tools.aot --config configs/opd_single_teacher.py --topology v5e-16
  python -m opd_jax.tools.aot --config configs/opd_single_teacher.py:runlocal  # 8 fake CPU devices
  python -m opd_jax.tools.aot --config configs/opd_multi_teacher.py --topology v5p-64 \
      --config.rollout.max_new_tokens=4096

Compiles (lowers and compiles, never runs, loads no weights) every jitted function of one
training step exactly as `opd_jax.train` builds it, with the recipe's mesh, sharding rules
and batch shapes:
  rollout/prefill, rollout/decode  the student's Sampler (B = prompts_per_step x n_samples
                                   rounded up like the sampler does, P = the prompt bucket of
                                   data.max_prompt_len, N = rollout.max_new_tokens);
  rollout/refill, rollout/segment, rollout/compact
                                   instead, when rollout.slots > 0 and B exceeds the slots:
                                   the continuous-batching sampler (opd_jax.rollout.continuous) over
                                   R slots, its refill at the first fill's row bucket;
  score/<teacher>                  each in-process teacher on its own mesh (all B rows routed
                                   to it: the worst case), and score/reference for G-OPD;
  update                           make_update_fn(loss_spec(config)) on B / mini_batches rows
                                   of L = P + N positions (SFT: sft.batch_size rows);
and prints per-device memory from `compiled.memory_analysis()`: arguments, outputs, the
donated part of the outputs (alias), temporaries, their total, and the peak once the
buffers that stay resident across the step are added (the train state during rollout and
scoring, the teachers during the update). A peak above the chip's HBM is flagged.

Where the architecture comes from: the model directory's config.json; a `tiny:` spec is
made locally; a missing path whose basename names a preset (opd_jax.models.presets, e.g.
/ckpt/Qwen3-8B) compiles from the public config of that model and says so.

Two targets:
  TPU topology  with libtpu importable (`pip install 'jax[tpu]'`; the TPU compiler runs on
                any x86 host, no TPU needed), `--topology v5e-16` compiles for the real chips
                with `jax.experimental.topologies`: the numbers are XLA:TPU's own.
  CPU estimate  otherwise (or `--backend=cpu`), the same compilation on fake CPU devices
                with the recipe's mesh shape; XLA:CPU fuses and schedules differently, so
                temporaries are an estimate (arguments and outputs are exact).
Exit status 0 unless the compilation fails; `--strict` makes an over-HBM peak exit 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import xla_bridge  # backends_are_initialized(): no public equivalent

from opd_jax.tools import aot_time
from opd_jax.tools import hlo
from opd_jax.tools import roofline
from opd_jax.tools.aot_time import bytes_by_device as _bytes_by_device
from opd_jax.tools.aot_time import frozen as _frozen
from opd_jax.tools.aot_time import sds as _sds
from opd_jax.training import builder
from opd_jax.training import episodes as episodes_lib
from opd_jax import sharding as shd
from opd_jax.training.builder import ConfigError, ModelSource
from opd_jax.buckets import DEFAULT_PROMPT_BUCKETS, batch_bucket
from opd_jax.buckets import bucket as prompt_bucket
from opd_jax.rollout.decode import SamplingParams

GiB = 2**30

# HBM per chip (bytes), from the one chip table (opd_jax.tools.roofline). v4 and v5p chips are
# megacores: the runtime shows one device per chip, but the compile-only topology has one
# device per TensorCore (half the HBM each).
HBM_PER_CHIP = {k: c.hbm_bytes for k, c in roofline.CHIPS.items()}
# Accelerator-type names count TensorCores for v4/v5p (v4-32 = 16 chips), chips otherwise.
CORES_PER_CHIP = {k: c.cores for k, c in roofline.CHIPS.items()}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e'}
_THREE_D = ('v4', 'v5p')

_REEXEC_ENV = 'OPD_JAX_AOT_CHILD'


class AotError(ConfigError):
  """A target or recipe that cannot be compiled; the message names what is wrong."""


# ------------------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: `name` as gcloud spells it (v5e-16), generation, chips, libtpu layout."""
  name: str
  generation: str
  chips: int
  layout: str          # 'v5e:4x4', what jax.experimental.topologies expects

  @property
  def hbm_per_chip(self) -> int:
    return HBM_PER_CHIP[self.generation]


def _grid(chips: int, dims: int) -> list[int]:
  """The slice's chip grid as Cloud TPU lays out its standard slices: powers of two, the
  smallest side doubled first (v5e-16 -> 4x4, v4-32 -> 2x2x4, v5p-64 -> 2x4x4); a 3-D slice
  of one host is 2x2x1."""
  if dims == 3 and chips == 4:
    return [2, 2, 1]
  shape = [1] * dims
  while math.prod(shape) < chips:
    shape.sort()
    shape[0] *= 2
  return sorted(shape)


def _generation(name: str, spec: str) -> str:
  gen = _ALIASES.get(name, name)
  if gen not in HBM_PER_CHIP:
    raise AotError(f'--topology={spec!r}: unknown TPU generation {name!r}; known: '
                   f'{", ".join(HBM_PER_CHIP)}')
  return gen


def parse_topology(spec: str) -> Topology:
  """'v5e-16', 'v5litepod-16', 'v4-32', 'v5p-64', 'v6e-8', or a libtpu layout 'v5e:4x4'."""
  s = spec.strip().lower()
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', s)
  if m:
    gen = _generation(m.group(1), spec)
    chips = math.prod(int(x) for x in m.group(2).split('x'))
    return Topology(f'{gen}-{chips * CORES_PER_CHIP[gen]}', gen, chips, f'{gen}:{m.group(2)}')
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', s)
  if not m:
    raise AotError(f'--topology={spec!r}: expected an accelerator type such as v5e-16, v4-32, '
                   f'v5p-64, v6e-8, or a layout such as v5e:4x4')
  gen = _generation(m.group(1), spec)
  per_chip = CORES_PER_CHIP[gen]
  chips, rem = divmod(int(m.group(2)), per_chip)
  if rem or chips < 1 or chips & (chips - 1):
    unit = 'TensorCores, 2 per chip' if per_chip == 2 else 'chips'
    raise AotError(f'--topology={spec!r}: the number after the dash counts {gen} {unit}; '
                   f'standard slices have a power-of-two number of chips')
  grid = _grid(chips, 3 if gen in _THREE_D else 2)
  return Topology(f'{gen}-{m.group(2)}', gen, chips, f'{gen}:{"x".join(map(str, grid))}')


@dataclasses.dataclass
class Target:
  """Where the compilation runs: the devices, a label for the report, HBM per device."""
  devices: list
  kind: str                 # 'tpu-topology' | 'cpu-estimate'
  label: str
  hbm_per_device: int | None
  generation: str | None = None   # the TPU generation of the time estimate (roofline.CHIPS)


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def tpu_target(topo: Topology) -> Target:
  """Compile-only TPU devices for `topo` (needs libtpu; no TPU hardware)."""
  from jax.experimental import topologies
  grid = [int(x) for x in topo.layout.split(':')[1].split('x')]
  # libtpu assumes 2x2x1-chip hosts; a smaller slice (v5e-1, v6e-1) is one smaller host.
  kw = {'chips_per_host_bounds': (grid + [1] * 3)[:3]} if topo.chips < 4 else {}
  desc = topologies.get_topology_desc(topo.layout, 'tpu', **kw)
  devices = list(desc.devices)
  per_chip = max(1, len(devices) // max(1, len({tuple(d.coords) for d in devices})))
  return Target(devices, 'tpu-topology',
                f'{topo.name}: TPU topology {topo.layout}, {len(devices)} compile-only '
                f'devices of {devices[0].device_kind} (XLA:TPU via libtpu, no hardware; '
                f'jax {jax.__version__})', topo.hbm_per_chip // per_chip, topo.generation)


def cpu_target(n: int, topo: Topology | None) -> Target:
  """`n` CPU devices (fake ones: XLA_FLAGS set by `main` before JAX starts)."""
  devices = jax.devices('cpu')
  if len(devices) != n:
    raise AotError(f'the CPU estimate needs {n} CPU devices but JAX has {len(devices)}; run '
                   f'`python -m opd_jax.tools.aot` (it sets XLA_FLAGS=--xla_force_host_platform_'
                   f'device_count={n} before JAX starts)')
  what = f'{topo.name}-shaped ' if topo else ''
  return Target(devices, 'cpu-estimate',
                f'CPU ESTIMATE: {what}mesh on {n} fake CPU devices (XLA:CPU; temporaries '
                f'differ from XLA:TPU)', topo.hbm_per_chip if topo else None,
                topo.generation if topo else None)


# ------------------------------------------------------------------------------- models
def model_source(spec: str | None, field: str) -> ModelSource:
  """The architecture of a config's model entry: directory, `tiny:` spec, or preset
  (builder.model_source, with the AOT check's error type)."""
  try:
    return builder.model_source(spec, field)
  except ConfigError as e:
    raise AotError(str(e)) from None


def _strip(info):
  """Compiled.out_info -> plain ShapeDtypeStructs (shape, dtype, sharding) to feed on."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      info)


# ------------------------------------------------------------------------------ compile
@dataclasses.dataclass
class FunctionReport:
  name: str
  shapes: str
  argument: int
  output: int
  alias: int
  temp: int
  resident: int              # long-lived buffers on the same devices that are not arguments
  compiler_oom: str | None = None   # XLA:TPU's own out-of-memory message, if it gave one
  measured: bool = True      # False: even the no-crash compile failed (numbers unknown)
  # Collective bytes per device (opd_jax.tools.hlo): 'outside' loops by kind, and per loop of the
  # program its bytes per iteration by kind, trip count and largest collectives.
  collectives: dict | None = None

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @property
  def peak(self) -> int:
    return self.total + self.resident


def _compile(name: str, fn, args: tuple, kwargs: dict, *, mesh=None, tpu=False, log=print):
  """(compiled or None, the compiler's out-of-memory message or None).

  XLA:TPU normally refuses to compile a program whose buffers exceed the chip's HBM; with
  `xla_tpu_no_crash_on_oom` it compiles anyway and reports the sizes, which is what we want.
  It still fails when one buffer alone is larger than the HBM: that message is returned."""
  t0 = time.time()
  ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx:
    lowered = fn.lower(*args, **kwargs)
    try:
      compiled = lowered.compile(
          compiler_options={'xla_tpu_no_crash_on_oom': True} if tpu else None)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      oom = str(e).split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines()[0]
      log(f'  {name}: does not compile: {oom}')
      return None, oom
  log(f'  compiled {name} in {time.time() - t0:.1f}s')
  return compiled, None


def _memory(compiled) -> tuple[int, int, int, int]:
  ma = compiled.memory_analysis()
  if ma is None:
    raise AotError('this backend gives no memory analysis for compiled functions')
  return (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
          int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))


@dataclasses.dataclass
class _Check:
  """One AOT check in progress: the run, its target, and the reports so far."""
  run: Any                     # builder.Run, abstract
  target: Any
  log: Any
  reports: list = dataclasses.field(default_factory=list)
  long_lived: dict = dataclasses.field(default_factory=dict)  # name -> pytree kept in HBM

  @property
  def tpu(self) -> bool:
    return self.target.kind == 'tpu-topology'

  def compile(self, name, fn, args, kwargs, mesh, shapes, args_of: set[str]):
    """Compiles `fn` and records its memory next to the long-lived buffers it does not take
    on its devices; returns the compiled function or None."""
    compiled, oom = _compile(name, fn, args, kwargs, mesh=mesh, tpu=self.tpu, log=self.log)
    a, o, al, t = _memory(compiled) if compiled is not None else (0, 0, 0, 0)
    fn_devices = set(mesh.devices.flat)
    per_dev: dict[Any, int] = {}
    for lname, tree in self.long_lived.items():
      if lname not in args_of:
        for d, nbytes in _bytes_by_device(tree).items():
          if d in fn_devices:
            per_dev[d] = per_dev.get(d, 0) + nbytes
    coll = None
    if compiled is not None:
      st = hlo.collective_stats(compiled.as_text())
      coll = {'outside': st.outside, 'count': st.count,
              'loops': [dict(per_iter=lp.per_iter, trips=lp.trips, largest=lp.largest,
                             collectives=lp.collectives) for lp in st.loops],
              'total': st.total()}
    self.reports.append(FunctionReport(name, shapes, a, o, al, t,
                                       max(per_dev.values(), default=0), oom,
                                       compiled is not None, coll))
    return compiled


def _shapes(config, r) -> tuple[int, int, int, list[str]]:
  """(rows, prompt slots P, sequence length T, notes) of one step's batch."""
  notes = []
  rows = builder.batch_rows(config)
  p_len = prompt_bucket(config.data.max_prompt_len, DEFAULT_PROMPT_BUCKETS)
  n_new = int(config.rollout.max_new_tokens)
  seq = p_len + n_new
  if config.mode == 'sft' and config.sft.source == 'dataset':
    seq = p_len + prompt_bucket(n_new, DEFAULT_PROMPT_BUCKETS)
    notes.append(f'SFT on dataset responses: L = {p_len} + {seq - p_len} assumes responses '
                 f'of at most rollout.max_new_tokens tokens (bucketed)')
  if r.compute_dtype != jnp.float32:
    notes.append(f'rollout KV cache in {r.compute_dtype.name} (config.student.compute_dtype)')
  return rows, p_len, seq, notes


PHASES = ('rollout', 'score', 'update')


def check_config(config, target: Target, *, log=print, phases=PHASES) -> dict:
  """Compiles one training step of `config` for `target`, exactly as the trainer builds it
  (opd_jax.training.builder.build_run, without weights); returns the report dict. `phases`: a subset
  of PHASES to compile (e.g. the rollout alone, for a quick check of its decode loop)."""
  unknown = set(phases) - set(PHASES)
  if unknown:
    raise AotError(f'--phases: unknown {sorted(unknown)}; known: {", ".join(PHASES)}')
  mesh = shd.make_mesh(dict(config.mesh), devices=target.devices)
  r = builder.build_run(config, mesh, abstract=True, devices=target.devices)
  rows, p_len, seq, notes = _shapes(config, r)
  notes = r.notes + notes
  models = {'student': r.student_where}
  for t in _frozen(r):
    spec = t.spec
    if t.cfg.vocab_size != r.student_cfg.vocab_size:
      notes.append(f'teacher {t.name!r} has vocab_size {t.cfg.vocab_size}, the student '
                   f'{r.student_cfg.vocab_size} (the trainer checks the tokenizers match)')
    models[t.name if t is r.reference else f'teacher {t.name}'] = (
        t.where if t is r.reference else f'{t.where}, {spec.dtype}, {spec.sharding} rules'
        + (f', devices {spec.devices}' if spec.devices else ''))
  chk = _Check(r, target, log)
  state = r.abstract_state()
  chk.long_lived['state'] = state
  if r.base is not None:  # a LoRA student's frozen base (an argument of the update only)
    chk.long_lived['student_base'] = r.base
  chk.long_lived.update({t.name: t.params for t in _frozen(r)})
  if 'rollout' in phases:
    _compile_rollouts(chk, config, rows, p_len)
  if config.mode == 'opd' and 'score' in phases:  # teacher scoring: every row routed to every teacher (worst case)
    for t in _frozen(r):
      tb = batch_bucket(rows, shd.batch_size_multiple(t.mesh))
      tok = _sds((tb, seq), jnp.int32, shd.batch_sharding(t.mesh, 2))
      chk.compile(f'score/{t.name}', t.score_fn, (t.params, tok, tok), {}, t.mesh,
                  f'B={tb} L={seq}' + (f' top_k={t.top_k}' if t.top_k else ''), {t.name})
  # the update on one mini-batch (traced under the state's mesh, as in the trainer)
  ub = rows // int(config.batch.mini_batches)
  if 'update' in phases:
    chk.compile('update', r.update_fn, (state, builder.update_batch_spec(
        config, mesh, ub, seq)), {}, mesh,
        f'B={ub} (micro {ub // int(config.batch.micro_batches)}) L={seq}',
        {'state', 'student_base'})
  reports = chk.reports
  worst = max(reports, key=lambda x: (x.measured, x.peak))
  gathers = aot_time.decode_gathers(r, reports)
  estimates = (aot_time.phase_estimates(r, reports, target, config, rows, p_len, seq)
               if target.generation else None)
  return {
      'target': target.kind, 'label': target.label,
      'hbm_per_device': target.hbm_per_device,
      'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'models': models, 'notes': notes,
      'functions': [dict(dataclasses.asdict(x), total=x.total, peak=x.peak) for x in reports],
      'largest': {'name': worst.name, 'total': worst.total, 'peak': worst.peak,
                  'measured': worst.measured},
      'over_hbm': [x.name for x in reports if x.compiler_oom or (
          target.hbm_per_device and x.peak > target.hbm_per_device)],
      'decode_gathers': gathers,
      'decode_gather_errors': [g['name'] for g in gathers if g['error']],
      'estimates': estimates,
  }


def _compile_rollouts(chk: _Check, config, rows: int, p_len: int) -> None:
  """The training rollout (the student's engine, multi-turn episodes included, or the
  teacher's sampler for SFT on its samples) and the eval rollout when its shapes are not
  covered by the training one. Each engine lists its own jitted calls on abstract inputs
  (`abstract_calls`, opd_jax/rollout/engine.py); this compiles them in order."""
  r = chk.run
  train = None
  # The student samples with its parameters cast to the compute dtype on the rollout layout
  # (Run.cast_fn, compiled here as rollout/cast: the once-per-rollout relayout).
  cast = jax.tree.map(lambda x, sh: _sds(x.shape, r.compute_dtype if jnp.issubdtype(
      x.dtype, jnp.floating) else x.dtype, sh), r.plain_params, r.rollout_shardings)
  if config.mode == 'opd':
    fn, args = r.cast_jit()
    chk.compile('rollout/cast', fn, args(chk.long_lived['state']['params']), {}, r.mesh,
                f'{_layout_label(r.layout)}', {'state', 'student_base'})
    engine = episodes_lib.rollout_engine(config, r)
    _compile_calls(chk, 'rollout', engine.abstract_calls(cast, rows, p_len),
                   r.sampler.run_mesh, set())
    train = (batch_bucket(rows, shd.batch_size_multiple(r.sampler.run_mesh)),
             r.rollout_sp.max_new_tokens)
  elif config.sft.source == 'teacher':
    t = r.teachers[0]
    sampler = r.teacher_sampler
    params = t.params if sampler.layout is None else jax.tree.map(
        lambda x, sh: _sds(x.shape, x.dtype, sh), t.params, sampler.layout.shardings(t.params))
    _compile_calls(chk, f'rollout/{t.name}', sampler.abstract_calls(
        params, rows, p_len, r.teacher_sp), sampler.run_mesh,
        {t.name} if sampler.layout is None else set())
  if config.data.eval:  # the eval rollout, unless training's rollout dominates its shapes
    dp = shd.batch_size_multiple(r.sampler.run_mesh)
    eval_rows = min(int(config.eval.batch_size),
                    int(config.eval.num_prompts or config.eval.batch_size))
    eval_new = int(config.eval.max_new_tokens or config.rollout.max_new_tokens)
    if train is None or batch_bucket(eval_rows, dp) > train[0] or eval_new > train[1]:
      sp = SamplingParams(max_new_tokens=eval_new, temperature=0.0, stop_ids=r.stop_ids)
      _compile_calls(chk, 'eval', r.sampler.abstract_calls(cast, eval_rows, p_len, sp),
                     r.sampler.run_mesh, set())


def _layout_label(layout) -> str:
  if layout is None:
    return 'training layout'
  return f'rollout layout data={layout.mesh.shape["data"]} tensor={layout.tp}'


def _compile_calls(chk: _Check, prefix: str, calls, mesh, args_of: set[str]) -> None:
  """Compiles an engine's abstract calls (a generator of rollout.decode.AbstractCall) as
  `prefix/NAME`, sending each call's abstract outputs (None: it did not compile) back; the
  buffers a call names `resident` count as long-lived while it runs."""
  outputs = None
  while True:
    try:
      call = calls.send(outputs)
    except StopIteration:
      return
    resident = {f'{prefix}/{k}': v for k, v in call.resident.items()}
    chk.long_lived.update(resident)
    try:
      compiled = chk.compile(f'{prefix}/{call.name}', call.fn, call.args, call.kwargs, mesh,
                             call.shapes, args_of)
    finally:
      for k in resident:
        del chk.long_lived[k]
    outputs = _strip(compiled.out_info) if compiled is not None else None


# ------------------------------------------------------------------------------- report
def _fmt(b: int) -> str:
  for unit, size in (('GiB', GiB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(b) >= size or unit == 'KiB':
      return f'{b / size:.2f} {unit}'
  return f'{b} B'


def format_report(rep: dict, config_name: str) -> str:
  """The report as a table: one row per compiled function, per-device bytes."""
  hbm = rep['hbm_per_device']
  lines = [f'opd_jax.tools.aot {config_name}',
           f'  target   {rep["label"]}',
           f'  HBM      {_fmt(hbm) + " per device" if hbm else "no limit (no --topology)"}',
           f'  mesh     {" ".join(f"{k}={v}" for k, v in rep["mesh"].items())}']
  lines += [f'  {k:<8} {v}' for k, v in rep['models'].items()]
  lines += [f'  note     {x}' for x in rep['notes']]
  head = ('per-device memory', 'args', 'outputs', 'alias', 'temps', 'total', '+resident',
          'peak', '')
  rows = []
  for f in rep['functions']:
    flag = '  OVER HBM' if f['name'] in rep['over_hbm'] else ''
    cells = [f['argument'], f['output'], f['alias'], f['temp'], f['total'], f['resident'],
             f['peak']]
    cells = [_fmt(c) if f['measured'] else '?' for c in cells]
    rows.append((f'{f["name"]}  [{f["shapes"]}]', *cells, flag))
  w0 = max(len(r[0]) for r in rows + [head])
  lines.append('')
  for r in [head] + rows:
    lines.append((f'{r[0]:<{w0}}' + ''.join(f'{c:>12}' for c in r[1:8]) + r[8]).rstrip())
  for f in rep['functions']:
    if f['compiler_oom']:
      lines.append(f'{f["name"]}: XLA:TPU says: {f["compiler_oom"]}')
  lines.append('')
  lines += aot_time.report_lines(rep, _fmt)
  big = rep['largest']
  lines.append('')
  if big['measured']:
    lines.append(f'largest: {big["name"]}: total {_fmt(big["total"])}, peak with resident '
                 f'buffers {_fmt(big["peak"])}')
  unmeasured = [f['name'] for f in rep['functions'] if not f['measured']]
  if unmeasured:
    lines.append(f'not measurable (one buffer alone exceeds the HBM): {", ".join(unmeasured)}')
  if rep.get('decode_gather_errors'):
    lines.append('DECODE GATHERS WEIGHTS per generated token: '
                 + ', '.join(rep['decode_gather_errors']))
  if rep['over_hbm']:
    lines.append(f'DOES NOT FIT in {_fmt(hbm)} HBM per device: {", ".join(rep["over_hbm"])}')
  elif hbm:
    lines.append(f'fits in {_fmt(hbm)} HBM per device')
  if rep['target'] == 'cpu-estimate':
    lines.append('CPU ESTIMATE: arguments and outputs are exact; temporaries come from XLA:CPU '
                 "(libtpu, e.g. pip install 'jax[tpu]', gives XLA:TPU's numbers)")
  lines.append('resident: buffers alive on the same devices that the function does not take '
               '(the train state during rollout and scoring, the teachers during the update, '
               "the continuous sampler's [B, N] outputs during its segments)")
  return '\n'.join(lines)


# --------------------------------------------------------------------------------- main
def _choose(topology: str | None, backend: str, num_devices: int):
  """('tpu' | 'cpu', Topology or None, number of CPU devices for the estimate)."""
  topo = parse_topology(topology) if topology else None
  if backend not in ('auto', 'tpu', 'cpu'):
    raise AotError(f'--backend={backend!r}; expected auto, tpu or cpu')
  if backend == 'tpu' or (backend == 'auto' and topo and libtpu_available()):
    if topo is None:
      raise AotError('--backend=tpu needs --topology (e.g. --topology=v5e-16)')
    return 'tpu', topo, 0
  # v4/v5p chips run as one megacore device each, so the estimate has one device per chip.
  return 'cpu', topo, num_devices or (topo.chips if topo else 8)


def _use_cpu_devices(n: int, argv: list[str]) -> None:
  """Makes JAX start with `n` CPU devices; re-runs this command in a fresh process (and
  exits with its status) when this one's JAX backend already started with another count."""
  if not xla_bridge.backends_are_initialized():
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)
    return
  if len(jax.devices()) == n and jax.default_backend() == 'cpu':
    return
  if os.environ.get(_REEXEC_ENV):
    raise AotError(f'could not start JAX with {n} CPU devices')
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{_REEXEC_ENV: '1'})
  env['XLA_FLAGS'] = (re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                             env.get('XLA_FLAGS', '')) +
                      f' --xla_force_host_platform_device_count={n}').strip()
  sys.exit(subprocess.call([sys.executable, '-m', 'opd_jax.tools.aot', *argv, '--backend=cpu',
                            f'--num_devices={n}'], env=env))


def _config_name(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return '(config)'


def run(config, *, topology: str | None = None, backend: str = 'auto', num_devices: int = 0,
        argv: list[str] | None = None, log=print, phases=PHASES) -> dict:
  """Picks the target, compiles `config` for it, prints the report and returns it."""
  argv = list(sys.argv[1:] if argv is None else argv)
  kind, topo, n_cpu = _choose(topology, backend, num_devices)
  if backend == 'tpu' and not libtpu_available():
    raise AotError("--backend=tpu needs libtpu, the TPU compiler (pip install 'jax[tpu]' of "
                   "this jax version); without it, --backend=cpu gives the CPU estimate")
  target = None
  if kind == 'tpu':
    if not xla_bridge.backends_are_initialized():
      jax.config.update('jax_platforms', 'cpu')  # the host runs nothing: TPU is compile-only
    try:
      target = tpu_target(topo)
    except Exception as e:  # noqa: BLE001  libtpu is installed but cannot describe topo here
      if backend == 'tpu':
        raise
      log(f'the TPU topology path is unavailable ({type(e).__name__}: {str(e)[:300]}); '
          f'falling back to the CPU estimate')
      n_cpu = num_devices or topo.chips
  if target is None:
    _use_cpu_devices(n_cpu, argv)
    target = cpu_target(n_cpu, topo)
  log(f'opd_jax.tools.aot: compiling one training step for {target.label}')
  rep = check_config(config, target, log=log, phases=tuple(phases))
  log(format_report(rep, _config_name(argv)))
  return rep


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'recipe: configs/NAME.py[:arg]', lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5e-16, v4-32, v5p-64, v6e-8, or a '
                      'layout such as v5e:4x4; unset: the CPU estimate on --num_devices')
  flags.DEFINE_enum('backend', 'auto', ['auto', 'tpu', 'cpu'],
                    'auto: the TPU topology when libtpu is importable, else the CPU estimate')
  flags.DEFINE_integer('num_devices', 0, "CPU estimate: fake devices (default: the "
                       "topology's chips, else 8)")
  flags.DEFINE_string('json', None, 'also write the report as JSON to this file')
  flags.DEFINE_list('phases', list(PHASES), 'the phases to compile: rollout, score, update')
  flags.DEFINE_bool('strict', False, 'exit with status 3 when a peak exceeds the HBM, 4 when '
                    'a decode loop gathers parameters at every token')
  flags.mark_flags_as_required(['config'])

  def _main(argv_rest):
    del argv_rest
    f = flags.FLAGS
    try:
      rep = run(config_flag.value, topology=f.topology, backend=f.backend,
                num_devices=f.num_devices, argv=(argv or sys.argv)[1:],
                log=lambda s: print(s, flush=True), phases=f.phases)
    except ConfigError as e:  # AotError included
      raise app.UsageError(str(e)) from e
    if f.json:
      with open(f.json, 'w') as fh:
        json.dump(rep, fh, indent=1)
    if f.strict and rep['over_hbm']:
      sys.exit(3)
    if f.strict and rep['decode_gather_errors']:
      sys.exit(4)

  app.run(_main, argv=argv)


if __name__ == '__main__':
  main()
