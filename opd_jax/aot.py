"""Ahead-of-time compile check: will a recipe fit on a TPU slice before one is booked?

  python -m opd_jax.aot --config configs/opd_single_teacher.py --topology v5e-16
  python -m opd_jax.aot --config configs/opd_single_teacher.py:runlocal     # 8 fake CPU devices
  python -m opd_jax.aot --config configs/opd_multi_teacher.py --topology v5p-64 \
      --config.rollout.max_new_tokens=4096

Compiles (lowers and compiles, never runs, loads no weights) every jitted function of one
training step exactly as `opd_jax.train` builds it, with the recipe's mesh, sharding rules
and batch shapes:
  rollout/prefill, rollout/decode  the student's Sampler (B = prompts_per_step x n_samples
                                   rounded up like the sampler does, P = the prompt bucket of
                                   data.max_prompt_len, N = rollout.max_new_tokens);
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
import numpy as np
from flax import nnx
from jax._src import xla_bridge  # backends_are_initialized(): no public equivalent
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax import sharding as shd
from opd_jax import tiny
from opd_jax.models import Decoder, read_hf_config
from opd_jax.models.presets import PRESETS, preset_config, preset_name
from opd_jax.sampling import DEFAULT_PROMPT_BUCKETS, Sampler, SamplingParams, batch_bucket
from opd_jax.sampling import bucket as prompt_bucket
from opd_jax.scoring import make_score_fn
from opd_jax.teachers import TeacherSpec
from opd_jax.train import ConfigError, loss_spec, rollout_params, validate
from opd_jax.update import make_optimizer, make_train_state, make_update_fn

GiB = 2**30

# HBM per chip (bytes). v4 and v5p chips are megacores: the runtime shows one device per
# chip, but the compile-only topology has one device per TensorCore (half the HBM each).
HBM_PER_CHIP = {'v4': 32 * GiB, 'v5e': 16 * GiB, 'v5p': 95 * GiB, 'v6e': 32 * GiB}
# Accelerator-type names count TensorCores for v4/v5p (v4-32 = 16 chips), chips otherwise.
CORES_PER_CHIP = {'v4': 2, 'v5e': 1, 'v5p': 2, 'v6e': 1}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e'}
_THREE_D = ('v4', 'v5p')

_REEXEC_ENV = 'OPD_JAX_AOT_CHILD'


class AotError(ValueError):
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
                f'jax {jax.__version__})', topo.hbm_per_chip // per_chip)


def cpu_target(n: int, topo: Topology | None) -> Target:
  """`n` CPU devices (fake ones: XLA_FLAGS set by `main` before JAX starts)."""
  devices = jax.devices('cpu')
  if len(devices) != n:
    raise AotError(f'the CPU estimate needs {n} CPU devices but JAX has {len(devices)}; run '
                   f'`python -m opd_jax.aot` (it sets XLA_FLAGS=--xla_force_host_platform_'
                   f'device_count={n} before JAX starts)')
  what = f'{topo.name}-shaped ' if topo else ''
  return Target(devices, 'cpu-estimate',
                f'CPU ESTIMATE: {what}mesh on {n} fake CPU devices (XLA:CPU; temporaries '
                f'differ from XLA:TPU)', topo.hbm_per_chip if topo else None)


# ------------------------------------------------------------------------------- models
@dataclasses.dataclass
class ModelSource:
  cfg: Any                  # ModelConfig
  hf: dict
  where: str                # how the architecture was found, for the report


def model_source(spec: str | None, field: str) -> ModelSource:
  """The architecture of a config's model entry: directory, `tiny:` spec, or preset."""
  if not spec:
    raise AotError(f'{field}: no model set')
  path = tiny.resolve_model(spec)
  if os.path.isdir(path):
    cfg, hf = read_hf_config(path)
    return ModelSource(cfg, hf, spec if spec == path else f'{spec} -> {path}')
  name = preset_name(path)
  if name is None:
    raise AotError(f'{field}={spec!r}: no such directory here and its basename names no '
                   f'architecture preset (known: {", ".join(PRESETS)}); pass a directory '
                   f'with a config.json, e.g. --{field}=/path/to/model')
  cfg, hf = preset_config(name)
  return ModelSource(cfg, hf, f'{spec} (not here: compiled from the {name} preset, '
                              f'{cfg.num_params / 1e9:.2f}B params)')


def _abstract_params(src: ModelSource, dtype, mesh, rules):
  """(graphdef, params as ShapeDtypeStructs carrying their NamedShardings)."""
  model = nnx.eval_shape(lambda: Decoder(src.cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                         hf_config=src.hf))
  graphdef, state = nnx.split(model)
  shardings = shd.param_shardings(state, mesh, rules)
  return graphdef, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _strip(info):
  """Compiled.out_info -> plain ShapeDtypeStructs (shape, dtype, sharding) to feed on."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      info)


def _bytes_by_device(tree) -> dict[Any, int]:
  """Bytes each device holds of a pytree of sharded ShapeDtypeStructs."""
  out: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    per = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for d in x.sharding.device_set:
      out[d] = out.get(d, 0) + per
  return out


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


def teacher_mesh(spec, student_mesh, devices):
  """The mesh an in-process teacher runs on (as opd_jax.teachers.LocalTeacher picks it)."""
  if spec.devices:
    return shd.make_mesh(spec.mesh or {'fsdp': -1}, devices=shd.parse_devices(spec.devices,
                                                                               devices))
  if spec.mesh:
    return shd.make_mesh(spec.mesh, devices=devices)
  return student_mesh


@dataclasses.dataclass
class _Model:
  """One model of the step, abstract: its architecture, graphdef, sharded params, mesh."""
  name: str
  cfg: Any
  graphdef: Any
  params: Any
  mesh: Any
  dtype: Any


def _model(name, src: ModelSource, dtype, mesh, rules) -> _Model:
  graphdef, params = _abstract_params(src, dtype, mesh, rules)
  return _Model(name, src.cfg, graphdef, params, mesh, dtype)


def check_config(config, target: Target, *, log=print) -> dict:
  """Compiles one training step of `config` for `target`; returns the report dict."""
  validate(config)
  tpu = target.kind == 'tpu-topology'
  mesh = shd.make_mesh(dict(config.mesh), devices=target.devices)
  dp = shd.batch_size_multiple(mesh)
  notes: list[str] = []

  # ---------------------------------------------------------------- models (no weights)
  src = model_source(config.student.model, 'config.student.model')
  student = _model('student', src, jnp.float32, mesh, config.student.sharding)
  models = {'student': src.where}
  compute = jnp.dtype(config.student.compute_dtype)
  # The rollout samples with parameters cast to the compute dtype (train.py's `cast`).
  cast_params = jax.tree.map(lambda x: _sds(x.shape, compute if jnp.issubdtype(
      x.dtype, jnp.floating) else x.dtype, x.sharding), student.params)
  eos = src.hf.get('eos_token_id')
  stop_ids = tuple(sorted({int(i) for i in np.atleast_1d(eos if eos is not None else [])}))
  pad_id = int(src.hf.get('pad_token_id') or 0)

  specs = [TeacherSpec.from_config(n, t) for n, t in config.teachers.items()]
  frozen: list[_Model] = []   # in-process teachers, then the G-OPD reference
  for spec in specs:
    if spec.remote_url:
      notes.append(f'teacher {spec.name!r} is remote ({spec.remote_url}): not compiled here')
      continue
    t_src = model_source(spec.model, f'config.teachers.{spec.name}.model')
    if t_src.cfg.vocab_size != src.cfg.vocab_size:
      notes.append(f'teacher {spec.name!r} has vocab_size {t_src.cfg.vocab_size}, the '
                   f'student {src.cfg.vocab_size} (the trainer checks the tokenizers match)')
    frozen.append(_model(spec.name, t_src, jnp.dtype(spec.dtype),
                         teacher_mesh(spec, mesh, target.devices), spec.sharding))
    models[f'teacher {spec.name}'] = f'{t_src.where}, {spec.dtype}, {spec.sharding} rules' + (
        f', devices {spec.devices}' if spec.devices else '')
  if config.gopd.enabled:
    ref = config.gopd.reference
    r_src = src if ref == 'student_init' else model_source(ref, 'config.gopd.reference')
    frozen.append(_model('reference', r_src, jnp.float32, mesh, config.student.sharding))
    models['reference'] = r_src.where

  # ------------------------------------------------------------------------ batch shapes
  mini = int(config.batch.mini_batches)
  micro = int(config.batch.micro_batches)
  rows = (config.sft.batch_size if config.mode == 'sft'
          else config.rollout.prompts_per_step * config.rollout.n_samples)
  if rows % (mini * micro * dp):
    raise ConfigError(f'the batch of {rows} rows is not divisible by batch.mini_batches x '
                      f'batch.micro_batches x the data-parallel extent ({mini} x {micro} x '
                      f'{dp})')
  p_len = prompt_bucket(config.data.max_prompt_len, DEFAULT_PROMPT_BUCKETS)
  n_new = int(config.rollout.max_new_tokens)
  seq = p_len + n_new
  if config.mode == 'sft' and config.sft.source == 'dataset':
    seq = p_len + prompt_bucket(n_new, DEFAULT_PROMPT_BUCKETS)
    notes.append(f'SFT on dataset responses: L = {p_len} + {seq - p_len} assumes responses '
                 f'of at most rollout.max_new_tokens tokens (bucketed)')
  if compute != jnp.float32:
    notes.append(f'rollout KV cache in {compute.name} (config.student.compute_dtype)')

  # --------------------------------------------------------------------------- compile
  reports: list[FunctionReport] = []
  long_lived: dict[str, Any] = {}   # name -> pytree that stays in HBM across the step

  def add(name, result, shapes, args_of: set[str], fn_mesh):
    compiled, oom = result
    a, o, al, t = _memory(compiled) if compiled is not None else (0, 0, 0, 0)
    fn_devices = set(fn_mesh.devices.flat)
    per_dev: dict[Any, int] = {}
    for lname, tree in long_lived.items():
      if lname not in args_of:
        for d, nbytes in _bytes_by_device(tree).items():
          if d in fn_devices:
            per_dev[d] = per_dev.get(d, 0) + nbytes
    reports.append(FunctionReport(name, shapes, a, o, al, t, max(per_dev.values(), default=0),
                                  oom, compiled is not None))

  # The train state laid out as the trainer pins it (optimizer moments follow their params).
  tx, schedule = make_optimizer(config.optim, int(config.total_steps) * mini)
  state_shape = jax.eval_shape(lambda p: make_train_state(p, tx), student.params)
  state_shardings = shd.match_shardings(state_shape, student.params, mesh)
  state = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), state_shape, state_shardings)
  long_lived['state'] = state
  long_lived.update({m.name: m.params for m in frozen})

  def rollout(prefix, m: _Model, params, b, sp, args_of, cache_dtype):
    """Compiles the Sampler's prefill and decode for b rows; returns the row bucket."""
    bb = batch_bucket(b, shd.batch_size_multiple(m.mesh))
    # As train.py builds it: the KV cache in the student's compute dtype.
    sampler = Sampler(m.graphdef, mesh=m.mesh, pad_id=pad_id, cache_dtype=cache_dtype)
    ids = _sds((bb, p_len), jnp.int32, shd.batch_sharding(m.mesh, 2))
    shapes = f'B={bb} P={p_len} N={sp.max_new_tokens}'
    pre = _compile(f'{prefix}/prefill', sampler._prefill, (params, ids, ids),
                   dict(max_new_tokens=sp.max_new_tokens, cache_dtype=cache_dtype),
                   mesh=m.mesh, tpu=tpu, log=log)
    add(f'{prefix}/prefill', pre, shapes, args_of, m.mesh)
    if pre[0] is not None:
      cache, logits = _strip(pre[0].out_info)
    else:  # the prefill does not compile; the decode still can, on the sampler's layout
      kv_axis = 'tensor' if m.cfg.num_kv_heads % m.mesh.shape['tensor'] == 0 else None
      kv = _sds((bb, p_len + sp.max_new_tokens, m.cfg.num_kv_heads, m.cfg.head_dim),
                cache_dtype, NamedSharding(m.mesh, P(shd.BATCH_AXES, None, kv_axis, None)))
      cache = {'k': [kv] * m.cfg.num_layers, 'v': [kv] * m.cfg.num_layers}
      logits = _sds((bb, m.cfg.vocab_size), jnp.float32, shd.batch_sharding(m.mesh, 2))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _sds(key.shape, key.dtype, shd.replicated(m.mesh))
    done = _sds((bb,), jnp.bool_, shd.batch_sharding(m.mesh, 1))
    dec = _compile(f'{prefix}/decode', sampler._decode, (params, cache, logits, ids, done, key),
                   dict(sp=sp, pad_id=pad_id), mesh=m.mesh, tpu=tpu, log=log)
    add(f'{prefix}/decode', dec, shapes, args_of, m.mesh)
    return bb

  # rollout: the student's own samples (OPD), or the teacher's (SFT source='teacher')
  train_rollout = None
  if config.mode == 'opd':
    sp = rollout_params(config, stop_ids)
    train_rollout = (rollout('rollout', student, cast_params, rows, sp, set(), compute),
                     sp.max_new_tokens)
  elif config.sft.source == 'teacher':
    if not frozen or specs[0].remote_url:
      raise ConfigError("config.sft.source='teacher' needs an in-process teacher")
    sp = SamplingParams(max_new_tokens=n_new, temperature=config.sft.temperature,
                        stop_ids=stop_ids)
    rollout(f'rollout/{frozen[0].name}', frozen[0], frozen[0].params, rows, sp,
            {frozen[0].name}, frozen[0].dtype)
  if config.data.eval:  # the eval rollout, unless training's rollout dominates its shapes
    eval_rows = min(int(config.eval.batch_size),
                    int(config.eval.num_prompts or config.eval.batch_size))
    eval_new = int(config.eval.max_new_tokens or n_new)
    if (train_rollout is None or batch_bucket(eval_rows, dp) > train_rollout[0]
        or eval_new > train_rollout[1]):
      rollout('eval', student, cast_params, eval_rows,
              SamplingParams(max_new_tokens=eval_new, temperature=0.0, stop_ids=stop_ids),
              set(), compute)

  # teacher scoring: every row routed to every teacher (the worst case)
  top_k = int(config.loss.full_vocab_top_k) if config.loss.full_vocab else 0
  if config.mode == 'opd':
    for m in frozen:
      k = top_k if m.name != 'reference' else 0
      tb = batch_bucket(rows, shd.batch_size_multiple(m.mesh))
      tok = _sds((tb, seq), jnp.int32, shd.batch_sharding(m.mesh, 2))
      score = make_score_fn(m.graphdef, top_k=k, temperature=config.rollout.temperature,
                            micro_batches=int(config.batch.micro_batches))
      c = _compile(f'score/{m.name}', score, (m.params, tok, tok), {}, mesh=m.mesh, tpu=tpu,
                   log=log)
      add(f'score/{m.name}', c, f'B={tb} L={seq}' + (f' top_k={k}' if k else ''), {m.name},
          m.mesh)

  # the update on one mini-batch (traced under the state's mesh, as in the trainer)
  ub = rows // mini
  bsh = shd.batch_sharding(mesh, 2)
  fields = ['tokens', 'attention_mask', 'loss_mask']
  batch = {f: _sds((ub, seq), jnp.int32, bsh) for f in fields}
  if config.mode != 'sft':
    batch.update(behaviour_logprobs=_sds((ub, seq), jnp.float32, bsh),
                 advantages=_sds((ub, seq), jnp.float32, bsh))
    if config.loss.full_vocab:
      bsh3 = shd.batch_sharding(mesh, 3)
      batch.update(teacher_top_ids=_sds((ub, seq, top_k), jnp.int32, bsh3),
                   teacher_top_logprobs=_sds((ub, seq, top_k), jnp.float32, bsh3))
  update = make_update_fn(student.graphdef, tx, schedule, loss_spec(config),
                          micro_batches=micro, state_shardings=state_shardings)
  c = _compile('update', update, (state, batch), {}, tpu=tpu, log=log)
  add('update', c, f'B={ub} (micro {ub // micro}) L={seq}', {'state'}, mesh)

  worst = max(reports, key=lambda r: (r.measured, r.peak))
  return {
      'target': target.kind, 'label': target.label,
      'hbm_per_device': target.hbm_per_device,
      'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'models': models, 'notes': notes,
      'functions': [dict(dataclasses.asdict(r), total=r.total, peak=r.peak) for r in reports],
      'largest': {'name': worst.name, 'total': worst.total, 'peak': worst.peak,
                  'measured': worst.measured},
      'over_hbm': [r.name for r in reports if r.compiler_oom or (
          target.hbm_per_device and r.peak > target.hbm_per_device)],
  }


# ------------------------------------------------------------------------------- report
def _fmt(b: int) -> str:
  for unit, size in (('GiB', GiB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(b) >= size or unit == 'KiB':
      return f'{b / size:.2f} {unit}'
  return f'{b} B'


def format_report(rep: dict, config_name: str) -> str:
  """The report as a table: one row per compiled function, per-device bytes."""
  hbm = rep['hbm_per_device']
  lines = [f'opd_jax.aot {config_name}',
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
  big = rep['largest']
  lines.append('')
  if big['measured']:
    lines.append(f'largest: {big["name"]}: total {_fmt(big["total"])}, peak with resident '
                 f'buffers {_fmt(big["peak"])}')
  unmeasured = [f['name'] for f in rep['functions'] if not f['measured']]
  if unmeasured:
    lines.append(f'not measurable (one buffer alone exceeds the HBM): {", ".join(unmeasured)}')
  if rep['over_hbm']:
    lines.append(f'DOES NOT FIT in {_fmt(hbm)} HBM per device: {", ".join(rep["over_hbm"])}')
  elif hbm:
    lines.append(f'fits in {_fmt(hbm)} HBM per device')
  if rep['target'] == 'cpu-estimate':
    lines.append('CPU ESTIMATE: arguments and outputs are exact; temporaries come from XLA:CPU '
                 "(libtpu, e.g. pip install 'jax[tpu]', gives XLA:TPU's numbers)")
  lines.append('resident: buffers alive on the same devices that the function does not take '
               '(the train state during rollout and scoring, the teachers during the update)')
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
  sys.exit(subprocess.call([sys.executable, '-m', 'opd_jax.aot', *argv, '--backend=cpu',
                            f'--num_devices={n}'], env=env))


def _config_name(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return '(config)'


def run(config, *, topology: str | None = None, backend: str = 'auto', num_devices: int = 0,
        argv: list[str] | None = None, log=print) -> dict:
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
  log(f'opd_jax.aot: compiling one training step for {target.label}')
  rep = check_config(config, target, log=log)
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
  flags.DEFINE_bool('strict', False, 'exit with status 3 when a peak exceeds the HBM')
  flags.mark_flags_as_required(['config'])

  def _main(argv_rest):
    del argv_rest
    f = flags.FLAGS
    try:
      rep = run(config_flag.value, topology=f.topology, backend=f.backend,
                num_devices=f.num_devices, argv=(argv or sys.argv)[1:],
                log=lambda s: print(s, flush=True))
    except AotError as e:
      raise app.UsageError(str(e)) from e
    if f.json:
      with open(f.json, 'w') as fh:
        json.dump(rep, fh, indent=1)
    if f.strict and rep['over_hbm']:
      sys.exit(3)

  app.run(_main, argv=argv)


if __name__ == '__main__':
  main()
