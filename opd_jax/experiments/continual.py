"""Continual learning in miniature on a CPU: new knowledge learned by SFT erodes a
post-trained behaviour; on-policy distillation from the earlier checkpoint brings the
behaviour back while keeping the knowledge.

  python -m opd_jax.experiments.continual --workdir runs/continual/seed0 --seed 0
  python -m opd_jax.experiments.continual --workdir /tmp/continual_quick --quick
  python -m opd_jax.experiments.continual --workdir runs/continual/agg --aggregate W0 W1 W2

Stages (each the ordinary trainer on configs/continual.py:STAGE; a stage whose result.json
exists is reused, so an interrupted run continues):
  data             held-out addition problems (behaviour test), clean addition training
                   solutions, N_FACTS random facts (the knowledge, trained and tested);
  post             the post-trained model: SFT on clean addition (behaviour on, no facts);
  sft_facts        + knowledge SFT on the facts only;
  sft_mix          + knowledge SFT on the facts with REPLAY of the post-training data;
  sft_facts_opd    sft_facts + OPD with `post` as the teacher on addition prompts only;
  sft_mix_opd      sft_mix + the same OPD.
The OPD learning rate is chosen per seed and starting point from OPD_LRS by the mean of the
behaviour accuracy on a validation split (addition problems disjoint from the training and
held-out sets) and the facts recalled; the held-out set is only reported.
Behaviour accuracy is greedy exact match on held-out addition; knowledge accuracy is greedy
exact match of the number recalled for each trained fact. Outputs in WORKDIR: results.md
(the table, also printed as the last lines), results.json, continual.png.
"""

from __future__ import annotations

import json
import os
import time

from opd_jax.experiments.common import (cli, enable_compile_cache, fmt_seeds as _fmt,
                                        load_recipe as _load, run_stage, seeded_model)

ROWS = (('post', 'post-trained model (SFT on the behaviour)'),
        ('sft_facts', '+ knowledge SFT, facts only'),
        ('sft_mix', '+ knowledge SFT, facts + replay'),
        ('sft_facts_opd', '+ knowledge SFT (facts only), then OPD from the post-trained model'),
        ('sft_mix_opd', '+ knowledge SFT (facts + replay), then OPD from the post-trained model'))


def load_recipe():
  return _load('continual')


def write_data(directory: str, recipe, *, quick: bool) -> dict:
  from opd_jax.tasks import arithmetic, chain, facts
  os.makedirs(directory, exist_ok=True)
  n_train, n_eval = (2000, 64) if quick else (20000, 256)
  ev = arithmetic.make_records(n_eval, seed=101, prefix='add-eval', tag='add')
  held = {r['prompt'] for r in ev}
  tr = arithmetic.make_records(n_train, seed=100, prefix='add-train', tag='add', exclude=held)
  assert not held & {r['prompt'] for r in tr}, 'behaviour train and eval overlap'
  # validation split (tag 'val'): disjoint from both; chooses the OPD learning rate
  val = arithmetic.make_records(32 if quick else 128, seed=103, prefix='add-val', tag='val',
                                exclude=held | {r['prompt'] for r in tr})
  fs = facts.make_facts(64 if quick else recipe.N_FACTS, seed=102)
  names = ('add_train', 'add_eval', 'add_val', 'facts')
  paths = {k: os.path.join(directory, f'{k}.jsonl') for k in names}
  for k, recs in zip(names, (tr, ev, val, fs)):
    chain.write_jsonl(paths[k], recs)
  return paths


def _config(recipe, stage, paths, *, seed, quick, student, teacher=None, train=None,
            interleave=None, lr=None):
  c = recipe.get_config(stage + (',quick' if quick else ''))
  c.unlock()
  c.seed = seed
  c.student.model = student
  c.data.eval = {'add': paths['add_eval'], 'fact': paths['facts'], 'val': paths['add_val']}
  c.data.train = train
  if interleave:
    c.data.interleave = interleave
  if teacher is not None:
    c.teachers.teacher.model = teacher
  if lr is not None:
    c.optim.lr = lr
  c.lock()
  return c


def run_experiment(workdir: str, *, seed: int = 0, quick: bool = False) -> dict:
  recipe = load_recipe()
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  enable_compile_cache(workdir)
  paths = write_data(os.path.join(workdir, 'data'), recipe, quick=quick)
  exp = lambda name: os.path.join(workdir, name, 'export')  # noqa: E731
  cfg = lambda stage, **kw: _config(recipe, stage, paths, seed=seed, quick=quick, **kw)  # noqa
  model = recipe.QUICK_MODEL if quick else recipe.MODEL
  st = {}
  st['post'] = run_stage('post', cfg('post', student=seeded_model(model, seed),
                                     train={'add': paths['add_train']}), workdir,
                         need_export=True)
  st['sft_facts'] = run_stage('sft_facts', cfg('knowledge', student=exp('post'),
                                               train={'fact': paths['facts']}), workdir,
                              need_export=True)
  st['sft_mix'] = run_stage(
      'sft_mix', cfg('knowledge', student=exp('post'),
                     train={'fact': paths['facts'], 'add': paths['add_train']},
                     interleave={'fact': 1.0 - recipe.REPLAY, 'add': recipe.REPLAY}), workdir,
      need_export=True)
  lrs = recipe.QUICK_OPD_LRS if quick else recipe.OPD_LRS
  chosen = {}
  for src in ('sft_facts', 'sft_mix'):
    cands = []
    for lr in lrs:
      name = f'{src}_opd_lr{lr:g}'
      st[name] = run_stage(name, cfg('opd', student=exp(src), teacher=exp('post'),
                                     train={'add': paths['add_train']}, lr=lr), workdir)
      f = st[name]['final']
      # chosen on the validation split's behaviour and the facts, never the held-out set
      cands.append(((f['eval/accuracy/val'] + f['eval/accuracy/fact']) / 2, -lr, lr))
    best = max(cands)[2]
    chosen[src] = {'lr': best, 'val_score': {f'{c[2]:g}': c[0] for c in cands}}
    st[f'{src}_opd'] = st[f'{src}_opd_lr{best:g}']
  summary = {'seed': seed, 'quick': quick, 'rows': {}, 'opd_lr': chosen}
  for k, _ in ROWS:
    f = st[k]['final']
    summary['rows'][k] = {'behaviour': f['eval/accuracy/add'],
                          'knowledge': f['eval/accuracy/fact'],
                          'curve': {t: st[k]['history'].get(f'eval/accuracy/{t}', [])
                                    for t in ('add', 'fact')},
                          'wall_s': st[k]['wall_s']}
  summary['wall_s'] = time.time() - t_start
  summary['stage_wall_sum_s'] = sum(v['wall_s'] for k, v in st.items()
                                    if k not in ('sft_facts_opd', 'sft_mix_opd'))
  summary['budget'] = {'knowledge_steps': recipe.KNOWLEDGE_STEPS, 'opd_steps': recipe.OPD_STEPS,
                       'replay': recipe.REPLAY, 'facts': recipe.N_FACTS}
  text = table([summary]) + (f'\n\nseed {seed}; sum of stage wall times '
                             f'{summary["stage_wall_sum_s"]:.0f} s; this invocation '
                             f'{summary["wall_s"]:.0f} s')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  plot([summary], os.path.join(workdir, 'continual.png'))
  print('\n' + text, flush=True)
  return summary


def table(sums) -> str:
  lines = [f'{len(sums)} seed(s): {", ".join(str(x["seed"]) for x in sums)}; greedy exact '
           'match, mean ± sample std over seeds.', '',
           '| model | behaviour: held-out addition | knowledge: facts recalled |',
           '|---|---|---|']
  for k, name in ROWS:
    lines.append(f'| {name} | {_fmt([x["rows"][k]["behaviour"] for x in sums])} | '
                 f'{_fmt([x["rows"][k]["knowledge"] for x in sums])} |')
  if all('opd_lr' in x for x in sums):
    lines += ['', 'OPD learning rate per seed (chosen on validation behaviour + facts): '
              + '; '.join(f'from {src}: ' + ', '.join(format(x['opd_lr'][src]['lr'], 'g')
                                                     for x in sums)
                          for src in ('sft_facts', 'sft_mix'))]
  return '\n'.join(lines)


def plot(sums, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  colors = dict(zip([k for k, _ in ROWS], ['black', 'tab:red', 'tab:orange', 'tab:blue',
                                            'tab:green']))
  for i, x in enumerate(sums):
    for k, name in ROWS:
      r = x['rows'][k]
      ax.scatter(r['knowledge'], r['behaviour'], color=colors[k], s=30,
                 label=name if i == 0 else None)
    for src, dst in (('sft_facts', 'sft_facts_opd'), ('sft_mix', 'sft_mix_opd')):
      a, b = x['rows'][src], x['rows'][dst]
      ax.annotate('', xy=(b['knowledge'], b['behaviour']),
                  xytext=(a['knowledge'], a['behaviour']),
                  arrowprops=dict(arrowstyle='->', color=colors[dst], alpha=0.6))
  ax.set_xlabel('knowledge: facts recalled')
  ax.set_ylabel('behaviour: held-out addition accuracy')
  ax.set_xlim(-0.05, 1.05)
  ax.set_ylim(-0.05, 1.05)
  ax.set_title(f'Continual learning, {len(sums)} seed(s)')
  ax.legend(fontsize=7, loc='lower left')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def aggregate(workdirs, out_dir: str) -> str:
  sums = []
  for w in workdirs:
    with open(os.path.join(w, 'results.json')) as f:
      sums.append(json.load(f))
  text = table(sums) + ('\n\nwall time per seed (sum of its stages): '
                        f'{_fmt([x["stage_wall_sum_s"] for x in sums], ".0f")} s')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'aggregate.md'), 'w') as f:
    f.write(text + '\n')
  plot(sums, os.path.join(out_dir, 'continual.png'))
  print(text, flush=True)
  return text


def main(argv=None):
  cli(__doc__, 'runs/continual/seed0', run_experiment, aggregate, argv)


if __name__ == '__main__':
  main()
