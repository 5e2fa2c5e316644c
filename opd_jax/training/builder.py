"""One way to build a run: the models, the jitted steps with their shardings and the stop
ids, shared by the trainer (`opd_jax.train`) and the ahead-of-time check (`opd_jax.tools.aot`), so
that the AOT check compiles exactly what the trainer runs.

  build_run(config, mesh, tokenizer=...)          the trainer's Run: weights loaded
  build_run(config, mesh, abstract=True, ...)     the AOT check's Run: the same pieces on
                                                  ShapeDtypeStructs, no weights

The checks that need no weights (validate, check_model_paths, check_signal, check_resume)
are opd_jax/training/checks.py; they are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.objectives import losses
from opd_jax.models import lora as lora_lib
from opd_jax import sharding as shd
from opd_jax.models import tiny
from opd_jax.training.checks import (RESUMABLE_FIELDS, ConfigError, batch_rows, check_model_paths,
                            check_resume, check_signal, teacher_specs, validate)
from opd_jax.models import Decoder, load_pretrained, read_hf_config
from opd_jax.models.presets import PRESETS, preset_config, preset_name
from opd_jax.rollout.decode import SamplingParams
from opd_jax.rollout.sampler import Sampler
from opd_jax.teachers.local import LocalTeacher, Teacher, TeacherSpec, teacher_mesh
from opd_jax.training.specs import lora_spec
from opd_jax.training.update import LossSpec, make_optimizer, make_train_state, make_update_fn

log = logging.getLogger(__name__)


def loss_spec(config) -> LossSpec:
  """The update's static loss settings from a config."""
  pg = config.mode != 'sft'
  return LossSpec(kind='pg' if pg else 'nll',
                  temperature=config.rollout.temperature, clip_eps=config.loss.clip_eps,
                  top_k=int(config.rollout.top_k) if pg else 0,
                  top_p=float(config.rollout.top_p) if pg else 1.0,
                  clip_eps_high=config.loss.clip_eps_high, ratio_level=config.loss.ratio_level,
                  tis_cap=config.loss.tis_cap if pg else None,
                  aggregation=config.loss.aggregation, full_vocab=config.loss.full_vocab,
                  full_vocab_coef=config.loss.full_vocab_coef, jsd_beta=config.loss.jsd_beta,
                  chunk_size=config.loss.chunk_size, remat=config.student.remat,
                  compute_dtype=config.student.compute_dtype,
                  full_vocab_top_k=int(config.loss.full_vocab_top_k),
                  vocab_chunk_size=config.loss.vocab_chunk_size)


def rollout_params(config, stop_ids) -> SamplingParams:
  return SamplingParams(max_new_tokens=config.rollout.max_new_tokens,
                        temperature=config.rollout.temperature, top_k=config.rollout.top_k,
                        top_p=config.rollout.top_p, stop_ids=tuple(stop_ids))


def stop_ids(hf_config: dict, tokenizer=None, stop_tokens=()) -> tuple[int, ...]:
  """The ids that end a response: the checkpoint's eos ids, the tokenizer's eos, and
  config.rollout.stop_tokens (which need the tokenizer)."""
  ids = {int(i) for i in np.atleast_1d(hf_config.get('eos_token_id') or []) if i is not None}
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  for tok in stop_tokens:
    tid = None if tokenizer is None else tokenizer.convert_tokens_to_ids(tok)
    if tid is None or tid == getattr(tokenizer, 'unk_token_id', None):
      raise ConfigError(f'config.rollout.stop_tokens: {tok!r} is not a token of the tokenizer')
    ids.add(int(tid))
  return tuple(sorted(ids))


def update_batch_spec(config, mesh, rows: int, seq: int, *, teacher_unembed=None):
  """The UpdateBatch the trainer feeds the update, as ShapeDtypeStructs of [rows, seq]
  batch-sharded on `mesh` (fields by the loss: SFT, 'pg', top-k distillation; for the exact
  / student-top-k options the teacher's hidden states and `teacher_unembed`, by default a
  ShapeDtypeStruct from the teacher's architecture, sharded like an LM head)."""
  from opd_jax.training.update import UpdateBatch
  bsh = shd.batch_sharding(mesh, 2)

  def sds(shape, dtype, sh=bsh):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sh)
  ints = [sds((rows, seq), jnp.int32) for _ in range(3)]
  if config.mode == 'sft':
    return UpdateBatch(*ints)
  batch = UpdateBatch(*ints, behaviour_logprobs=sds((rows, seq), jnp.float32),
                      advantages=sds((rows, seq), jnp.float32))
  if config.loss.full_vocab:  # the rows the teacher scored
    batch = dataclasses.replace(batch, teacher_rows=sds((rows,), jnp.float32,
                                                        shd.batch_sharding(mesh, 1)))
  if losses.needs_teacher_hidden(config.loss.full_vocab):
    if teacher_unembed is None:
      spec = teacher_specs(config)[0]
      src = model_source(spec.model, f'config.teachers.{spec.name}.model')
      shape = (src.cfg.vocab_size, src.cfg.hidden_size)
      teacher_unembed = sds(shape, jnp.dtype(spec.dtype), jax.sharding.NamedSharding(
          mesh, shd.spec_for('lm_head/weight', shape, mesh, shd.get_rules(spec.sharding))))
    d_t = teacher_unembed.shape[1]
    batch = dataclasses.replace(
        batch, teacher_hidden=sds((rows, seq, d_t), teacher_unembed.dtype,
                                  shd.batch_sharding(mesh, 3)),
        teacher_unembed=jax.ShapeDtypeStruct(teacher_unembed.shape, teacher_unembed.dtype,
                                             sharding=teacher_unembed.sharding))
  elif config.loss.full_vocab:
    k, bsh3 = int(config.loss.full_vocab_top_k), shd.batch_sharding(mesh, 3)
    batch = dataclasses.replace(batch, teacher_top_ids=sds((rows, seq, k), jnp.int32, bsh3),
                                teacher_top_logprobs=sds((rows, seq, k), jnp.float32, bsh3))
  return batch


# ------------------------------------------------------------------------------ models
@dataclasses.dataclass
class ModelSource:
  """A model entry's architecture: its ModelConfig, HF config dict and where it came from."""
  cfg: Any
  hf: dict
  where: str


def model_source(spec: str | None, field: str) -> ModelSource:
  """The architecture of a config's model entry: directory, `tiny:` spec, or preset."""
  if not spec:
    raise ConfigError(f'{field}: no model set')
  path = tiny.resolve_model(spec)
  if os.path.isdir(path):
    cfg, hf = read_hf_config(path)
    return ModelSource(cfg, hf, spec if spec == path else f'{spec} -> {path}')
  name = preset_name(path)
  if name is None:
    raise ConfigError(f'{field}={spec!r}: no such directory here and its basename names no '
                      f'architecture preset (known: {", ".join(PRESETS)}); pass a directory '
                      f'with a config.json, e.g. --{field}=/path/to/model')
  cfg, hf = preset_config(name)
  return ModelSource(cfg, hf, f'{spec} (not here: compiled from the {name} preset, '
                              f'{cfg.num_params / 1e9:.2f}B params)')


def abstract_model(src: ModelSource, dtype, mesh, rules):
  """(graphdef, params as ShapeDtypeStructs carrying their NamedShardings): no weights."""
  model = nnx.eval_shape(lambda: Decoder(src.cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                         hf_config=src.hf))
  graphdef, state = nnx.split(model)
  shardings = shd.param_shardings(state, mesh, rules)
  return graphdef, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class _RemoteInAot:
  """A remote teacher in the AOT check: nothing to compile or connect to."""
  cfg = None
  top_k = 0
  tokens_scored = rows_forwarded = 0

  def __init__(self, spec):
    self.spec, self.name = spec, spec.name

  def score(self, *args, **kw):
    raise RuntimeError('the AOT check does not score')


def make_teacher(spec: TeacherSpec, *, student_mesh, student_tokenizer=None, top_k: int = 0,
                 temperature: float = 1.0, micro_batches: int = 1, abstract: bool = False,
                 devices=None, field: str | None = None, with_hidden: bool = False,
                 stop_ids=(), template: str = 'default', tag_to_template=None) -> Teacher:
  """The one constructor of a teacher (or the G-OPD reference) from its spec, so that
  in-process and remote teachers score with the same temperature and top-k. `with_hidden`
  (in-process only): scoring also returns the final hidden states (the exact
  full-vocabulary options).

  `spec.cross_tokenizer` with a tokenizer that differs from the student's: the teacher is
  wrapped in a `CrossTokenizerTeacher` (teachers/cross.py) that re-tokenizes the student's
  responses in the teacher's chat template (`template` / `tag_to_template`: data.template's
  names) and aligns the logprobs to the student's tokens; `stop_ids` are the student's
  end-of-turn ids. With identical tokenizers and chat templates it is the plain teacher."""
  field = field or f'config.teachers.{spec.name}.model'
  if spec.cross_tokenizer and not abstract and student_tokenizer is not None:
    return _cross_teacher(spec, student_mesh=student_mesh, student_tokenizer=student_tokenizer,
                          top_k=top_k, temperature=temperature, micro_batches=micro_batches,
                          devices=devices, field=field, with_hidden=with_hidden,
                          stop_ids=stop_ids, template=template, tag_to_template=tag_to_template)
  if spec.remote_url:
    if abstract:
      return _RemoteInAot(spec)
    from opd_jax.teachers.remote import RemoteTeacher
    return RemoteTeacher(spec, student_tokenizer=student_tokenizer, mesh=student_mesh,
                         top_k=top_k, temperature=temperature)
  if abstract:
    src = model_source(spec.model, field)
    mesh = teacher_mesh(spec, student_mesh, devices)
    graphdef, params = abstract_model(src, jnp.dtype(spec.dtype), mesh, spec.sharding)
    teacher = LocalTeacher(spec, student_mesh=student_mesh, top_k=top_k,
                           temperature=temperature, micro_batches=micro_batches,
                           parts=(graphdef, params, src.cfg), devices=devices,
                           with_hidden=with_hidden)
    teacher.where = src.where
    return teacher
  spec = dataclasses.replace(spec, model=tiny.resolve_model(spec.model))
  if student_tokenizer is not None:
    import transformers
    from opd_jax import data as data_lib
    data_lib.check_tokenizers_match(
        student_tokenizer, transformers.AutoTokenizer.from_pretrained(spec.model),
        teacher_name=f'teacher {spec.name!r} ({spec.model})')
  return LocalTeacher(spec, student_mesh=student_mesh, top_k=top_k, temperature=temperature,
                      micro_batches=micro_batches, with_hidden=with_hidden)


def _cross_teacher(spec, *, student_tokenizer, stop_ids, template, tag_to_template, field,
                   **kw) -> Teacher:
  import transformers
  from opd_jax import data as data_lib
  from opd_jax.teachers.cross import CrossTokenizerTeacher
  if kw['top_k'] or kw['with_hidden']:
    raise ConfigError(f'config.teachers.{spec.name}.cross_tokenizer=True: no top-k or '
                      'full-vocabulary term across vocabularies (unset config.loss.full_vocab)')
  if not spec.remote_url:
    spec = dataclasses.replace(spec, model=tiny.resolve_model(spec.model))
  tok_path = tiny.resolve_model(spec.tokenizer) if spec.tokenizer else spec.model
  if not tok_path:
    raise ConfigError(f'config.teachers.{spec.name}.tokenizer: a remote cross-tokenizer '
                      "teacher needs the served model's tokenizer directory")
  teacher_tok = transformers.AutoTokenizer.from_pretrained(tok_path)
  plain = dataclasses.replace(spec, cross_tokenizer=False)
  try:
    data_lib.check_tokenizers_match(student_tokenizer, teacher_tok)
    same = (getattr(student_tokenizer, 'chat_template', None)
            == getattr(teacher_tok, 'chat_template', None))
  except data_lib.VocabMismatchError:
    same = False
  if same:
    log.info('teacher %r: cross_tokenizer=True, but its tokenizer and chat template are the '
             "student's: it scores the student's tokens directly", spec.name)
    return make_teacher(plain, student_tokenizer=student_tokenizer, field=field, **kw)
  inner = make_teacher(plain, student_tokenizer=None, field=field, **kw)
  if spec.remote_url:  # the server holds the teacher's tokenizer: check it against that one
    inner._check_server(teacher_tok, None)
  log.info('teacher %r: another tokenizer (%d tokens, student %d): scores re-tokenized text, '
           'aligned by character offsets (docs/design.md §12)', spec.name, len(teacher_tok),
           len(student_tokenizer))
  return CrossTokenizerTeacher(inner, student_tokenizer=student_tokenizer,
                               teacher_tokenizer=teacher_tok, stop_ids=stop_ids,
                               template=template, tag_to_template=tag_to_template)


def check_reference_tokenizer(config, student_tokenizer) -> None:
  """A G-OPD `gopd.reference` checkpoint scores the student's token ids like a teacher, so
  its tokenizer must map the same strings to the same ids (data.check_tokenizers_match);
  raises VocabMismatchError naming config.gopd.reference. No-op for 'student_init'."""
  ref = config.gopd.reference
  if not config.gopd.enabled or ref == 'student_init':
    return
  import transformers
  from opd_jax import data as data_lib
  data_lib.check_tokenizers_match(
      student_tokenizer, transformers.AutoTokenizer.from_pretrained(tiny.resolve_model(ref)),
      teacher_name=f'config.gopd.reference ({ref})')


# ---------------------------------------------------------------------------------- run
@dataclasses.dataclass
class Run:
  """Everything one training run computes with, built once from the config."""
  config: Any
  mesh: Any
  student_cfg: Any                       # ModelConfig
  student_where: str
  graphdef: Any
  params: Any                            # arrays (trainer) or ShapeDtypeStructs (AOT)
  teachers: list                         # Teacher, in config.teachers order
  specs: list                            # their TeacherSpecs
  reference: Teacher | None              # G-OPD reference
  stop_ids: tuple
  pad_id: int
  sampler: Sampler
  rollout_sp: SamplingParams
  teacher_sampler: Sampler | None        # SFT on teacher samples (the first teacher's)
  teacher_sp: SamplingParams | None
  tx: Any
  schedule: Any
  param_shardings: Any
  state_shardings: Any
  update_fn: Any
  loss: LossSpec
  notes: list
  teacher_samplers: list = dataclasses.field(default_factory=list)  # one per teacher (SFT)
  # A LoRA student (docs/design.md §9): `params` are the adapters, `base` the frozen base
  # (plain parameter tree, compute dtype), `train_graphdef` the adapted Decoder the update
  # runs; `graphdef` stays the plain Decoder (sampler, export).
  lora: Any = None
  base: Any = None
  train_graphdef: Any = None
  # The exact / student-top-k `loss.full_vocab` options: the teacher's output projection
  # [V, D] on the student's mesh (UpdateBatch.teacher_unembed).
  teacher_unembed: Any = None
  # The rollout layout (None: the sampler uses the training layout) and the cast
  # parameters' shardings on it (docs/design.md §5).
  layout: Any = None
  rollout_shardings: Any = None

  @property
  def coef_J(self):
    return jnp.asarray([s.kl_coef for s in self.specs], jnp.float32)

  @property
  def adv_mode(self) -> str:
    if self.config.rl.constant_advantage is not None:
      return 'constant'
    use_opd = self.config.mode == 'opd' and bool(self.teachers) and self.config.rl.use_opd
    if not use_opd:
      return 'none'
    return 'gopd' if self.config.gopd.enabled else 'opd'

  @property
  def compute_dtype(self):
    return jnp.dtype(self.config.student.compute_dtype)

  def init_state(self):
    """The train state (params, optimizer state, step) laid out as the update pins it."""
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda p: make_train_state(p, self.tx),
                     out_shardings=self.state_shardings)(self.params)

  def abstract_state(self):
    shape = jax.eval_shape(lambda p: make_train_state(p, self.tx), self.params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shape, self.state_shardings)

  def cast_fn(self):
    """Jitted params -> params in the compute dtype, resharded onto the rollout layout (the
    rollout samples with these; one relayout per rollout, `rollout_reshard_bytes` per
    device). For a LoRA student: adapters -> the merged plain parameters
    W + (alpha / r) B A in the compute dtype."""
    fn, args = self.cast_jit()
    return lambda params: fn(*args(params))

  def cast_jit(self):
    """(the jitted cast of `cast_fn`, trained params -> its arguments), for the AOT check."""
    dtype = self.config.student.compute_dtype
    if self.lora is not None:
      merged = jax.jit(lambda base, ad: lora_lib.merge_params(base, ad, self.lora, dtype),
                       out_shardings=self.rollout_shardings)
      return merged, lambda adapters: (self.base, adapters)
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=self.rollout_shardings), lambda p: (p,)

  @functools.cached_property
  def rollout_reshard_bytes(self) -> int:
    """Bytes the busiest device receives per rollout to relayout the (cast) parameters."""
    if self.layout is None:
      return 0
    dtype = jnp.dtype(self.config.student.compute_dtype)
    cast = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        self.plain_params)
    return shd.reshard_bytes(cast, self.param_shardings, self.rollout_shardings)

  @property
  def plain_params(self):
    """The plain Decoder's parameter tree as held: the base for LoRA, else the params."""
    return self.base if self.lora is not None else self.params

  def model_params(self, params):
    """The plain Decoder's float32 parameters for trained `params` (merged for LoRA): what
    the export writes."""
    if self.lora is None:
      return params
    return jax.jit(lambda base, ad: lora_lib.merge_params(base, ad, self.lora, jnp.float32),
                   out_shardings=self.param_shardings)(self.base, params)

  def param_counts(self) -> dict[str, float]:
    """{'params/trainable', 'params/total'} (logged at the first step)."""
    return lora_lib.param_counts(self.params, self.base)


def rollout_layout(config, mesh, cfg) -> shd.RolloutLayout | None:
  """The layout a model with architecture `cfg` samples on (config.rollout.tensor_parallel)."""
  try:
    return shd.rollout_layout(mesh, cfg.num_heads, cfg.num_kv_heads,
                              int(config.rollout.tensor_parallel))
  except ValueError as e:
    raise ConfigError(f'config.rollout.tensor_parallel: {e}') from None


def build_run(config, mesh, *, tokenizer=None, abstract: bool = False, devices=None) -> Run:
  """The run's models and jitted steps. `abstract`: no weights (ShapeDtypeStructs with their
  shardings, architectures from config.json or presets), for `opd_jax.tools.aot`; `devices`: the
  devices teacher slices are taken from (the AOT target's)."""
  validate(config, mesh)
  if tokenizer is not None and not abstract:
    check_reference_tokenizer(config, tokenizer)  # before any weights load
  notes: list[str] = []
  micro = int(config.batch.micro_batches)
  # The teacher returns its top-k for the top-k options; for the exact / student-top-k ones
  # its hidden states, from which the update recomputes its logits (losses §3.10).
  top_k = (int(config.loss.full_vocab_top_k) if config.loss.full_vocab in losses.TOPK_OPTIONS
           else 0)
  with_hidden = losses.needs_teacher_hidden(config.loss.full_vocab)
  temperature = float(config.rollout.temperature)
  # ------------------------------------------------------------------------ student
  lora = lora_spec(config)
  # A LoRA student's frozen base is held in the compute dtype (never updated, so no float32
  # master copy); a fully trained student's parameters are float32.
  student_dtype = jnp.float32 if lora is None else jnp.dtype(config.student.compute_dtype)
  if abstract:
    src = model_source(config.student.model, 'config.student.model')
    graphdef, params = abstract_model(src, student_dtype, mesh, config.student.sharding)
    cfg, hf, where = src.cfg, src.hf, src.where
  else:
    path = tiny.resolve_model(config.student.model)
    student = load_pretrained(path, mesh=mesh, rules=config.student.sharding,
                              dtype=student_dtype)
    graphdef, params = nnx.split(student)
    cfg, hf, where = student.cfg, student.hf_config, config.student.model
    del student
  base = train_graphdef = None
  if lora is not None:
    try:
      lora_lib.check_targets(lora, params)
    except ValueError as e:
      raise ConfigError(f'config.student.lora.targets={lora.targets!r}: {e}') from None
    base, base_shardings = params, jax.tree.map(lambda x: x.sharding, params)
    make = lora_lib.abstract_lora if abstract else lora_lib.init_adapters
    kw = {} if abstract else {'seed': int(config.seed)}
    train_graphdef, params = make(cfg, hf, lora, base_shardings, student_dtype, **kw)
    n_ad, n_base = lora_lib.num_params(params), lora_lib.num_params(base)
    notes.append(f'LoRA student: rank {lora.rank}, alpha {lora.alpha:g}, {n_ad:,} trainable '
                 f'adapter parameters over a frozen {jnp.dtype(student_dtype).name} base of '
                 f'{n_base:,}')
  # ----------------------------------------------------------------------- teachers
  specs = teacher_specs(config)
  teachers = []
  ids = stop_ids(hf, tokenizer, config.rollout.stop_tokens if tokenizer is not None
                 or not abstract else ())
  for spec in specs:
    if abstract and spec.remote_url:
      notes.append(f'teacher {spec.name!r} is remote ({spec.remote_url}): not compiled here')
    if abstract and spec.cross_tokenizer:
      notes.append(f'teacher {spec.name!r} has another tokenizer: compiled at the student\'s '
                   'sequence length (its own re-tokenized length varies per batch)')
    teachers.append(make_teacher(spec, student_mesh=mesh, student_tokenizer=tokenizer,
                                 top_k=top_k, temperature=temperature, micro_batches=micro,
                                 abstract=abstract, devices=devices, with_hidden=with_hidden,
                                 stop_ids=ids, template=config.data.template,
                                 tag_to_template=dict(config.data.tag_to_template)))
  teacher_unembed = None
  if with_hidden:
    if int(teachers[0].cfg.vocab_size) != int(cfg.vocab_size):
      raise ConfigError(
          f'config.loss.full_vocab={config.loss.full_vocab!r}: the teacher '
          f'{specs[0].name!r} has {teachers[0].cfg.vocab_size} output logits and the student '
          f'{cfg.vocab_size}; the exact divergences need the same vocabulary on both sides '
          '(use a top-k option)')
    teacher_unembed = teachers[0].unembed_on(mesh)
  reference = None
  if config.gopd.enabled:
    ref = config.gopd.reference
    spec = TeacherSpec(name='reference', model=config.student.model if ref == 'student_init'
                       else ref, sharding=config.student.sharding)
    reference = make_teacher(spec, student_mesh=mesh, top_k=0, temperature=temperature,
                             micro_batches=micro, abstract=abstract, devices=devices,
                             field='config.gopd.reference' if ref != 'student_init'
                             else 'config.student.model')
  # ------------------------------------------------------------------------- steps
  if abstract and config.rollout.stop_tokens and tokenizer is None:
    notes.append('config.rollout.stop_tokens not resolved (no tokenizer): shapes unaffected')
  pad_id = int(tokenizer.pad_token_id or 0) if tokenizer is not None else int(
      hf.get('pad_token_id') or 0)
  # The rollout runs on parameters cast to the compute dtype (its KV cache takes that dtype),
  # resharded onto the rollout layout (docs/design.md §5).
  layout = rollout_layout(config, mesh, cfg)
  sampler = Sampler(graphdef, mesh=mesh, pad_id=pad_id,
                    cache_dtype=jnp.dtype(config.student.compute_dtype),
                    slots=int(config.rollout.slots) or None, layout=layout)
  teacher_sampler = teacher_sp = None
  teacher_samplers = []
  if config.mode == 'sft' and config.sft.source == 'teacher':
    teacher_samplers = [Sampler(t.graphdef, mesh=t.mesh, pad_id=pad_id,
                                layout=rollout_layout(config, t.mesh, t.cfg))
                        for t in teachers]
    teacher_sampler = teacher_samplers[0]
    teacher_sp = SamplingParams(max_new_tokens=config.rollout.max_new_tokens,
                                temperature=config.sft.temperature, stop_ids=ids)
  mini = int(config.batch.mini_batches)
  tx, schedule = make_optimizer(config.optim, int(config.total_steps) * mini)
  param_shardings = jax.tree.map(lambda x: x.sharding, base if lora is not None else params)
  state_shardings = shd.match_shardings(
      jax.eval_shape(lambda p: make_train_state(p, tx), params), params, mesh)
  spec = loss_spec(config)
  update_fn = make_update_fn(graphdef if train_graphdef is None else train_graphdef, tx,
                             schedule, spec, micro_batches=micro,
                             state_shardings=state_shardings, frozen=base)
  rollout_shardings = (layout.shardings(base if lora is not None else params)
                       if layout is not None else param_shardings)
  return Run(config=config, mesh=mesh, student_cfg=cfg, student_where=where,
             graphdef=graphdef, params=params, teachers=teachers, specs=specs,
             reference=reference, stop_ids=ids, pad_id=pad_id, sampler=sampler,
             rollout_sp=rollout_params(config, ids), teacher_sampler=teacher_sampler,
             teacher_sp=teacher_sp, teacher_samplers=teacher_samplers, tx=tx, schedule=schedule,
             param_shardings=param_shardings, state_shardings=state_shardings,
             update_fn=update_fn, loss=spec, notes=notes, lora=lora, base=base,
             train_graphdef=train_graphdef, teacher_unembed=teacher_unembed,
             layout=layout, rollout_shardings=rollout_shardings)


__all__ = ['RESUMABLE_FIELDS', 'ConfigError', 'ModelSource', 'Run', 'abstract_model', 'batch_rows', 'build_run',
           'check_model_paths', 'check_reference_tokenizer', 'check_resume', 'check_signal',
           'loss_spec', 'model_source', 'make_teacher', 'rollout_layout', 'rollout_params',
           'stop_ids', 'teacher_specs', 'update_batch_spec',
           'validate']
