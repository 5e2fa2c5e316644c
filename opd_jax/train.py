"""The opd_jax trainer: on-policy distillation, mixed RL + OPD, G-OPD, RL and SFT, one loop.

  python -m opd_jax.train --config configs/opd_single_teacher.py:runlocal --workdir /tmp/run \
      [--config.total_steps=20 --config.optim.lr=1e-5 ...]

`run()` reads top to bottom: setup -> mesh -> data -> models -> jitted steps -> checkpoint
restore -> loop (prompts -> rollout -> teacher scoring -> advantages -> update -> metrics)
-> periodic eval -> export. Experiments change configs, never this file.
"""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import advantages as adv_lib
from opd_jax import data as data_lib
from opd_jax import compute, evaluation, steps, tiny
from opd_jax import rewards as rewards_lib
from opd_jax import sharding as shd
from opd_jax.checkpoint import Checkpointer, PreemptionFlag
from opd_jax.metrics import MetricWriter
from opd_jax.models import load_pretrained, save_pretrained
from opd_jax.sampling import DEFAULT_PROMPT_BUCKETS, Sampler, SamplingParams
from opd_jax.teachers import LocalTeacher, TeacherSpec, route_matrix, score_teachers
from opd_jax.update import LossSpec, make_optimizer, make_train_state, make_update_fn

log = logging.getLogger('opd_jax.train')


class ConfigError(ValueError):
  """A config that cannot run; the message names the field."""


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


def validate(config) -> None:
  """Cross-field checks that would otherwise fail deep inside the loop."""
  if not config.student.model:
    raise ConfigError('config.student.model: set the student checkpoint directory')
  if config.mode not in ('opd', 'sft'):
    raise ConfigError(f"config.mode={config.mode!r}; expected 'opd' or 'sft'")
  has_reward = bool(config.rl.tag_to_reward) or bool(config.rl.default_reward)
  if config.mode == 'opd' and not config.teachers and not config.rl.estimator:
    raise ConfigError('config.mode=opd needs a teacher (config.teachers) or an outcome-reward '
                      'estimator (config.rl.estimator)')
  if config.rl.estimator:
    if config.rl.estimator not in adv_lib.ESTIMATORS:
      raise ConfigError(f'config.rl.estimator={config.rl.estimator!r}; known: '
                        f'{", ".join(adv_lib.ESTIMATORS)}')
    if not has_reward:
      raise ConfigError('config.rl.estimator needs rewards: set config.rl.tag_to_reward or '
                        'config.rl.default_reward')
  if config.gopd.enabled and not config.teachers:
    raise ConfigError('config.gopd.enabled needs at least one teacher')
  if config.loss.full_vocab and len(config.teachers) != 1:
    raise ConfigError('config.loss.full_vocab (top-k distillation) needs exactly one teacher')
  if not config.data.train:
    raise ConfigError('config.data.train: no training files')
  ro = config.rollout
  if not ro.temperature > 0:
    raise ConfigError(f'config.rollout.temperature={ro.temperature}: must be > 0. Rollouts '
                      'are the policy being trained, and greedy decoding (0) is a point mass '
                      'with no defined policy gradient (evaluation is greedy on its own)')
  if ro.top_k < 0 or not 0.0 < ro.top_p <= 1.0:
    raise ConfigError(f'config.rollout.top_k={ro.top_k} / top_p={ro.top_p}: top_k must be >= 0 '
                      '(0 = off) and top_p in (0, 1] (1 = off)')
  if config.loss.kl_estimator != 'k1':
    raise ConfigError(
        f'config.loss.kl_estimator={config.loss.kl_estimator!r}: only k1 (s_b - t) is offered '
        'as the OPD advantage. k3 is an unbiased estimate of the KL value, but as a reward '
        'its policy gradient is that of KL(pi||q) - KL(q||pi), not of the reverse KL; '
        'runs report it as the metric opd/reverse_kl_k3')
  if config.loss.full_vocab and config.loss.full_vocab_top_k < 1:
    raise ConfigError(f'config.loss.full_vocab_top_k={config.loss.full_vocab_top_k}: the top-k '
                      f'distillation term needs k >= 1')


def check_model_paths(config) -> None:
  """Every checkpoint the run loads exists, checked before any weights load (the AOT check
  does not call this: it compiles from architecture presets when a path is absent)."""
  _check_model_path('config.student.model', config.student.model)
  for name, t in config.teachers.items():
    if not t.get('remote_url'):
      _check_model_path(f'config.teachers.{name}.model', t.get('model'))
  if config.gopd.enabled and config.gopd.reference != 'student_init':
    _check_model_path('config.gopd.reference', config.gopd.reference)


def _check_model_path(field: str, path) -> None:
  """A checkpoint path must be a 'tiny:' spec or an existing directory (no hub downloads)."""
  if not path:
    raise ConfigError(f'{field}: set a checkpoint directory')
  path = str(path)
  if path.startswith('tiny:'):
    return
  if not os.path.isdir(path):
    raise ConfigError(f'{field}={path!r}: no such checkpoint directory (expected a Hugging '
                      'Face checkpoint folder with config.json and *.safetensors)')


def loss_spec(config) -> LossSpec:
  """The update's static loss settings from a config (shared with opd_jax.aot)."""
  pg = config.mode != 'sft'
  return LossSpec(kind='pg' if pg else 'nll',
                  temperature=config.rollout.temperature, clip_eps=config.loss.clip_eps,
                  top_k=int(config.rollout.top_k) if pg else 0,
                  top_p=float(config.rollout.top_p) if pg else 1.0,
                  clip_eps_high=config.loss.clip_eps_high, ratio_level=config.loss.ratio_level,
                  aggregation=config.loss.aggregation, full_vocab=config.loss.full_vocab,
                  full_vocab_coef=config.loss.full_vocab_coef, jsd_beta=config.loss.jsd_beta,
                  chunk_size=config.loss.chunk_size, remat=config.student.remat,
                  compute_dtype=config.student.compute_dtype)


def rollout_params(config, stop_ids) -> SamplingParams:
  return SamplingParams(max_new_tokens=config.rollout.max_new_tokens,
                        temperature=config.rollout.temperature, top_k=config.rollout.top_k,
                        top_p=config.rollout.top_p, stop_ids=tuple(stop_ids))


def run(config, workdir: str) -> dict:
  """Trains as `config` says; returns {'history', 'final', 'preempted', 'step'}."""
  # ============================================================================ setup
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
  for noisy in ('absl', 'orbax', 'jax._src'):  # orbax logs every file it renames at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  init_distributed(config)
  validate(config)
  check_model_paths(config)
  os.makedirs(workdir, exist_ok=True)
  pidx, pcount = jax.process_index(), jax.process_count()
  total_steps = int(config.total_steps)
  base_key = jax.random.key(config.seed)

  # ============================================================================= mesh
  mesh = shd.make_mesh(dict(config.mesh))
  log.info('mesh %s over %d devices, %d processes', dict(mesh.shape), mesh.size, pcount)

  # ============================================================================= data
  import transformers
  student_path = tiny.resolve_model(config.student.model)
  tokenizer = transformers.AutoTokenizer.from_pretrained(student_path)
  encoder = data_lib.PromptEncoder(
      tokenizer, template=config.data.template, tag_to_template=dict(config.data.tag_to_template),
      max_prompt_len=config.data.max_prompt_len, on_too_long=config.data.on_too_long)
  domains = data_lib.load_domains(dict(config.data.train), default_tag=config.data.default_tag)
  domains = {d: encoder.drop_too_long(recs) for d, recs in domains.items()}
  if encoder.skipped:
    log.warning('skipped prompts over max_prompt_len, by tag: %s', dict(encoder.skipped))
  prompt_sampler = data_lib.PromptSampler(domains, interleave=dict(config.data.interleave) or None,
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
  eval_tags = sorted({r.tag for r in eval_records})
  tag_to_reward = dict(config.rl.tag_to_reward)
  train_tags = sorted({r.tag for recs in domains.values() for r in recs})

  # =========================================================================== models
  student = load_pretrained(student_path, mesh=mesh, rules=config.student.sharding)
  graphdef, params = nnx.split(student)
  specs = [TeacherSpec.from_config(n, t) for n, t in config.teachers.items()]
  top_k = int(config.loss.full_vocab_top_k) if config.loss.full_vocab else 0
  teachers = []
  for spec in specs:
    if spec.remote_url:
      from opd_jax.remote import RemoteTeacher
      teachers.append(RemoteTeacher(spec, student_tokenizer=tokenizer, mesh=mesh, top_k=top_k,
                                    temperature=config.rollout.temperature))
      continue
    spec.model = tiny.resolve_model(spec.model)
    data_lib.check_tokenizers_match(tokenizer, transformers.AutoTokenizer.from_pretrained(
        spec.model), teacher_name=f'teacher {spec.name!r} ({spec.model})')
    teachers.append(LocalTeacher(spec, student_mesh=mesh, top_k=top_k,
                                 temperature=config.rollout.temperature,
                                 micro_batches=int(config.batch.micro_batches)))
  use_opd = config.mode == 'opd' and bool(teachers) and config.rl.use_opd
  if config.mode == 'opd':
    for tag in train_tags:
      if not any(s.handles(tag) for s in specs) and tag not in tag_to_reward \
          and not config.rl.default_reward:
        raise ConfigError(f'training records with tag {tag!r} get no signal: no teacher in '
                          f'config.teachers handles it and config.rl has no reward for it')
  reference = None
  if config.gopd.enabled:
    ref = config.gopd.reference
    ref_path = student_path if ref == 'student_init' else tiny.resolve_model(ref)
    reference = LocalTeacher(TeacherSpec(name='reference', model=ref_path,
                                         sharding=config.student.sharding),
                             student_mesh=mesh, temperature=config.rollout.temperature,
                             micro_batches=int(config.batch.micro_batches))
  stop_ids = {i for i in np.atleast_1d(student.hf_config.get('eos_token_id') or []) if i is not None}
  if tokenizer.eos_token_id is not None:
    stop_ids.add(tokenizer.eos_token_id)
  for tok in config.rollout.stop_tokens:
    tid = tokenizer.convert_tokens_to_ids(tok)
    if tid is None or tid == tokenizer.unk_token_id:
      raise ConfigError(f'config.rollout.stop_tokens: {tok!r} is not a token of the tokenizer')
    stop_ids.add(tid)
  stop_ids = tuple(sorted(int(i) for i in stop_ids))

  # ===================================================================== jitted steps
  pad_id = tokenizer.pad_token_id or 0
  # The rollout runs on parameters cast to the compute dtype; its KV cache takes that dtype.
  sampler = Sampler(graphdef, mesh=mesh, pad_id=pad_id,
                    cache_dtype=jnp.dtype(config.student.compute_dtype))
  rollout_sp = rollout_params(config, stop_ids)
  if config.mode == 'sft' and config.sft.source == 'teacher':
    if not teachers or not isinstance(teachers[0], LocalTeacher):
      raise ConfigError("config.sft.source='teacher' needs an in-process teacher")
    teacher_sampler = Sampler(teachers[0].graphdef, mesh=teachers[0].mesh, pad_id=pad_id)
    teacher_sp = SamplingParams(max_new_tokens=config.rollout.max_new_tokens,
                                temperature=config.sft.temperature, stop_ids=stop_ids)
  elif config.mode == 'sft' and config.sft.source != 'dataset':
    raise ConfigError(f"config.sft.source={config.sft.source!r}; expected 'dataset' or 'teacher'")
  mini = int(config.batch.mini_batches)
  tx, schedule = make_optimizer(config.optim, total_steps * mini)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  state_shardings = shd.match_shardings(
      jax.eval_shape(lambda p: make_train_state(p, tx), params), params, mesh)
  update_fn = make_update_fn(graphdef, tx, schedule, loss_spec(config),
                             micro_batches=config.batch.micro_batches,
                             state_shardings=state_shardings)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p: make_train_state(p, tx), out_shardings=state_shardings)(params)
  student_cfg = student.cfg
  del params, student
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(config.student.compute_dtype), p),
                 out_shardings=param_shardings)
  coef_J = jnp.asarray([s.kl_coef for s in specs], jnp.float32)
  adv_mode = ('gopd' if config.gopd.enabled else 'opd') if use_opd else 'none'

  def teacher_kl(tokens, attn, lmask, s_b, tags):
    route = route_matrix(tags, specs)
    t, _ = score_teachers(teachers, tokens, attn, route, out_sharding=tokens.sharding,
                          count=False)
    _, kl_sum, kl_cnt = steps.advantages(s_b, t, None, coef_J, jnp.asarray(route), lmask,
                                         None, mode='none')
    return shd.to_host(kl_sum), shd.to_host(kl_cnt)

  eval_settings = evaluation.EvalSettings(
      batch_size=config.eval.batch_size, stop_ids=stop_ids,
      max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
      temperature=config.rollout.temperature, pass_k_temperature=config.eval.temperature,
      pass_k=tuple(config.eval.pass_k),
      reverse_kl=config.eval.reverse_kl, num_text_samples=config.eval.num_text_samples)

  def run_eval(step, params):
    local = data_lib.host_slice(eval_records, pidx, pcount) if pcount > 1 else eval_records
    return evaluation.evaluate(
        step=step, key=jax.random.fold_in(base_key, 2**31 - 1), student_params=cast(params),
        sampler=sampler, encoder=encoder, tokenizer=tokenizer, records=local,
        settings=eval_settings, tag_to_reward=tag_to_reward,
        default_reward=config.rl.default_reward, teachers=teachers, kl_fn=teacher_kl,
        writer=writer, tag_vocab=eval_tags)

  # =============================================================== checkpoint restore
  ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save)
  start_step, meta = 0, {}
  if ckpt.latest_step() is not None:
    start_step = int(ckpt.latest_step())
    state, meta = ckpt.restore(start_step, state)
    prompt_sampler.restore(meta['data'])
    log.info('resumed from %s at step %d', ckpt.directory, start_step)
  writer = MetricWriter(workdir, total_steps, start_step=start_step)
  flops = compute.FlopCounter(meta.get('flops'))  # analytic, from real token counts
  for t in teachers:
    if not hasattr(t, 'cfg'):
      log.warning('teacher %r is remote: its scoring FLOPs are not counted (its architecture '
                  'is not known here)', t.name)
  if start_step:  # the curves so far travel with the checkpoint
    writer.history = {k: [tuple(x) for x in v] for k, v in meta.get('history', {}).items()}
  if config.eval_at_start and start_step == 0 and eval_records:
    m = run_eval(0, state['params'])
    writer.scalars(0, m)
    writer.progress(0, m, prefix='eval ')

  # ============================================================================= loop
  n = int(config.rollout.n_samples)
  batch_rows = (config.sft.batch_size if config.mode == 'sft'
                else config.rollout.prompts_per_step * n)
  if batch_rows % (mini * config.batch.micro_batches * shd.batch_size_multiple(mesh)):
    raise ConfigError(f'the batch of {batch_rows} rows is not divisible by batch.mini_batches '
                      f'x batch.micro_batches x the data-parallel extent ({mini} x '
                      f'{config.batch.micro_batches} x {shd.batch_size_multiple(mesh)})')
  result = {'preempted': False, 'step': start_step}
  with PreemptionFlag() as preempt:
    for step in range(start_step + 1, total_steps + 1):
      key = jax.random.fold_in(base_key, step)
      t_step = time.time()
      metrics: dict[str, float] = {}
      if config.mode == 'sft':
        # ------------------------------------------------------- SFT: dataset responses
        records = prompt_sampler.next_batch(config.sft.batch_size)
        local = data_lib.host_slice(records, pidx, pcount)
        if config.sft.source == 'teacher':  # sequence-level KD: the teacher writes responses
          out = teacher_sampler(teachers[0].params, encoder.encode_batch(local),
                                jax.random.fold_in(key, 0), teacher_sp)
          flops.add('teacher_sampling', _rollout_flops(teachers[0].cfg, out))
          tokens, attn, lmask, _ = steps.rollout_arrays(out)
          batch = jax.device_put({'tokens': tokens, 'attention_mask': attn, 'loss_mask': lmask},
                                 shd.batch_sharding(mesh))
        else:
          arrays = steps.sft_batch(encoder, tokenizer, local,
                                   response_field=config.sft.response_field,
                                   eos_id=tokenizer.eos_token_id,
                                   prompt_buckets=DEFAULT_PROMPT_BUCKETS,
                                   response_buckets=DEFAULT_PROMPT_BUCKETS)
          batch = (shd.shard_local_batch(arrays, mesh) if pcount > 1
                   else shd.shard_batch(arrays, mesh))
      else:
        # ---------------------------------------------------------------- prompts
        records = prompt_sampler.next_batch(config.rollout.prompts_per_step)
        records = [r for r in records for _ in range(n)]  # a prompt's samples are adjacent
        local = data_lib.host_slice(records, pidx, pcount)
        prompts = encoder.encode_batch(local)
        tags = [r.tag for r in records]
        # ---------------------------------------------------------------- rollout
        t0 = time.time()
        rollout = sampler(cast(state['params']), prompts, jax.random.fold_in(key, 0), rollout_sp)
        tokens, attn, lmask, s_b = steps.rollout_arrays(rollout)
        jax.block_until_ready(s_b)
        t_rollout = time.time() - t0
        gen_tokens = float(jnp.sum(rollout.mask))
        flops.add('rollout', _rollout_flops(student_cfg, rollout))
        # ---------------------------------------------------------- teacher scoring
        t0 = time.time()
        route = route_matrix(tags, specs)
        host_attn = np.asarray(attn) if pcount == 1 else None
        scored_before = sum(t.tokens_scored for t in teachers)
        t_JxBxL, extras = score_teachers(teachers, tokens, attn, route, host_mask_BxL=host_attn,
                                         out_sharding=tokens.sharding)
        r = None
        if reference is not None:
          r = reference.score(tokens, attn, np.arange(tokens.shape[0]),
                              out_sharding=tokens.sharding)['logprobs']
        jax.block_until_ready(t_JxBxL)
        t_scoring = time.time() - t0
        scored = sum(t.tokens_scored for t in teachers) - scored_before
        seq_lens = shd.to_host(jnp.sum(attn, axis=-1))
        for j, t in enumerate(teachers):
          if hasattr(t, 'cfg') and route[:, j].any():
            flops.add(f'scoring/{t.name}', compute.score_flops(t.cfg, seq_lens[route[:, j] > 0]))
        if reference is not None:
          flops.add('reference', compute.score_flops(reference.cfg, seq_lens))
        # ---------------------------------------------------------------- rewards
        outcome = None
        if config.rl.estimator:
          texts = evaluation.decode_responses(tokenizer, rollout.host_rows(rollout.tokens),
                                              rollout.host_rows(rollout.mask))
          rew = rewards_lib.compute_rewards(
              texts, [evaluation.record_dict(x) for x in local], tag_to_reward,
              default=config.rl.default_reward)
          rew = evaluation.allgather_rows(np.asarray(rew, np.float32))
          kw = {'normalize_std': config.rl.normalize_std} if config.rl.estimator == 'grpo' else {}
          outcome = jnp.asarray(adv_lib.outcome_advantage(config.rl.estimator, rew, n, **kw),
                                jnp.float32)
          metrics['reward/mean'] = float(rew.mean())
          for tg in sorted(set(tags)):
            metrics[f'reward/mean/{tg}'] = float(rew[np.asarray(tags) == tg].mean())
        # ------------------------------------------------------------- advantages
        adv, kl_sum, kl_cnt = steps.advantages(
            s_b, t_JxBxL, r, coef_J, jnp.asarray(route), lmask, outcome, mode=adv_mode,
            clamp=config.loss.kl_clamp,
            reward_scale=config.gopd.reward_scale)
        batch = {'tokens': tokens, 'attention_mask': attn, 'loss_mask': lmask,
                 'behaviour_logprobs': s_b, 'advantages': adv}
        if config.loss.full_vocab:
          ex = extras[teachers[0].name]
          batch.update(teacher_top_ids=ex['top_ids'], teacher_top_logprobs=ex['top_logprobs'])
        metrics.update(steps.kl_metrics(shd.to_host(kl_sum), shd.to_host(kl_cnt), tags,
                                        [t.name for t in teachers]))
        if teachers:
          k3 = steps.k3_sum(s_b, t_JxBxL, jnp.asarray(route), lmask)
          metrics.update(steps.kl_metrics(shd.to_host(k3), shd.to_host(kl_cnt), tags,
                                          [t.name for t in teachers],
                                          prefix='opd/reverse_kl_k3'))
        metrics['rollout/response_len'] = gen_tokens / len(records)
        metrics['perf/tokens_per_s/rollout'] = gen_tokens / max(t_rollout, 1e-9)
        if teachers:
          metrics['perf/tokens_per_s/scoring'] = scored / max(t_scoring, 1e-9)
      # ------------------------------------------------------------------- update
      t0 = time.time()
      rows = batch['tokens'].shape[0]
      for i in range(mini):
        part = jax.tree.map(lambda x: x[i * rows // mini:(i + 1) * rows // mini], batch)
        state, upd = update_fn(state, part)
      loss = float(upd['loss'])
      t_update = time.time() - t0
      if not (math.isfinite(loss) and math.isfinite(float(upd['grad_norm']))):
        ckpt.wait()
        raise FloatingPointError(
            f'non-finite loss ({loss}) or gradient norm ({float(upd["grad_norm"])}) at step '
            f'{step}; stopping. The last good checkpoint is step {ckpt.latest_step()} in '
            f'{ckpt.directory}')
      metrics.update({k: float(v) for k, v in upd.items()})
      metrics['perf/tokens_per_s/update'] = float(jnp.sum(batch['attention_mask'])) / t_update
      flops.add('update', compute.update_flops(
          student_cfg, shd.to_host(jnp.sum(batch['attention_mask'], -1)),
          remat=bool(config.student.remat)))
      metrics.update(flops.metrics())
      metrics['perf/step_s'] = time.time() - t_step
      # ------------------------------------------------------------ metrics, eval
      if config.eval_every and step % config.eval_every == 0 and step != total_steps:
        metrics.update(run_eval(step, state['params']))
      if step % config.log_every == 0 or step == total_steps:
        writer.scalars(step, metrics)
        writer.progress(step, metrics)
      # ------------------------------------------------------ checkpoint, preempt
      stop_here = (preempt.is_set() or config.debug.stop_at_step == step
                   or ckpt.reached_preemption(step))
      if ckpt.should_save(step) or stop_here or step == total_steps:
        if step == total_steps and not stop_here and eval_records:
          result['final'] = run_eval(total_steps, state['params'])  # saved with the run
          writer.scalars(total_steps, result['final'])
          writer.progress(total_steps, result['final'], prefix='eval ')
        ckpt.save(step, state, {'data': prompt_sampler.state(), 'step': step,
                                'history': writer.history, 'final': result.get('final'),
                                'flops': flops.totals,
                                'tokens_scored': {t.name: t.tokens_scored for t in teachers}},
                  force=stop_here or step == total_steps)
      result['step'] = step
      if stop_here:
        ckpt.wait()
        log.warning('stopped at step %d after saving a checkpoint (preemption)', step)
        result['preempted'] = True
        break

  # ============================================================ final eval, export
  if start_step >= total_steps:
    # Already finished: report the results saved with the run (re-evaluated if it has none).
    log.info('%s finished at step %d already; reporting its saved results', workdir, start_step)
    result['final'] = meta.get('final')
    if result['final'] is None and eval_records:
      result['final'] = run_eval(start_step, state['params'])
    if result['final']:
      writer.progress(start_step, result['final'], prefix='eval ')
    for t in teachers:
      t.tokens_scored = meta.get('tokens_scored', {}).get(t.name, t.tokens_scored)
  elif not result['preempted']:
    if config.export.hf_dir:
      out = os.path.join(workdir, config.export.hf_dir)
      model = nnx.merge(graphdef, state['params'])
      save_pretrained(model, out, dtype=config.export.dtype or None)
      if pidx == 0:
        tokenizer.save_pretrained(out)
      log.info('exported the student to %s', out)
  ckpt.close()
  writer.close()
  result['history'] = writer.history
  result['tokens_scored'] = {t.name: t.tokens_scored for t in teachers}
  return result


def _rollout_flops(cfg, rollout) -> int:
  """Analytic FLOPs of a rollout's real rows (prefill + one decode step per token)."""
  prompt = shd.to_host(jnp.sum(rollout.prompt_mask, -1))
  response = shd.to_host(jnp.sum(rollout.mask, -1))
  real = response > 0  # rows padded up to a batch bucket sample nothing
  return compute.rollout_flops(cfg, prompt[real], response[real])


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
