"""OPD from a teacher with another tokenizer vs from a same-tokenizer teacher, on the demo's
task (3-digit addition written out column by column; configs/demo_arithmetic.py).

  python -m opd_jax.experiments.cross_tokenizer --workdir runs/xtok/seed0 --seed 0
  python -m opd_jax.experiments.cross_tokenizer --workdir runs/xtok/seed1 --seed 1 \
      --models-from runs/xtok/seed0        # the same teachers and student, OPD seed 1
  python -m opd_jax.experiments.cross_tokenizer --workdir /tmp/xtok_quick --quick
  python -m opd_jax.experiments.cross_tokenizer --workdir runs/xtok/agg --aggregate W0 W1 W2

The same teacher weights behind another tokenizer are not possible, so two teachers are
trained by SFT on the same clean solutions with the same recipe (:teacher), architecture and
steps: one with the student's char-level tokenizer and ChatML template, one with a
byte-level BPE trained here by the `tokenizers` library on the training set's text
(at most BPE_VOCAB tokens; digits split one per token, as Qwen's tokenizers do: a BPE that
merges digits reached only 55% after the same SFT, seed 0) and a Llama-3-style chat
template. The student (:student, noisy data)
is then distilled on-policy (:opd, the same init, data, steps and learning rate) from each:
  opd_same   the char-level teacher, today's OPD;
  opd_cross  the BPE teacher with teachers.teacher.cross_tokenizer=True (docs/design.md §12).
Each seed re-initialises every model (tiny:... seeds offset by 100 x seed). The gain is the
student's held-out greedy exact-match accuracy after OPD minus before. Outputs in WORKDIR:
results.md (the table, also printed), results.json, cross_tokenizer.png.
"""

from __future__ import annotations

import json
import os

from opd_jax.experiments.common import (cli, enable_compile_cache, fmt_seeds, load_recipe,
                                        run_stage, seeded_model)

BPE_VOCAB = 320
ROWS = (('teacher_char', 'teacher, char-level tokenizer (SFT)'),
        ('teacher_bpe', f'teacher, byte-level BPE of {BPE_VOCAB} tokens (SFT)'),
        ('student', 'student before OPD (SFT on noisy data)'),
        ('opd_same', 'student after OPD, same-tokenizer teacher'),
        ('opd_cross', 'student after OPD, cross-tokenizer teacher (aligned by text)'))


def _texts(path: str) -> list[str]:
  with open(path) as f:
    recs = [json.loads(x) for x in f if x.strip()]
  return [r['prompt'] for r in recs] + [r['response'] for r in recs]


def make_bpe_teacher_init(path: str, train_path: str, model_spec: str) -> str:
  """A random init of `model_spec`'s architecture with a byte-level BPE tokenizer trained on
  the training file's prompts and responses (written once)."""
  from opd_jax.models import tiny
  if os.path.exists(os.path.join(path, 'config.json')):
    return path
  kw = dict(x.split('=') for x in model_spec.split(':', 2)[2].split(','))
  kw = {k: int(v) for k, v in kw.items()}
  tok = tiny.build_bpe_tokenizer(BPE_VOCAB, corpus=_texts(train_path), split_digits=True)
  return tiny.make_tiny_checkpoint(path, family=model_spec.split(':')[1], tokenizer=tok, **kw)


def _config(recipe, stage, paths, *, seed, quick, student, teacher=None, cross=False):
  c = recipe.get_config(stage)
  c.unlock()
  c.seed = seed
  c.student.model = student
  c.data.train.arith = paths['noisy_train' if stage == 'student' else 'train']
  c.data.eval.arith = paths['eval']
  if teacher is not None:
    c.teachers.teacher.model = teacher
    c.teachers.teacher.cross_tokenizer = cross
  if quick:  # as `python -m opd_jax.tools.demo --tiny`: a pipeline check, no result
    c.eval.num_prompts = c.eval.batch_size = 32
    c.log_every = 5
    c.total_steps = {'teacher': 40, 'student': 30}.get(stage, 6)
    if stage == 'opd':
      c.eval_every = 3
      c.rollout.prompts_per_step = 16
  c.lock()
  return c


def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False,
                   models_from: str | None = None) -> dict:
  """One seed. `models_from`: a finished seed's workdir whose two teachers and student are
  reused (then only the OPD stages run here, with this seed)."""
  from opd_jax.tasks.arithmetic import write_dataset
  os.makedirs(workdir, exist_ok=True)
  enable_compile_cache(workdir)
  recipe = load_recipe('demo_arithmetic')
  paths = write_dataset(os.path.join(workdir, 'data'), n_train=2000 if quick else 20000,
                        n_eval=32 if quick else 256, seed=0)
  cfg = lambda stage, **kw: _config(recipe, stage, paths, seed=seed, quick=quick, **kw)  # noqa
  teacher_spec = seeded_model(recipe.TEACHER_MODEL, seed)
  export = lambda name: os.path.join(workdir, name, 'export')  # noqa
  st = {}
  if models_from:
    export = lambda name: os.path.join(models_from, name, 'export')  # noqa
    for k in ('teacher_char', 'teacher_bpe', 'student'):
      with open(os.path.join(models_from, k, 'result.json')) as f:
        st[k] = json.load(f)
  else:
    st['teacher_char'] = run_stage('teacher_char', cfg('teacher', student=teacher_spec),
                                   workdir, need_export=True)
    bpe_init = make_bpe_teacher_init(os.path.join(workdir, 'teacher_bpe_init'),
                                     paths['train'], teacher_spec)
    st['teacher_bpe'] = run_stage('teacher_bpe', cfg('teacher', student=bpe_init), workdir,
                                  need_export=True)
    st['student'] = run_stage('student', cfg('student', student=seeded_model(
        recipe.STUDENT_MODEL, seed), teacher=export('teacher_char')), workdir,
        need_export=True)
  st['opd_same'] = run_stage('opd_same', cfg('opd', student=export('student'),
                                             teacher=export('teacher_char')), workdir)
  st['opd_cross'] = run_stage('opd_cross', cfg('opd', student=export('student'),
                                               teacher=export('teacher_bpe'), cross=True),
                              workdir)
  summary = {'seed': seed, 'quick': quick, 'rows': {}, 'models_from': models_from,
             'alignment': _alignment(export('student'), export('teacher_bpe'),
                                     paths['train'])}
  for k, _ in ROWS:
    f = st[k]['final']
    summary['rows'][k] = {'accuracy': f.get('eval/accuracy'),
                          'curve': st[k]['history'].get('eval/accuracy', []),
                          'wall_s': st[k].get('wall_s')}
  for k in ('opd_same', 'opd_cross'):
    curve = summary['rows'][k]['curve']
    start = curve[0][1] if curve else None
    acc = summary['rows'][k]['accuracy']
    summary['rows'][k]['gain'] = None if start is None or acc is None else acc - start
  finish(workdir, [summary])
  return summary


def _alignment(student_dir: str, teacher_dir: str, train_path: str, n: int = 200) -> dict:
  """The alignment of the first `n` clean training solutions (student -> BPE teacher)."""
  import transformers
  from opd_jax.teachers import align
  s_tok = transformers.AutoTokenizer.from_pretrained(student_dir)
  t_tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  with open(train_path) as f:
    texts = [json.loads(x)['response'] for x in f if x.strip()][:n]
  return align.alignment_counts(
      [align.align_response(s_tok, t_tok, s_tok(x, add_special_tokens=False)['input_ids'])
       for x in texts])


def table(sums) -> str:
  lines = [f'seeds: {", ".join(str(s["seed"]) for s in sums)}'
           + (' (quick: a pipeline check, not a result)' if any(s['quick'] for s in sums)
              else ''), '',
           '| model | held-out accuracy | gain from OPD |', '|---|---|---|']
  for k, label in ROWS:
    acc = fmt_seeds([s['rows'][k]['accuracy'] for s in sums])
    gain = (fmt_seeds([s['rows'][k]['gain'] for s in sums], '+.1%')
            if k.startswith('opd') else '')
    lines.append(f'| {label} | {acc} | {gain} |')
  counts = sums[0].get('alignment') or {}
  if counts:
    total = max(1, sum(counts.values()))
    lines += ['', 'student tokens of 200 clean training solutions under the BPE teacher: '
              + ', '.join(f'{k} {100 * v / total:.1f}%' for k, v in counts.items())]
  if any(s.get('models_from') for s in sums):
    reused = ', '.join(str(s['seed']) for s in sums if s.get('models_from'))
    lines += ['', f'seeds {reused}: the teachers and the student of --models-from '
              f'({next(s["models_from"] for s in sums if s.get("models_from"))}) reused; '
              'only the OPD stages '
              'ran with their seed']
  return '\n'.join(lines)


def plot(sums, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for k, color in (('opd_same', 'C0'), ('opd_cross', 'C1')):
    for i, s in enumerate(sums):
      curve = s['rows'][k]['curve']
      if curve:
        steps, vals = zip(*curve)
        ax.plot(steps, vals, color=color, alpha=0.8,
                label=dict(ROWS)[k].replace('student after OPD, ', '') if i == 0 else None)
  ax.set_xlabel('OPD step')
  ax.set_ylabel('held-out accuracy')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def finish(out_dir: str, sums) -> str:
  text = table(sums)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(sums, f)
  plot(sums, os.path.join(out_dir, 'cross_tokenizer.png'))
  print(text, flush=True)
  return text


def aggregate(workdirs, out_dir: str) -> str:
  sums = []
  for w in workdirs:
    with open(os.path.join(w, 'results.json')) as f:
      sums.extend(json.load(f))
  return finish(out_dir, sums)


def main(argv=None):
  import functools
  import sys
  argv = list(sys.argv[1:] if argv is None else argv)
  models_from = None
  if '--models-from' in argv:  # WORKDIR of a finished seed: reuse its teachers and student
    i = argv.index('--models-from')
    models_from = argv[i + 1]
    del argv[i:i + 2]
  cli(__doc__, 'runs/cross_tokenizer',
      functools.partial(run_experiment, models_from=models_from), aggregate, argv)


if __name__ == '__main__':
  main()
