"""The opd_jax trainer: on-policy distillation, mixed RL + OPD, G-OPD, RL and SFT, one loop.

  python -m opd_jax.train --config configs/opd_single_teacher.py:runlocal --workdir /tmp/run \
      [--config.total_steps=20 --config.optim.lr=1e-5 ...]

`run()` reads top to bottom: checks -> mesh -> data -> the run (opd_jax.training.builder.build_run:
models and jitted steps, shared with the AOT check) -> restore -> loop -> finish. One step
of the loop is `opd_batch` (prompts -> rollout -> teacher scoring -> rewards -> advantages)
or `sft_batch`, then `apply_update`, then `end_step` (metrics, eval, checkpoint). The data
flow and the math: docs/design.md §2-3. Experiments change configs, never this file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.objectives import estimators as adv_lib
from opd_jax.training import flops as compute
from opd_jax.training import evaluation
from opd_jax.rollout import multiturn
from opd_jax.rollout.engine import rollout_arrays, rollout_token_counts
from opd_jax.training import episodes as episodes_lib
from opd_jax.objectives import advantages as token_adv
from opd_jax.training import batches as steps
from opd_jax.models import tiny
from opd_jax import data as data_lib
from opd_jax.models import lora as lora_lib
from opd_jax import rewards as rewards_lib
from opd_jax import sharding as shd
from opd_jax.training.builder import (ConfigError, build_run, check_model_paths, check_resume,
                             check_signal, loss_spec, rollout_params, validate)
from opd_jax.training.checkpoint import Checkpointer, PreemptionFlag
from opd_jax.training.metrics import MetricWriter
from opd_jax.models import save_pretrained
from opd_jax.buckets import DEFAULT_PROMPT_BUCKETS
from opd_jax.teachers.cross import ScoreContext
from opd_jax.teachers.local import route_matrix, score_teachers, submit_teachers
from opd_jax.teachers.remote import RemoteTeacherError
from opd_jax.training.update import UpdateBatch

log = logging.getLogger('opd_jax.train')

LORA_ADAPTER_DIR = 'adapter'  # export/adapter/: a LoRA student's PEFT adapter

__all__ = ['ConfigError', 'init_distributed', 'loss_spec', 'rollout_params', 'run', 'validate']


def init_distributed(config) -> None:
  """Joins a multi-process run: with JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES,
  JAX_PROCESS_ID) from the environment, as launch/local.sh sets them, or by JAX's own
  detection (TPU pods, SLURM, ...) when config.distributed is set. A no-op otherwise."""
  addr = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not addr and not config.distributed:
    return
  kw = {}
  if addr:
    kw['coordinator_address'] = addr
    if 'JAX_NUM_PROCESSES' in os.environ:
      kw.update(num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                process_id=int(os.environ['JAX_PROCESS_ID']))
  try:
    jax.distributed.initialize(**kw)
  except RuntimeError as e:
    if 'already' not in str(e):
      raise


# ==================================================================================== data
@dataclasses.dataclass
class Data:
  tokenizer: Any
  encoder: data_lib.PromptEncoder
  prompts: data_lib.PromptSampler      # training prompts, resumable
  eval_records: list                   # this run's held-out records (all processes')
  eval_tags: list
  train_tags: list


def load_data(config) -> Data:
  import transformers
  pcount = jax.process_count()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny.resolve_model(config.student.model))
  encoder = data_lib.PromptEncoder(
      tokenizer, template=config.data.template, tag_to_template=dict(config.data.tag_to_template),
      max_prompt_len=config.data.max_prompt_len, on_too_long=config.data.on_too_long)
  domains = data_lib.load_domains(dict(config.data.train), default_tag=config.data.default_tag)
  domains = {d: encoder.drop_too_long(recs) for d, recs in domains.items()}
  if encoder.skipped:
    log.warning('skipped prompts over max_prompt_len, by tag: %s', dict(encoder.skipped))
  prompts = data_lib.PromptSampler(domains, interleave=dict(config.data.interleave) or None,
                                   seed=config.seed)
  eval_records = [r for recs in data_lib.load_domains(
      dict(config.data.eval), default_tag=config.data.default_tag).values() for r in recs
  ] if config.data.eval else []  # no held-out data: evaluation is skipped
  if config.eval.num_prompts:
    eval_records = eval_records[:config.eval.num_prompts]
  if pcount > 1 and len(eval_records) % pcount:  # every process evaluates an equal share
    log.warning('evaluating %d of %d held-out prompts (a multiple of %d processes)',
                len(eval_records) // pcount * pcount, len(eval_records), pcount)
    eval_records = eval_records[:len(eval_records) // pcount * pcount]
  return Data(tokenizer, encoder, prompts, eval_records, sorted({r.tag for r in eval_records}),
              sorted({r.tag for recs in domains.values() for r in recs}))


# ================================================================================ context
@dataclasses.dataclass
class Loop:
  """What the loop steps share: the run, the data, and the run's running totals."""
  config: Any
  run: Any                              # builder.Run
  data: Data
  writer: MetricWriter
  flops: compute.FlopCounter
  ckpt: Checkpointer
  base_key: Any
  cast: Any                             # params -> params in the compute dtype
  engine: Any = None                    # rollout.engine.RolloutEngine of the OPD step
  # rollout.max_staleness=1: {'behaviour_params', 'data'} of the batch in flight, saved with
  # each checkpoint so that a resumed run samples it again (docs/design.md §11)
  in_flight: dict | None = None
  on_eval: Any = None  # run()'s on_eval(step, params) -> more evaluation scalars

  @property
  def agent(self):
    """The engine's multi-turn sampler (config.agent.tag_to_env), or None."""
    return getattr(self.engine, 'agent', None)

  def local(self, records):
    return data_lib.host_slice(records, jax.process_index(), jax.process_count())

  def evaluate(self, step: int, params) -> dict:
    m = self._evaluate(step, params)
    if self.on_eval is not None:
      m = {**m, **{k: float(v) for k, v in self.on_eval(step, self.cast(params)).items()}}
    return m

  def _evaluate(self, step: int, params) -> dict:
    c, r, d = self.config, self.run, self.data
    settings = evaluation.EvalSettings(
        batch_size=c.eval.batch_size, stop_ids=r.stop_ids,
        max_new_tokens=c.eval.max_new_tokens or c.rollout.max_new_tokens,
        temperature=c.rollout.temperature, top_k=int(c.rollout.top_k),
        top_p=float(c.rollout.top_p), pass_k_temperature=c.eval.temperature,
        pass_k=tuple(c.eval.pass_k), reverse_kl=c.eval.reverse_kl,
        num_text_samples=c.eval.num_text_samples)
    records = self.local(d.eval_records) if jax.process_count() > 1 else d.eval_records
    episode_records = []
    if self.agent is not None:  # records with an environment are evaluated as episodes
      records, episode_records = self.agent.split(records)
    key = jax.random.fold_in(self.base_key, 2**31 - 1)
    m = evaluation.evaluate(
        step=step, key=key,
        student_params=self.cast(params), sampler=r.sampler, encoder=d.encoder,
        tokenizer=d.tokenizer, records=records, settings=settings,
        tag_to_reward=dict(c.rl.tag_to_reward), default_reward=c.rl.default_reward,
        teachers=r.teachers, kl_fn=self.teacher_kl, writer=self.writer, tag_vocab=d.eval_tags)
    if not episode_records:
      return m
    return multiturn.evaluate(
        self.agent, key=key, params=self.cast(params), records=episode_records,
        batch_size=c.eval.batch_size, temperature=c.rollout.temperature, top_k=c.rollout.top_k,
        top_p=c.rollout.top_p, kl_fn=self.teacher_kl if c.eval.reverse_kl else None,
        teachers=r.teachers, base=m, n_single=len(records))

  def teacher_kl(self, tokens, attn, lmask, s_b, tags, records=None):
    route = route_matrix(tags, self.run.specs)
    t, _ = score_teachers(self.run.teachers, tokens, attn, route,
                          out_sharding=tokens.sharding, count=False,
                          context=None if records is None else ScoreContext(records, lmask))
    _, kl_sum, kl_cnt = token_adv.advantages(s_b, t, None, self.run.coef_J, jnp.asarray(route),
                                         lmask, None, mode='none')
    return shd.to_host(kl_sum), shd.to_host(kl_cnt)

  def save(self, step, state, result, *, force):
    in_flight = self.in_flight  # pipelined: what the next batch was sampled from (§11)
    if in_flight is not None:
      state = dict(state, behaviour_params=in_flight['behaviour_params'])
    self.ckpt.save(step, state, {
        'data': in_flight['data'] if in_flight is not None else self.data.prompts.state(),
        'step': step, 'history': self.writer.history,
        'final': result.get('final'), 'flops': self.flops.totals,
        'tokens_scored': {t.name: t.tokens_scored for t in self.run.teachers}}, force=force)


# =================================================================================== run
def run(config, workdir: str, *, on_update=None, on_eval=None) -> dict:
  """Trains as `config` says; returns {'history', 'final', 'preempted', 'step',
  'tokens_scored'}. `on_update(step, batch, metrics)`, when given, sees each step's
  UpdateBatch and batch metrics just before its update (tests and benchmarks).
  `on_eval(step, params)`, when given, runs at every evaluation with the rollout's
  parameters and returns more scalars for that evaluation (experiments' task metrics)."""
  # ------------------------------------------- checks that need no weights, then data
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
  for noisy in ('absl', 'orbax', 'jax._src'):  # orbax logs every file it renames at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  init_distributed(config)
  validate(config)
  episodes_lib.validate_config(config)
  check_model_paths(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = shd.make_mesh(dict(config.mesh))
  log.info('mesh %s over %d devices, %d processes', dict(mesh.shape), mesh.size,
           jax.process_count())
  validate(config, mesh)  # the batch layout on this mesh
  data = load_data(config)
  # With an outcome estimator, an environment's episode reward is a signal of its tags.
  check_signal(config, [t for t in data.train_tags if not (
      config.rl.estimator and t in config.agent.tag_to_env)])
  ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save)
  check_resume(config, workdir, resuming=ckpt.latest_step() is not None)
  # ---------------------------------------------------- models, jitted steps, restore
  r = build_run(config, mesh, tokenizer=data.tokenizer)
  state = r.init_state()
  start_step, meta = 0, {}
  pipelined = config.mode == 'opd' and int(config.rollout.max_staleness) > 0
  behaviour = None  # pipelined: the parameters that sample the first batch of this run
  if ckpt.latest_step() is not None:
    start_step = int(ckpt.latest_step())
    if pipelined:  # the checkpoint also holds the parameters that sampled the next batch
      state, meta = ckpt.restore(start_step, dict(state, behaviour_params=state['params']))
      behaviour = state.pop('behaviour_params')
    else:
      state, meta = ckpt.restore(start_step, state)
    data.prompts.restore(meta['data'])
    log.info('resumed from %s at step %d', ckpt.directory, start_step)
  total_steps = int(config.total_steps)
  writer = MetricWriter(workdir, total_steps, start_step=start_step)
  if start_step:  # the curves so far travel with the checkpoint
    writer.history = {k: [tuple(x) for x in v] for k, v in meta.get('history', {}).items()}
  loop = Loop(config, r, data, writer, compute.FlopCounter(meta.get('flops')), ckpt,
              jax.random.key(config.seed), r.cast_fn(),
              episodes_lib.rollout_engine(config, r, data.tokenizer, data.encoder),
              on_eval=on_eval)
  for t in r.teachers:
    if t.cfg is None:
      log.warning('teacher %r is remote: its scoring FLOPs are not counted (its architecture '
                  'is not known here)', t.name)
  if start_step == 0:  # what is trained (LoRA: the adapters) out of the student's total
    counts = r.param_counts()
    log.info('student parameters: %d trainable of %d', counts['params/trainable'],
             counts['params/total'])
    writer.scalars(0, counts)
  if config.eval_at_start and start_step == 0 and data.eval_records:
    m = loop.evaluate(0, state['params'])
    writer.scalars(0, m)
    writer.progress(0, m, prefix='eval ')
  # ------------------------------------------------------------------------- the loop
  result = {'preempted': False, 'step': start_step}
  if pipelined:
    with PreemptionFlag() as preempt:
      state = pipelined_loop(loop, state, behaviour, start_step, result, preempt, on_update)
    return finish(loop, state, result, start_step, meta, workdir)
  with PreemptionFlag() as preempt:
    for step in range(start_step + 1, total_steps + 1):
      t_step = time.time()
      key = jax.random.fold_in(loop.base_key, step)
      try:
        if config.mode == 'sft':
          batch, metrics = sft_batch(loop, key)
        else:
          batch, metrics = opd_batch(loop, state, key)
      except RemoteTeacherError as e:
        raise teacher_server_failed(loop, step, e) from None
      state = update_step(loop, state, batch, metrics, step, t_step, on_update)
      result['step'] = step
      if end_step(loop, state, step, metrics, result, preempt):
        break
  return finish(loop, state, result, start_step, meta, workdir)


def update_step(loop: Loop, state, batch: UpdateBatch, metrics: dict, step: int, t_step: float,
                on_update=None):
  """The update of one step, shared by both loops: `on_update` sees the batch first, then
  apply_update; its metrics and the update / whole-step times go into `metrics`. Returns
  the new state."""
  if on_update is not None:
    on_update(step, batch, metrics)
  t_update = time.time()
  state, upd = apply_update(loop, state, batch, step)
  metrics.update(upd)
  metrics['perf/update_s'] = time.time() - t_update
  metrics['perf/step_s'] = time.time() - t_step
  return state


def pipelined_loop(loop: Loop, state, behaviour, start_step: int, result: dict, preempt,
                   on_update=None):
  """The OPD loop with rollout.max_staleness=1 (docs/design.md §11). Batch k + 1 is sampled
  with the parameters from before update k, and its scoring submitted, before batch k's
  scores are awaited and update k runs; so the teachers score batch k + 1 while the student
  trains on batch k and samples batch k + 2. Batch 1 (and, after a resume from step s,
  batch s + 1) is sampled first, with `behaviour` (None: the state's parameters).

  Each checkpoint also holds the in-flight batch's sampling parameters and the data position
  before it (`Loop.in_flight`): a run stopped at step k (SIGTERM, preemption,
  debug.stop_at_step) drops batch k + 1, and the resumed run samples it again from the same
  parameters, prompts and key, so a SIGKILLed, resumed run ends with the weights of an
  uninterrupted one. Returns the final state."""
  total = int(loop.config.total_steps)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  if start_step >= total:
    return state
  params0 = state['params'] if behaviour is None else behaviour
  loop.in_flight = {'behaviour_params': params0, 'data': loop.data.prompts.state()}
  behaviour_step = start_step - (0 if behaviour is None else 1)

  def sample(params, step):
    sampled = sample_batch(loop, params, jax.random.fold_in(loop.base_key, step))
    return sampled, submit_scoring(loop, sampled)

  try:
    cur = sample(params0, start_step + 1)
  except RemoteTeacherError as e:
    raise teacher_server_failed(loop, start_step + 1, e) from None
  for step in range(start_step + 1, total + 1):
    t_step = time.time()
    try:
      nxt, staleness = None, (step - 1) - behaviour_step
      if step < total:
        # θ_{k-1}, which samples batch k + 1; a copy survives update k for the checkpoint
        loop.in_flight = {'behaviour_params': copy(state['params']),
                          'data': loop.data.prompts.state()}
        nxt = sample(state['params'], step + 1)
      batch, metrics = finish_batch(loop, *cur)
    except RemoteTeacherError as e:
      raise teacher_server_failed(loop, step, e) from None
    metrics['pipeline/staleness'] = float(staleness)
    if nxt is not None:
      metrics['pipeline/next_rollout_s'] = nxt[0].t_rollout
    state = update_step(loop, state, batch, metrics, step, t_step, on_update)
    result['step'] = step
    behaviour_step = step - 1
    if step == total:
      loop.in_flight = {'behaviour_params': state['params'], 'data': loop.data.prompts.state()}
    if end_step(loop, state, step, metrics, result, preempt):
      break
    cur = nxt
  return state


def teacher_server_failed(loop: Loop, step: int, err: Exception) -> RemoteTeacherError:
  """The error that stops a run whose teacher server failed for good (the client has
  retried `remote_retries` times with backoff): it names the server's URL (in `err`) and the
  last checkpoint, from which a rerun with the same workdir resumes."""
  loop.ckpt.wait()
  last = loop.ckpt.latest_step()
  where = (f'the last checkpoint is step {last} in {loop.ckpt.directory}; rerun with the same '
           f'--workdir to resume from it' if last is not None else
           'no checkpoint was saved yet; a rerun starts from step 0')
  return RemoteTeacherError(
      f'step {step}: stopping, a teacher server failed: {err}. Nothing after step {last or 0} '
      f'was trained; {where} (with --config.teachers.<name>.remote_url=... if the server '
      f'moved)')


# ============================================================================ loop steps
def sft_batch(loop: Loop, key) -> tuple[UpdateBatch, dict]:
  """A supervised batch: the dataset's responses, or responses sampled by the teachers
  (sequence-level KD; their sampling FLOPs are counted). With one teacher it samples every
  row; with several, each row is sampled by the first teacher that handles its tag."""
  c, r, d = loop.config, loop.run, loop.data
  local = loop.local(d.prompts.next_batch(c.sft.batch_size))
  if c.sft.source == 'teacher' and len(r.teachers) > 1:
    return routed_teacher_sft_batch(loop, local, key), {}
  if c.sft.source == 'teacher':
    out = r.teacher_sampler(r.teachers[0].params, d.encoder.encode_batch(local),
                            jax.random.fold_in(key, 0), r.teacher_sp)
    loop.flops.add('teacher_sampling', _rollout_flops(r.teachers[0].cfg, out))
    tokens, attn, lmask, _ = rollout_arrays(out)
    batch = jax.device_put(UpdateBatch(tokens, attn, lmask), shd.batch_sharding(r.mesh))
    return batch, {}
  arrays = steps.sft_batch(d.encoder, d.tokenizer, local, response_field=c.sft.response_field,
                           eos_id=d.tokenizer.eos_token_id,
                           prompt_buckets=DEFAULT_PROMPT_BUCKETS,
                           response_buckets=DEFAULT_PROMPT_BUCKETS)
  shard = shd.shard_local_batch if jax.process_count() > 1 else shd.shard_batch
  return UpdateBatch(**shard(arrays, r.mesh)), {}


def routed_teacher_sft_batch(loop: Loop, local, key) -> UpdateBatch:
  """SFT rows sampled by several teachers: the rows whose tag teacher j handles first
  (config.teachers order) are one sub-batch of teacher j, so every row is sampled once and
  each teacher's FLOPs are its own rows'. One process only (the sub-batch sizes differ
  between processes)."""
  r, d = loop.run, loop.data
  if jax.process_count() > 1:
    raise NotImplementedError('SFT on the samples of several teachers runs on one process; '
                              'use one teacher (config.teachers) or a single host')
  tags = [x.tag for x in local]
  route = route_matrix(tags, r.specs)
  owner = np.argmax(route > 0, axis=1)
  for i in np.flatnonzero(route.sum(1) == 0):
    raise ValueError(f'SFT on teacher samples: no teacher in config.teachers handles tag '
                     f'{tags[i]!r} (record {local[i].id!r})')
  prompts = d.encoder.encode_batch(local)
  parts = {}
  for j, t in enumerate(r.teachers):
    rows = np.flatnonzero(owner == j)
    if not len(rows):
      continue
    out = r.teacher_samplers[j](t.params, [prompts[i] for i in rows],
                                jax.random.fold_in(key, j), r.teacher_sp)
    loop.flops.add('teacher_sampling', _rollout_flops(t.cfg, out))
    parts[j] = (rows, out.host_rows(out.prompt_ids), out.host_rows(out.prompt_mask),
                out.host_rows(out.tokens), out.host_rows(out.mask))
  p_len = max(p[1].shape[1] for p in parts.values())
  n_new = max(p[3].shape[1] for p in parts.values())
  b = len(local)
  pad = int(r.pad_id)
  p_ids = np.full((b, p_len), pad, np.int32)
  p_mask = np.zeros((b, p_len), np.int32)
  r_ids = np.full((b, n_new), pad, np.int32)
  r_mask = np.zeros((b, n_new), np.int32)
  for rows, pi, pm, ri, rm in parts.values():  # prompts stay left-padded
    p_ids[rows, p_len - pi.shape[1]:] = pi
    p_mask[rows, p_len - pm.shape[1]:] = pm
    r_ids[rows, :ri.shape[1]] = ri
    r_mask[rows, :rm.shape[1]] = rm
  arrays = {'tokens': np.concatenate([p_ids, r_ids], 1),
            'attention_mask': np.concatenate([p_mask, r_mask], 1),
            'loss_mask': np.concatenate([np.zeros_like(p_mask), r_mask], 1)}
  return UpdateBatch(**shd.shard_batch(arrays, r.mesh))


def opd_batch(loop: Loop, state, key) -> tuple[UpdateBatch, dict]:
  """Prompts -> the student's rollout -> routed teacher (and reference) scoring -> rewards
  -> per-token advantages (docs/design.md §2), one after another: `sample_batch`,
  `submit_scoring`, `finish_batch` (the pipelined loop runs the same three apart, §11)."""
  sampled = sample_batch(loop, state['params'], key)
  return finish_batch(loop, sampled, submit_scoring(loop, sampled))


@dataclasses.dataclass
class Sampled:
  """A sampled batch waiting to be scored and trained on."""
  records: list                         # the global batch's records (n_samples adjacent)
  local: list                           # this process's rows
  rollout: Any                          # rollout.engine.RolloutBatch
  t_rollout: float                      # seconds the rollout took


@dataclasses.dataclass
class Scoring:
  """The teachers' (and reference's) scoring of a Sampled batch, submitted."""
  route: np.ndarray                     # [B, J]
  pending: Any                          # teachers.local.PendingTeachers
  ref: Any                              # reference logprobs [B, T] (dispatched) or None
  host_attn: np.ndarray | None
  t_submit: float


def sample_batch(loop: Loop, params, key) -> Sampled:
  """The next prompts and the student's rollout of them with `params` (its trainable
  parameters; the engine gets them cast)."""
  c, d = loop.config, loop.data
  n = int(c.rollout.n_samples)
  records = [x for x in d.prompts.next_batch(c.rollout.prompts_per_step) for _ in range(n)]
  local = loop.local(records)  # a prompt's n samples are adjacent rows
  t0 = time.time()
  rollout = loop.engine(loop.cast(params), local, jax.random.fold_in(key, 0))
  return Sampled(records, local, rollout, time.time() - t0)


def submit_scoring(loop: Loop, sampled: Sampled) -> Scoring:
  """Dispatches every routed teacher's scoring (and the reference's) of the batch without
  waiting for it: in-process teachers' device work is queued, remote requests are in
  flight. Nothing here reads a score back to the host, except a cross-tokenizer teacher's
  (its rows are re-tokenized on the host; it blocks, docs/design.md §12)."""
  r, ro = loop.run, sampled.rollout
  t0 = time.time()
  route = route_matrix([x.tag for x in sampled.records], r.specs)
  tokens, attn = ro.tokens, ro.attention_mask
  host_attn = np.asarray(attn) if jax.process_count() == 1 else None
  pending = submit_teachers(r.teachers, tokens, attn, route, out_sharding=tokens.sharding,
                            count=False, context=ScoreContext(sampled.records,
                                                              ro.loss_mask))
  ref = None
  if r.reference is not None:
    ref = r.reference.score(tokens, attn, np.arange(tokens.shape[0]),
                            out_sharding=tokens.sharding)['logprobs']
  return Scoring(route, pending, ref, host_attn, t0)


def finish_batch(loop: Loop, sampled: Sampled, scoring: Scoring) -> tuple[UpdateBatch, dict]:
  """Waits for the batch's scores, then rewards and per-token advantages: the UpdateBatch
  and the batch's metrics. The rollout's FLOPs and the teachers' token counts are added
  here, when the batch is used, so a batch dropped at a stop is not counted."""
  c, r = loop.config, loop.run
  records, local, rollout = sampled.records, sampled.local, sampled.rollout
  tags = [x.tag for x in records]
  n = int(c.rollout.n_samples)
  tokens, attn, lmask, s_b = (rollout.tokens, rollout.attention_mask, rollout.loss_mask,
                              rollout.behaviour_logprobs)
  metrics: dict[str, float] = dict(rollout.metrics)
  # the cast parameters' relayout onto the rollout layout, per device (docs/design.md §5)
  metrics['rollout/reshard_bytes'] = float(r.rollout_reshard_bytes)
  gen_tokens = float(jnp.sum(lmask))
  loop.flops.add('rollout', rollout.flops)
  # ----------------------------------------------------------------- teacher scoring
  t0 = time.time()
  route = scoring.route
  t_JxBxT, extras = scoring.pending.result()
  ref = scoring.ref
  jax.block_until_ready(t_JxBxT)
  t_wait = time.time() - t0
  t_scoring = time.time() - scoring.t_submit
  scored = scoring.pending.count_scored(attn, route, host_mask_BxT=scoring.host_attn)
  _count_scoring_flops(loop, route, shd.to_host(jnp.sum(attn, axis=-1)), scoring.pending)
  # ------------------------------------------------------------------------ rewards
  outcome = None
  if c.rl.estimator:
    outcome, rew = _outcome_advantages(loop, rollout, local, n)
    metrics['reward/mean'] = float(rew.mean())
    metrics['reward/groups_with_signal'] = adv_lib.groups_with_signal(rew, n)
    for tg in sorted(set(tags)):
      metrics[f'reward/mean/{tg}'] = float(rew[np.asarray(tags) == tg].mean())
  # --------------------------------------------------------------------- advantages
  adv, kl_sum, kl_cnt = token_adv.advantages(
      s_b, t_JxBxT, ref, r.coef_J, jnp.asarray(route), lmask, outcome, mode=r.adv_mode,
      clamp=c.loss.kl_clamp, reward_scale=c.gopd.reward_scale,
      constant=c.rl.constant_advantage)
  batch = UpdateBatch(tokens, attn, lmask, behaviour_logprobs=s_b, advantages=adv)
  if c.loss.full_vocab:
    batch = dataclasses.replace(batch, **full_vocab_fields(
        r, extras[r.teachers[0].name], route[:, 0], tokens.shape))
  names = [t.name for t in r.teachers]
  metrics.update(steps.kl_metrics(shd.to_host(kl_sum), shd.to_host(kl_cnt), tags, names))
  if r.teachers:
    k3 = token_adv.k3_sum(s_b, t_JxBxT, jnp.asarray(route), lmask)
    metrics.update(steps.kl_metrics(shd.to_host(k3), shd.to_host(kl_cnt), tags, names,
                                    prefix='opd/reverse_kl_k3'))
    metrics['perf/tokens_per_s/scoring'] = scored / max(t_scoring, 1e-9)
  metrics['rollout/response_len'] = gen_tokens / len(records)
  metrics['perf/tokens_per_s/rollout'] = gen_tokens / max(sampled.t_rollout, 1e-9)
  metrics['perf/rollout_s'], metrics['perf/scoring_s'] = sampled.t_rollout, t_scoring
  metrics['perf/scoring_wait_s'] = t_wait  # blocked on the scores (all of it when synchronous)
  return batch, metrics


def full_vocab_fields(r, ex, route_B, shape) -> dict:
  """The UpdateBatch fields of the `loss.full_vocab` term: the teacher's hidden states
  (exact / student-top-k options) or top-k, and `teacher_rows`, its route. A batch with no
  routed row (`ex` None: the teacher scored nothing) gets zeros of the same shapes, which
  the update selects away on every row."""
  b, t = shape
  rows_sh = shd.batch_sharding(r.mesh, 1)
  out = {'teacher_rows': jax.make_array_from_callback(
      (b,), rows_sh, lambda idx: np.asarray(route_B > 0, np.float32)[idx])}
  if r.teacher_unembed is not None:  # exact / student-top-k options
    w = r.teacher_unembed
    hidden = ex['hidden'] if ex is not None else _zeros(
        (b, t, w.shape[1]), w.dtype, shd.batch_sharding(r.mesh, 3))
    out.update(teacher_hidden=hidden, teacher_unembed=w)
  elif ex is not None:
    out.update(teacher_top_ids=ex['top_ids'], teacher_top_logprobs=ex['top_logprobs'])
  else:
    k, sh = int(r.config.loss.full_vocab_top_k), shd.batch_sharding(r.mesh, 3)
    out.update(teacher_top_ids=_zeros((b, t, k), jnp.int32, sh),
               teacher_top_logprobs=_zeros((b, t, k), jnp.float32, sh))
  return out


def _zeros(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def apply_update(loop: Loop, state, batch: UpdateBatch, step: int):
  """batch.mini_batches optimizer steps on the batch; stops on a non-finite loss."""
  r = loop.run
  mini = int(loop.config.batch.mini_batches)
  t0 = time.time()
  rows = batch.tokens.shape[0]
  for i in range(mini):
    part = batch.rows(i * rows // mini, (i + 1) * rows // mini)
    state, upd = r.update_fn(state, part)
    if i == 0 and 'is/sampler_logprob_gap' in upd:  # only the first update is on-policy
      gap = upd['is/sampler_logprob_gap']
  if mini > 1 and 'is/sampler_logprob_gap' in upd:
    upd = dict(upd, **{'is/sampler_logprob_gap': gap})
  loss, grad_norm = float(upd['loss']), float(upd['grad_norm'])
  t_update = time.time() - t0
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    loop.ckpt.wait()
    raise FloatingPointError(
        f'non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; stopping. '
        f'The last good checkpoint is step {loop.ckpt.latest_step()} in {loop.ckpt.directory}')
  metrics = {k: float(v) for k, v in upd.items()}
  seq_lens = shd.to_host(jnp.sum(batch.attention_mask, -1))
  metrics['perf/tokens_per_s/update'] = float(seq_lens.sum()) / t_update
  loop.flops.add('update', compute.update_flops(r.student_cfg, seq_lens,
                                                remat=bool(loop.config.student.remat)))
  if r.teacher_unembed is not None:  # the exact / student-top-k pass over the vocabulary
    loop.flops.add('update', compute.streamed_loss_flops(
        r.student_cfg, r.teachers[0].cfg, seq_lens, loop.config.loss.full_vocab,
        truncated=bool(r.loss.top_k) or r.loss.top_p < 1.0))
  metrics.update(loop.flops.metrics())
  return state, metrics


def end_step(loop: Loop, state, step: int, metrics: dict, result: dict, preempt) -> bool:
  """Periodic eval, logging, checkpoint (with the final eval on the last step); True when
  the run stops here (preemption)."""
  c, total = loop.config, int(loop.config.total_steps)
  if c.eval_every and step % c.eval_every == 0 and step != total:
    metrics.update(loop.evaluate(step, state['params']))
  if step % c.log_every == 0 or step == total:
    loop.writer.scalars(step, metrics)
    loop.writer.progress(step, metrics)
  stop_here = (preempt.is_set() or c.debug.stop_at_step == step
               or loop.ckpt.reached_preemption(step))
  if loop.ckpt.should_save(step) or stop_here or step == total:
    if step == total and not stop_here and loop.data.eval_records:
      result['final'] = loop.evaluate(total, state['params'])  # saved with the run
      loop.writer.scalars(total, result['final'])
      loop.writer.progress(total, result['final'], prefix='eval ')
    loop.save(step, state, result, force=stop_here or step == total)
  if stop_here:
    loop.ckpt.wait()
    log.warning('stopped at step %d after saving a checkpoint (preemption)', step)
    result['preempted'] = True
  return stop_here


def finish(loop: Loop, state, result: dict, start_step: int, meta: dict, workdir: str):
  """The export after the last step; a run that had finished already reports the results
  saved with it (re-evaluated when it has none)."""
  c, r = loop.config, loop.run
  if start_step >= int(c.total_steps):
    log.info('%s finished at step %d already; reporting its saved results', workdir, start_step)
    result['final'] = meta.get('final')
    if result['final'] is None and loop.data.eval_records:
      result['final'] = loop.evaluate(start_step, state['params'])
    if result['final']:
      loop.writer.progress(start_step, result['final'], prefix='eval ')
    for t in r.teachers:
      t.tokens_scored = meta.get('tokens_scored', {}).get(t.name, t.tokens_scored)
  elif not result['preempted'] and c.export.hf_dir:
    out = os.path.join(workdir, c.export.hf_dir)
    save_pretrained(nnx.merge(r.graphdef, r.model_params(state['params'])), out,
                    dtype=c.export.dtype or None)  # LoRA: the merged weights
    if jax.process_index() == 0:
      loop.data.tokenizer.save_pretrained(out)
    log.info('exported the student to %s', out)
    if r.lora is not None:  # and the adapters alone, in PEFT's format
      adapter = os.path.join(out, LORA_ADAPTER_DIR)
      lora_lib.save_peft_adapter(r.lora, state['params'], adapter,
                                 base_model=tiny.resolve_model(c.student.model),
                                 num_layers=r.student_cfg.num_layers)
      log.info('exported the LoRA adapter (PEFT format) to %s', adapter)
  loop.ckpt.close()
  loop.writer.close()
  result['history'] = loop.writer.history
  result['tokens_scored'] = {t.name: t.tokens_scored for t in r.teachers}
  return result


# ============================================================================== helpers
def _rollout_flops(cfg, rollout) -> int:
  """Analytic FLOPs of a rollout's real rows (prefill + one decode step per token)."""
  return compute.rollout_flops(cfg, *rollout_token_counts(rollout))


def _count_scoring_flops(loop: Loop, route_BxJ, seq_lens_B, pending=None) -> None:
  """Each teacher's scoring FLOPs on its routed rows: a cross-tokenizer teacher's own token
  counts (from `pending`, the batch's PendingTeachers), else the student's `seq_lens_B`."""
  r = loop.run
  for j, t in enumerate(r.teachers):
    if t.cfg is not None and route_BxJ[:, j].any():
      lens = pending.seq_lens(t.name, seq_lens_B) if pending is not None else seq_lens_B
      loop.flops.add(f'scoring/{t.name}', compute.score_flops(t.cfg, lens[route_BxJ[:, j] > 0]))
  if r.reference is not None:
    loop.flops.add('reference', compute.score_flops(r.reference.cfg, seq_lens_B))


def _outcome_advantages(loop: Loop, rollout, local_records, n: int):
  """(outcome advantage [B] on device, rewards [B] on the host) of a RolloutBatch: the
  environment's reward on rows that have one, the tag's verifiable reward (config.rl) of
  the final response on the others."""
  c = loop.config
  rew = np.asarray(rollout.env_rewards, np.float32).copy()
  other = np.flatnonzero(np.isnan(rew))
  if len(other):
    texts = rollout.texts
    rew[other] = rewards_lib.compute_rewards(
        [texts[i] for i in other], [evaluation.record_dict(local_records[i]) for i in other],
        dict(c.rl.tag_to_reward), default=c.rl.default_reward)
  rew = shd.allgather_rows(rew)
  kw = {'normalize_std': c.rl.normalize_std} if c.rl.estimator == 'grpo' else {}
  return jnp.asarray(adv_lib.outcome_advantage(c.rl.estimator, rew, n, **kw), jnp.float32), rew


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'recipe: configs/NAME.py[:arg]', lock_config=True)
  flags.DEFINE_string('workdir', None, 'output directory (checkpoints, TensorBoard, export)')
  flags.mark_flags_as_required(['config', 'workdir'])

  def _main(argv):
    del argv
    run(config_flag.value, flags.FLAGS.workdir)
  app.run(_main, argv=argv)


if __name__ == '__main__':
  main()
