"""Pre-flight check of a run's student and teachers, before a run is booked.

  python -m opd_jax.tools.check_teacher --config configs/opd_single_teacher.py:runlocal \
      [--num-prompts 16] [--local-copy teacher=/ckpt/Qwen3-8B] [--strict] [--config.x=y ...]

With the trainer's own pieces (builder.build_run / make_teacher, the run's sampler and cast,
the update's logprob definition) it reports: tokenizer agreement of each teacher with the
student (the first differing token; a remote teacher's server vocabulary); one training
record per tag through its chat template; the OPD signal, mean |s_b - t| over each teacher's
response tokens; the student's train-inference gap mean / max |s - s_b| on `--num-prompts`
rollouts with fp32 and with bf16 compute; for a remote teacher, |t_remote - t_local| against
`--local-copy NAME=DIR` and the difference of two identical requests; for a teacher with
another tokenizer (cross_tokenizer), the fraction of student tokens aligned one to one,
split and merged, and against a `--local-copy` with the student's tokenizer (a
same-tokenizer score) the aligned logprobs' agreement per token and per response. A gap whose mean is
over 10% of the teacher's signal prints a WARNING line; the exit status is 0, or 1 with
--strict when anything warned. Single-process only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.training import builder
from opd_jax.models import tiny
from opd_jax import data as data_lib
from opd_jax.training import update as update_lib
from opd_jax.teachers.remote import tokenizer_fingerprint
from opd_jax.rollout.engine import rollout_arrays
from opd_jax.rollout.sampler import Sampler
from opd_jax.teachers.scoring import map_vocab_chunks
from opd_jax.teachers.cross import ScoreContext
from opd_jax.teachers.local import TeacherSpec, route_matrix, score_teachers

WARN_FRACTION = 0.1
DTYPES = ('float32', 'bfloat16')


class Report:
  """Printed lines and the warnings among them."""

  def __init__(self, out=print):
    self.out, self.warnings = out, []

  def line(self, text: str = '') -> None:
    self.out(text)

  def warn(self, text: str) -> None:
    self.warnings.append(text)
    self.out(f'WARNING: {text}')

  def gap(self, label: str, diff, mask, signal: float | None) -> None:
    """`label: mean .. max ..` of |diff| on mask, next to the signal; warns over 10% of it."""
    d = np.abs(np.asarray(diff, np.float64))[np.asarray(mask) > 0]
    mean, mx = (float(d.mean()), float(d.max())) if d.size else (0.0, 0.0)
    text = f'  {label}: mean {mean:.3g}  max {mx:.3g}'
    if signal is None:
      return self.line(text + '  (no OPD signal to compare with)')
    self.line(f'{text}  | signal {signal:.3g} ({100 * mean / max(signal, 1e-30):.2g}%)')
    if not mean <= WARN_FRACTION * signal:
      self.warn(f'{label}: mean {mean:.3g} is over {WARN_FRACTION:.0%} of the OPD signal '
                f'{signal:.3g}; the training signal would be drowned by this numerical gap')


# ---------------------------------------------------------------------------- tokenizers
def check_tokenizers(config, tokenizer, mesh, rep: Report) -> list[str]:
  """Reports each teacher's tokenizer agreement; returns the names of those that differ."""
  rep.line('== tokenizers ==')
  vocab = builder.model_source(config.student.model, 'config.student.model').cfg.vocab_size
  rep.line(f'  student {config.student.model}: {len(tokenizer)} tokens, fingerprint '
           f'{tokenizer_fingerprint(tokenizer)}, model vocabulary {vocab}')
  if vocab < len(tokenizer):
    rep.warn(f'the student model has {vocab} embeddings for {len(tokenizer)} tokens')
  bad = []
  for spec in builder.teacher_specs(config):
    try:
      rep.line(f'  teacher {spec.name!r}: {_teacher_vocab(spec, tokenizer, mesh)}: OK')
    except data_lib.VocabMismatchError as e:
      rep.warn(f'teacher {spec.name!r}: tokenizer MISMATCH: {e}')
      bad.append(spec.name)
  return bad


def _teacher_vocab(spec: TeacherSpec, tokenizer, mesh) -> str:
  if spec.cross_tokenizer:
    import transformers
    path = tiny.resolve_model(spec.tokenizer or spec.model)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    try:
      data_lib.check_tokenizers_match(tokenizer, theirs, teacher_name=f'teacher {spec.name!r}')
      same = 'the same tokenizer'
    except data_lib.VocabMismatchError as e:
      same = f'another tokenizer, aligned by text (cross_tokenizer=True): {e}'
    return f'{path}: {len(theirs)} tokens, fingerprint {tokenizer_fingerprint(theirs)}, {same}'
  if spec.remote_url:  # RemoteTeacher checks the server's vocabulary at construction
    t = builder.make_teacher(spec, student_mesh=mesh, student_tokenizer=tokenizer)
    t.close()
    i = t.server_info
    return (f"server {spec.remote_url} ({i.get('model_path')}): vocab_size "
            f"{i.get('vocab_size')}, tokenizer {i.get('tokenizer_size', '?')} tokens, "
            f"fingerprint {i.get('tokenizer_fingerprint', 'not reported')}")
  import transformers
  path = tiny.resolve_model(spec.model)
  theirs = transformers.AutoTokenizer.from_pretrained(path)
  data_lib.check_tokenizers_match(tokenizer, theirs, teacher_name=f'teacher {spec.name!r}')
  return f'{path}: {len(theirs)} tokens, fingerprint {tokenizer_fingerprint(theirs)}'


def check_templates(config, encoder, rep: Report) -> None:
  rep.line('== chat templates (one training record per tag) ==')
  domains = data_lib.load_domains(dict(config.data.train), default_tag=config.data.default_tag)
  first = {}
  for rec in (r for recs in domains.values() for r in recs):
    first.setdefault(rec.tag, rec)
  for tag, rec in sorted(first.items()):
    text = encoder.text(rec)
    rep.line(f'  tag {tag!r} ({rec.where}, template {encoder.template_for(tag)!r}, '
             f'{len(encoder.encode(rec) or [])} tokens):')
    rep.line('\n'.join('    | ' + x for x in text.split('\n')))


# ---------------------------------------------------------------------- the student's s
def update_logprobs_fn(graphdef, spec: update_lib.LossSpec):
  """Jitted (params, tokens, attn) -> s [B, T]: the update's logprob (its _position_terms on
  parameters cast to spec.compute_dtype, tempered and truncated as the rollout), no grad."""
  spec = dataclasses.replace(spec, full_vocab=None, remat=False)

  @jax.jit
  def fn(params, tokens, attn):
    model = nnx.merge(graphdef, update_lib._cast(params, spec.compute_dtype))
    hidden, _ = model.hidden(tokens, attn)
    out = map_vocab_chunks(hidden[:, :-1], model.unembed_weight(),
                           functools.partial(update_lib._position_terms, spec=spec),
                           {'target': tokens[:, 1:].astype(jnp.int32)},
                           chunk_size=spec.chunk_size, temperature=spec.temperature)
    return jnp.pad(out['logprobs'], ((0, 0), (1, 0)))
  return fn


def rollout_and_s(r, config, dtype: str, prompts, key):
  """(tokens, attn, loss_mask, s_b, s) [B, T]: a rollout with `dtype` compute as the trainer
  samples it (run.cast_fn, a sampler with that cache dtype), and the update's s of it."""
  c = copy.deepcopy(config)
  c.student.compute_dtype = dtype
  sampler = r.sampler if dtype == config.student.compute_dtype else Sampler(
      r.graphdef, mesh=r.mesh, pad_id=r.pad_id, cache_dtype=jnp.dtype(dtype),
      slots=int(config.rollout.slots) or None, layout=r.layout)
  rollout = sampler(dataclasses.replace(r, config=c).cast_fn()(r.params), prompts, key,
                    r.rollout_sp)
  tokens, attn, lmask, s_b = rollout_arrays(rollout)
  with jax.set_mesh(r.mesh):
    s = update_logprobs_fn(r.graphdef, builder.loss_spec(c))(r.model_params(r.params),
                                                             tokens, attn)  # LoRA: merged
  return tokens, attn, lmask, s_b, s


# ------------------------------------------------------------------------------ teachers
def compare_teachers(rep: Report, label: str, a, b, tokens, attn, rows, mask, signal) -> None:
  """mean / max |t_a - t_b| of two teachers on the same sequences (the remote-vs-local and
  the repeat-request checks; `a` may be `b`)."""
  t_a, t_b = (np.asarray(t.score(tokens, attn, rows, out_sharding=tokens.sharding)['logprobs'])
              for t in (a, b))
  rep.gap(label, t_a - t_b, mask, signal)


def make_local_copy(r, spec: TeacherSpec, path: str, tokenizer):
  c = r.config
  local = TeacherSpec(name=f'{spec.name}-local', model=path, dtype=spec.dtype,
                      sharding=spec.sharding)
  top_k = int(c.loss.full_vocab_top_k) if c.loss.full_vocab else 0
  return builder.make_teacher(local, student_mesh=r.mesh, student_tokenizer=tokenizer,
                              top_k=top_k, temperature=float(c.rollout.temperature),
                              micro_batches=int(c.batch.micro_batches))


# ----------------------------------------------------------------------------------- run
def check(config, *, num_prompts: int = 16, local_copies: dict | None = None,
          out=print) -> list[str]:
  """Runs every check, printing with `out`; returns the warnings."""
  from opd_jax import sharding as shd
  from opd_jax.train import load_data
  rep, local_copies = Report(out), dict(local_copies or {})
  if set(local_copies) - set(config.teachers):
    raise ValueError(f'--local-copy: no teacher {sorted(set(local_copies) - set(config.teachers))}'
                     f' in config.teachers ({", ".join(config.teachers)})')
  builder.validate(config)
  builder.check_model_paths(config)
  mesh = shd.make_mesh(dict(config.mesh))
  data = load_data(config)
  bad = check_tokenizers(config, data.tokenizer, mesh, rep)
  check_templates(config, data.encoder, rep)
  if bad:  # the trainer would refuse these; check the rest without them
    config = copy.deepcopy(config)
    with config.unlocked():
      for name in bad:
        del config.teachers[name]
    if not config.teachers and not config.rl.estimator:
      rep.line('== skipped: no teacher with a matching tokenizer is left ==')
      return rep.warnings
  r = builder.build_run(config, mesh, tokenizer=data.tokenizer)
  records = data.prompts.next_batch(num_prompts)  # the run's first prompts, one sample each
  prompts = data.encoder.encode_batch(records)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), 0)
  route = route_matrix([x.tag for x in records], r.specs)
  runs = {d: rollout_and_s(r, config, d, prompts, key)
          for d in dict.fromkeys(DTYPES + (config.student.compute_dtype,))}
  tokens, attn, lmask, s_b, _ = runs[config.student.compute_dtype]
  rep.line(f'== OPD signal: mean |s_b - t| over response tokens ({num_prompts} rollouts, '
           f'{config.student.compute_dtype} compute, {int(np.sum(lmask))} tokens) ==')
  masks = {t.name: np.asarray(lmask) * route[:, j:j + 1] for j, t in enumerate(r.teachers)}
  ctx = ScoreContext(records, lmask)
  signal = opd_signal(rep, r, tokens, attn, s_b, route, masks, ctx)
  rep.line('== student train-inference gap: |s - s_b| over response tokens ==')
  for dtype, (_, _, lm, sb, s) in runs.items():
    diff = np.asarray(s) - np.asarray(sb)
    if not r.teachers:
      rep.gap(f'{dtype} compute', diff, lm, None)
    for j, t in enumerate(r.teachers):  # each teacher's rows, next to its signal
      rep.gap(f'{dtype} compute (teacher {t.name!r} rows)', diff,
              np.asarray(lm) * route[:, j:j + 1], signal.get(t.name))
  for t in r.teachers:
    if getattr(t, 'counts_own_tokens', False):
      check_alignment(rep, r, t, data.tokenizer, local_copies.get(t.name), tokens, attn,
                      masks[t.name], signal.get(t.name), ctx)
      continue
    check_teacher(rep, r, t, data.tokenizer, local_copies.get(t.name), tokens, attn,
                  masks[t.name], signal.get(t.name))
  return rep.warnings


def check_alignment(rep, r, t, tokenizer, local_path, tokens, attn, mask, signal, ctx):
  """A cross-tokenizer teacher: the fraction of the sample's student tokens aligned one to
  one, split and merged (docs/design.md §12), and, given a --local-copy with the student's
  tokenizer (a same-tokenizer score), |t~ - t_same| per token (all, and the exactly aligned
  one-to-one / split tokens) and per response."""
  from opd_jax.teachers import align
  rows = np.nonzero(mask.sum(-1) > 0)[0]
  if not len(rows):
    return
  rep.line(f'== teacher {t.name!r}: alignment to the student\'s tokens (cross_tokenizer) ==')
  out = t.score(tokens, attn, rows, out_sharding=tokens.sharding, context=ctx)
  kinds = t.last_kinds
  total = int((kinds >= 0).sum())
  rep.line(f'  {total} student tokens of {len(rows)} responses: ' + ', '.join(
      f'{name} {100 * np.mean(kinds[kinds >= 0] == k):.1f}%'
      for k, name in enumerate(align.KINDS)) +
      f'; the teacher read {int(t.last_seq_lens[rows].sum())} tokens for the student\'s '
      f'{int(np.asarray(attn)[rows].sum())}')
  if not local_path:
    rep.line('  (no same-tokenizer score to compare with: --local-copy NAME=DIR with the '
             "student's tokenizer gives one)")
    return
  try:
    local = make_local_copy(r, t.spec, local_path, tokenizer)
  except data_lib.VocabMismatchError as e:
    rep.warn(f'local copy of teacher {t.name!r}: not a same-tokenizer score: {e}')
    return
  t_x = np.asarray(out['logprobs'])
  t_s = np.asarray(local.score(tokens, attn, rows, out_sharding=tokens.sharding)['logprobs'])
  exact = mask * (kinds >= 0) * (kinds <= 1)
  rep.gap(f'|t~ - t_same| ({local_path}), all tokens', t_x - t_s, mask, signal)
  rep.line(f'  |t~ - t_same| on one-to-one / split tokens: mean '
           f'{np.abs(t_x - t_s)[exact > 0].mean() if exact.sum() else 0.0:.3g} over '
           f'{int(exact.sum())} tokens')
  per_row = np.abs(((t_x - t_s) * mask).sum(-1))[rows]
  rep.line(f'  |sum t~ - sum t_same| per response: mean {per_row.mean():.3g}  max '
           f'{per_row.max():.3g}')


def opd_signal(rep, r, tokens, attn, s_b, route, masks, ctx=None) -> dict[str, float]:
  """{teacher: mean |s_b - t| over its routed response tokens}, scored as the trainer does."""
  t_J, _ = score_teachers(r.teachers, tokens, attn, route, out_sharding=tokens.sharding,
                          count=False, context=ctx)
  signal = {}
  for j, t in enumerate(r.teachers):
    d = np.abs(np.asarray(s_b) - np.asarray(t_J[j]))[masks[t.name] > 0]
    if d.size:
      signal[t.name] = float(d.mean())
    rep.line(f'  teacher {t.name!r}: {signal[t.name]:.4g} over {d.size} tokens' if d.size
             else f'  teacher {t.name!r}: no sampled prompt is routed to it')
  return signal


def check_teacher(rep, r, t, tokenizer, local_path, tokens, attn, mask, signal) -> None:
  """A remote teacher (or one given a --local-copy): against the copy, and repeatability."""
  rows = np.nonzero(mask.sum(-1) > 0)[0]
  if not (t.spec.remote_url or local_path) or not len(rows):
    return
  rep.line(f'== teacher {t.name!r}{" (remote)" if t.spec.remote_url else ""} ==')
  if local_path:
    try:
      local = make_local_copy(r, t.spec, local_path, tokenizer)
    except data_lib.VocabMismatchError as e:
      rep.warn(f'local copy of teacher {t.name!r}: tokenizer MISMATCH: {e}')
    else:
      compare_teachers(rep, f'|t - t_local| ({local_path})', t, local, tokens, attn, rows,
                       mask, signal)
  if t.spec.remote_url:
    compare_teachers(rep, 'repeat-request |t - t| (determinism)', t, t, tokens, attn, rows,
                     mask, signal)


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'recipe: configs/NAME.py[:arg]', lock_config=True)
  flags.DEFINE_integer('num-prompts', 16, 'rollouts sampled for the logprob gaps')
  flags.DEFINE_multi_string('local-copy', [], 'NAME=DIR: a local checkpoint of teacher NAME '
                            'to compare its (remote) scores with')
  flags.DEFINE_bool('strict', False, 'exit with status 1 when any check warns')
  flags.mark_flags_as_required(['config'])

  def _main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format='%(name)s: %(message)s')
    copies = dict(x.split('=', 1) for x in flags.FLAGS['local-copy'].value)
    warnings = check(config_flag.value, num_prompts=flags.FLAGS['num-prompts'].value,
                     local_copies=copies)
    print(f'== {len(warnings)} warning(s) ==')
    return 1 if warnings and flags.FLAGS.strict else 0
  app.run(_main, argv=argv)


if __name__ == '__main__':
  main()
