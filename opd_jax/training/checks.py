"""Every check of a config that needs no weights, run before anything loads (the trainer, the
AOT check and check_teacher call them), plus the resume check of a workdir:

  validate(config[, mesh])         the fields, and the batch layout on the mesh
  check_model_paths(config)        checkpoint paths exist (no hub downloads)
  check_signal(config, tags)       every training tag gets a teacher or a reward
  check_resume(config, workdir)    writes workdir/config.json; refuses a resumed run whose
                                   objective or shapes changed (docs/design.md §4)

A failed check raises ConfigError with a message that names the field.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re

import jax

from opd_jax.objectives import estimators as adv_lib
from opd_jax.objectives import losses
from opd_jax import sharding as shd
from opd_jax.teachers.local import TeacherSpec
from opd_jax.training.specs import teacher_spec


class ConfigError(ValueError):
  """A config that cannot run; the message names the field."""


# ------------------------------------------------------------------------- config checks
def validate(config, mesh=None) -> None:
  """Cross-field checks that would otherwise fail deep inside the loop; with a mesh, also the
  batch layout. Needs no weights, no data and no tokenizer."""
  if not config.student.model:
    raise ConfigError('config.student.model: set the student checkpoint directory')
  if config.mode not in ('opd', 'sft'):
    raise ConfigError(f"config.mode={config.mode!r}; expected 'opd' or 'sft'")
  has_reward = bool(config.rl.tag_to_reward) or bool(config.rl.default_reward)
  const = config.rl.constant_advantage
  if (config.mode == 'opd' and not config.teachers and not config.rl.estimator
      and const is None):
    raise ConfigError('config.mode=opd needs a teacher (config.teachers), an outcome-reward '
                      'estimator (config.rl.estimator) or config.rl.constant_advantage')
  if const is not None:
    if config.mode != 'opd':
      raise ConfigError(f'config.rl.constant_advantage={const} applies to config.mode=opd '
                        f'(rollouts), not {config.mode!r}')
    if config.teachers and config.rl.use_opd:
      raise ConfigError(f'config.rl.constant_advantage={const} replaces the teachers\' KL '
                        'term: set config.rl.use_opd=False or remove config.teachers')
    if config.gopd.enabled:
      raise ConfigError(f'config.rl.constant_advantage={const} and config.gopd.enabled '
                        'both define the token advantage; enable one')
    if config.loss.full_vocab:
      raise ConfigError(f'config.rl.constant_advantage={const} is the no-teacher control; '
                        'config.loss.full_vocab needs a teacher')
  if config.rl.estimator:
    if config.rl.estimator not in adv_lib.ESTIMATORS:
      raise ConfigError(f'config.rl.estimator={config.rl.estimator!r}; known: '
                        f'{", ".join(adv_lib.ESTIMATORS)}')
    if not has_reward:
      raise ConfigError('config.rl.estimator needs rewards: set config.rl.tag_to_reward or '
                        'config.rl.default_reward')
  if config.gopd.enabled and not config.teachers:
    raise ConfigError('config.gopd.enabled needs at least one teacher')
  if config.loss.full_vocab and config.loss.full_vocab not in losses.FULL_VOCAB_OPTIONS:
    raise ConfigError(f'config.loss.full_vocab={config.loss.full_vocab!r}; known: '
                      f'{", ".join(losses.FULL_VOCAB_OPTIONS)}')
  if config.loss.full_vocab and len(config.teachers) != 1:
    raise ConfigError('config.loss.full_vocab (top-k distillation) needs exactly one teacher')
  if config.loss.vocab_chunk_size is not None and config.loss.vocab_chunk_size < 1:
    raise ConfigError(f'config.loss.vocab_chunk_size={config.loss.vocab_chunk_size}: must be '
                      '>= 1 (None: 8192)')
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
  if (config.mode == 'opd' and config.loss.full_vocab and (ro.top_k or ro.top_p < 1.0)
      and losses.refuses_truncation(config.loss.full_vocab, config.loss.jsd_beta)):
    raise ConfigError(
        f'config.loss.full_vocab={config.loss.full_vocab!r}'
        + (f' with config.loss.jsd_beta={config.loss.jsd_beta} (the forward KL)'
           if 'jsd' in config.loss.full_vocab else '')
        + f': under config.rollout.top_k={ro.top_k} / top_p={ro.top_p} the student is the '
        'truncated policy, which puts 0 mass outside its kept set, so KL(teacher || student) '
        'is infinite wherever the teacher does not. Use reverse_kl / jsd (0 < jsd_beta) or '
        'their _exact forms, or turn truncation off (docs/design.md §3.2)')
  if config.loss.kl_estimator != 'k1':
    raise ConfigError(
        f'config.loss.kl_estimator={config.loss.kl_estimator!r}: only k1 (s_b - t) is offered '
        'as the OPD advantage. k3 is an unbiased estimate of the KL value, but as a reward '
        'its policy gradient is that of KL(pi||q) - KL(q||pi), not of the reverse KL; '
        'runs report it as the metric opd/reverse_kl_k3')
  tis = config.loss.tis_cap
  if tis is not None:
    if not tis > 0:
      raise ConfigError(f'config.loss.tis_cap={tis}: the truncation cap C of min(rho, C) must '
                        'be > 0 (None: plain importance sampling)')
    if config.loss.clip_eps is not None or config.loss.ratio_level != 'token':
      raise ConfigError(
          f'config.loss.tis_cap={tis} with config.loss.clip_eps={config.loss.clip_eps} / '
          f'ratio_level={config.loss.ratio_level!r}: truncated IS replaces the token ratio by '
          'min(rho, C) (docs/design.md §3.6) and is not combined with PPO clipping or the '
          'sequence-level ratio; unset one of them')
  if ro.max_staleness not in (0, 1) or isinstance(ro.max_staleness, bool):
    raise ConfigError(f'config.rollout.max_staleness={ro.max_staleness!r}: 0 (synchronous) or 1 '
                      '(batch k+1 is sampled while batch k is scored and trained on) are '
                      'implemented')
  if ro.max_staleness and config.mode != 'opd':
    raise ConfigError(f'config.rollout.max_staleness={ro.max_staleness} applies to '
                      f"config.mode='opd' (rollouts), not {config.mode!r}")
  if ro.slots < 0:
    raise ConfigError(f'config.rollout.slots={ro.slots}: the number of rows decoded at once '
                      'must be >= 0 (0: static batching)')
  if (config.loss.full_vocab and config.loss.full_vocab not in losses.EXACT_OPTIONS
      and config.loss.full_vocab_top_k < 1):
    raise ConfigError(f'config.loss.full_vocab_top_k={config.loss.full_vocab_top_k}: the top-k '
                      f'distillation term needs k >= 1')
  validate_lora(config.student.lora)
  if config.mode == 'sft' and config.sft.source not in ('dataset', 'teacher'):
    raise ConfigError(f"config.sft.source={config.sft.source!r}; expected 'dataset' or 'teacher'")
  specs = teacher_specs(config)
  if losses.needs_teacher_hidden(config.loss.full_vocab) and specs[0].remote_url:
    raise ConfigError(
        f'config.loss.full_vocab={config.loss.full_vocab!r} needs an in-process teacher: it '
        'recomputes the teacher\'s logits over the whole vocabulary from its hidden states, '
        f'and config.teachers.{specs[0].name} is remote ({specs[0].remote_url}), which returns '
        f'only its own top-k logprobs. Use a top-k option ({", ".join(losses.TOPK_OPTIONS)}) '
        'or an in-process teacher (model=...)')
  for s in specs:
    if not s.cross_tokenizer:
      continue
    where = f'config.teachers.{s.name}.cross_tokenizer=True'
    if config.loss.full_vocab:
      raise ConfigError(
          f'config.loss.full_vocab={config.loss.full_vocab!r} with {where}: full-vocabulary '
          'and top-k distillation terms compare the two distributions id by id, and this '
          "teacher's vocabulary is not the student's (no ULD-style term is implemented; "
          'top-k terms would be defined only on one-to-one tokens). Unset loss.full_vocab: '
          'the sampled-token OPD term is aligned by text (docs/design.md §12)')
    if config.agent.tag_to_env:
      raise ConfigError(f'{where} with config.agent.tag_to_env: multi-turn episodes are not '
                        'supported with a cross-tokenizer teacher (single-turn responses only)')
    if config.mode == 'sft' and config.sft.source == 'teacher':
      raise ConfigError(f"{where} with config.sft.source='teacher': the teacher's samples "
                        "are in its own vocabulary; use sft.source='dataset'")
    if s.remote_url and not s.tokenizer:
      raise ConfigError(f'{where} with a remote teacher needs config.teachers.{s.name}.'
                        "tokenizer: a directory with the served model's tokenizer (the "
                        'client re-tokenizes the responses for it)')
  if config.mode == 'sft' and config.sft.source == 'teacher' and (
      not specs or any(s.remote_url for s in specs)):
    raise ConfigError("config.sft.source='teacher' needs in-process teachers (config.teachers "
                      'without remote_url): they sample the SFT responses')
  if mesh is not None:
    rows = batch_rows(config)
    mini, micro = int(config.batch.mini_batches), int(config.batch.micro_batches)
    dp = shd.batch_size_multiple(mesh)
    if rows % (mini * micro * dp):
      raise ConfigError(f'the batch of {rows} rows is not divisible by batch.mini_batches x '
                        f'batch.micro_batches x the data-parallel extent ({mini} x {micro} x '
                        f'{dp})')


def validate_lora(lc) -> None:
  """config.student.lora: rank >= 0 (0: off), alpha > 0, a valid regex, dropout 0."""
  f = 'config.student.lora'
  if not isinstance(lc.rank, int) or isinstance(lc.rank, bool) or lc.rank < 0:
    raise ConfigError(f'{f}.rank={lc.rank!r}: the adapter rank must be an integer >= 0 '
                      '(0: no LoRA, full fine-tuning)')
  if not lc.rank:
    return
  if not float(lc.alpha) > 0:
    raise ConfigError(f'{f}.alpha={lc.alpha!r}: must be > 0 (the adapters are scaled by '
                      'alpha / rank)')
  if float(lc.dropout) != 0.0:
    raise ConfigError(f'{f}.dropout={lc.dropout!r}: only 0 is supported (the update is '
                      'deterministic and the rollout samples from the merged weights)')
  try:
    re.compile(str(lc.targets))
  except re.error as e:
    raise ConfigError(f'{f}.targets={lc.targets!r}: not a regular expression ({e})') from None


def teacher_specs(config) -> list[TeacherSpec]:
  try:
    return [teacher_spec(n, t) for n, t in config.teachers.items()]
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_signal(config, train_tags) -> None:
  """Every training tag gets a teacher or a reward (OPD mode); needs the data, no weights."""
  if config.mode != 'opd':
    return
  specs = teacher_specs(config)
  tag_to_reward = dict(config.rl.tag_to_reward)
  for tag in train_tags:
    if not any(s.handles(tag) for s in specs) and tag not in tag_to_reward \
        and not config.rl.default_reward:
      raise ConfigError(f'training records with tag {tag!r} get no signal: no teacher in '
                        f'config.teachers handles it and config.rl has no reward for it')


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


def batch_rows(config) -> int:
  """Rows of one training batch: SFT examples, or prompts x samples per prompt."""
  if config.mode == 'sft':
    return int(config.sft.batch_size)
  return int(config.rollout.prompts_per_step) * int(config.rollout.n_samples)


# ----------------------------------------------------------------------- resume checks
# Fields a resumed run may change (fnmatch patterns): how long it runs, how it evaluates,
# logs, checkpoints and exports, the optimizer's settings, and where things run (the mesh,
# gradient accumulation, a teacher's devices or server). Any other change alters the
# objective or the shapes, and is refused.
RESUMABLE_FIELDS = ('total_steps', 'log_every', 'eval_every', 'eval_at_start', 'distributed',
                    'eval.*', 'checkpoint.*', 'export.*', 'debug.*', 'data.eval', 'data.eval.*',
                    'optim.*', 'mesh.*', 'batch.micro_batches', 'teachers.*.devices',
                    'teachers.*.mesh', 'teachers.*.mesh.*', 'teachers.*.remote_url',
                    'teachers.*.remote_timeout_s', 'teachers.*.remote_retries',
                    'teachers.*.remote_concurrency')


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# Fields added after runs may have started, with the default that keeps such a run's
# behaviour: a workdir whose config.json lacks them resumes as long as they hold it.
ADDED_FIELD_DEFAULTS = {'teachers.*.cross_tokenizer': False, 'teachers.*.tokenizer': None,
                        'rollout.max_staleness': 0, 'loss.tis_cap': None}


def check_resume(config, workdir: str, *, resuming: bool) -> None:
  """Writes the resolved config to workdir/config.json; when resuming, first compares it with
  the one written there and stops, listing the fields, on a change that alters the objective
  or the shapes (total_steps, eval, logging, checkpointing and export may change)."""
  path = os.path.join(workdir, 'config.json')
  now = json.loads(config.to_json_best_effort(sort_keys=True))
  if resuming and os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    a, b = _flatten(before), _flatten(now)
    for k, v in b.items():  # a field added since that run, at its default: unchanged
      if k not in a and any(fnmatch.fnmatchcase(k, f) and v == d
                            for f, d in ADDED_FIELD_DEFAULTS.items()):
        a[k] = v
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not any(
        fnmatch.fnmatchcase(k, f) for f in RESUMABLE_FIELDS))
    if changed:
      raise ConfigError(
          f'{workdir} holds a run with another config: it differs in '
          + ', '.join(f'config.{k} ({a.get(k)!r} -> {b.get(k)!r})' for k in changed)
          + '. Resuming would change the objective or the shapes; use a new workdir (see '
          'checks.RESUMABLE_FIELDS for what may change)')
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(now, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
