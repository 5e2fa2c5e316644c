"""Multi-turn OPD on the tool environment, in miniature on a CPU:

  python -m opd_jax.experiments.agentic_tool --workdir runs/agentic [--seed 0] [--quick]

Task: 'A*B=?' with two-digit A, B (ground truth the product); the environment is 'tool'
(opd_jax/envs/tool.py): `<calc>EXPR</calc>` runs in the sandbox, `<answer>N</answer>` ends
the episode (reward 1 if N is the product). A tiny model cannot multiply two-digit numbers,
so the reward measures whether it calls the calculator correctly and copies the result.

Stages (a stage whose output exists in WORKDIR is reused):
  data      TRAIN distinct training problems and EVAL held-out ones (disjoint);
  teacher   SFT of the larger model on tool-using transcripts (`multiturn.replay`: the
            calculator call, the environment's real result, the answer), loss on the
            student turns only;
  student   a short SFT of the smaller model on the same transcripts (a weak start);
  opd       the ordinary trainer (`opd_jax.train.run`) on configs/opd_agentic.py with this
            task: the student's own episodes, scored by the teacher on its tokens in the
            whole interleaved context; greedy held-out episodes before (step 0) and after.
Prints (and writes WORKDIR/results.md) held-out episode reward, turns and tool errors of
the teacher, the student before and after OPD, and the reverse KL on student tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

TEACHER = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=21'
STUDENT = 'tiny:qwen3:hidden_size=32,num_layers=2,num_heads=2,num_kv_heads=1,seed=22'
BUDGETS = dict(max_turns=3, max_tokens_per_turn=24, max_episode_tokens=96, max_obs_tokens=48)


def write_data(workdir: str, n_train: int, n_eval: int, seed: int) -> dict:
  rng = random.Random(seed)
  pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
  rng.shuffle(pairs)
  paths = {}
  for split, chunk in (('train', pairs[:n_train]), ('eval', pairs[n_train:n_train + n_eval])):
    path = os.path.join(workdir, 'data', f'{split}.jsonl')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      for i, (a, b) in enumerate(chunk):
        f.write(json.dumps({'id': f'{split}-{i}', 'prompt': f'{a}*{b}=?', 'tag': 'tool',
                            'ground_truth': str(a * b)}) + '\n')
    paths[split] = path
  return paths


def transcript(record) -> list[str]:
  expr = record.messages[-1]['content'].rstrip('=?')
  return [f'<calc>{expr}</calc>', f'<answer>{record.ground_truth}</answer>']


def sampler_for(model_path: str):
  import transformers
  from flax import nnx
  from opd_jax import data as data_lib
  from opd_jax.rollout import multiturn
  from opd_jax.models import load_pretrained
  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  model = load_pretrained(model_path)
  graphdef, params = nnx.split(model)
  encoder = data_lib.PromptEncoder(tok, max_prompt_len=64)
  mt = multiturn.MultiTurnSampler(graphdef, tokenizer=tok, encoder=encoder,
                                  stop_ids=(tok.eos_token_id,), tag_to_env={'tool': 'tool'},
                                  budgets=multiturn.Budgets(**BUDGETS))
  return mt, model, params


def sft(model_spec: str, out: str, records, *, steps: int, lr: float, batch: int, seed: int):
  """SFT on replayed transcripts (loss on the student turns); writes an HF checkpoint."""
  import jax
  import numpy as np
  from flax import nnx
  from opd_jax.rollout import multiturn
  from opd_jax.models import tiny
  from opd_jax.config_lib import base_config
  from opd_jax.models import save_pretrained
  from opd_jax.training.update import LossSpec, UpdateBatch, make_optimizer, make_train_state, \
      make_update_fn
  if os.path.exists(os.path.join(out, 'config.json')):
    return out
  mt, model, params = sampler_for(tiny.resolve_model(model_spec))
  ep = multiturn.replay(mt, records, [transcript(r) for r in records], prompt_len=32)
  assert (ep.reward == 1).all(), 'the replayed transcripts must solve their problems'
  tokens, attn, lmask, _ = ep.host_arrays()
  optim = base_config().optim
  optim.lr, optim.warmup_steps, optim.schedule = lr, 20, 'cosine'
  tx, schedule = make_optimizer(optim, steps)
  update = make_update_fn(mt.graphdef, tx, schedule, LossSpec(kind='nll', remat=False))
  state = make_train_state(params, tx)
  rng = np.random.default_rng(seed)
  t0 = time.time()
  for step in range(1, steps + 1):
    idx = rng.choice(len(records), batch, replace=False)
    state, m = update(state, UpdateBatch(*(jax.numpy.asarray(x[idx]) for x in (
        tokens, attn, lmask))))
    if step % 50 == 0 or step == steps:
      print(f'  sft {os.path.basename(os.path.dirname(out))} step {step}/{steps} '
            f'nll {float(m["loss"]):.4f} ({time.time() - t0:.0f} s)', flush=True)
  save_pretrained(nnx.merge(mt.graphdef, state['params']), out)
  mt.tokenizer.save_pretrained(out)
  return out


def episode_eval(model_path: str, records, seed: int = 0) -> dict:
  import jax
  import numpy as np
  mt, _, params = sampler_for(model_path)
  ep = mt(params, records, jax.random.key(seed), temperature=0.0)
  # Partial credit: the first turn is the right call; the answer copies the tool's result.
  call_ok = [bool(t) and t[0].strip() == transcript(r)[0] for r, t in zip(records, ep.turn_texts)]
  copied = [len(t) > 1 and ok and t[1].strip() == transcript(r)[1]
            for r, t, ok in zip(records, ep.turn_texts, call_ok)]
  return {'reward': float(ep.reward.mean()), 'turns': float(ep.turns.mean()),
          'tool_errors': int(sum(e == 'tool_error' for e in ep.end)),
          'right_call': float(np.mean(call_ok)), 'copied_given_call': float(
              np.sum(copied) / max(1, np.sum(call_ok))), 'sample': ep.turn_texts[0]}


def opd_config(paths, teacher, student, *, steps, lr, seed, workdir):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))))
  from configs import opd_agentic
  c = opd_agentic.get_config('runlocal')
  c.unlock()
  c.seed = seed
  c.student.model = student
  c.student.remat = False
  c.teachers.teacher.model = teacher
  c.data.train = dict(tool=paths['train'])
  c.data.eval = dict(tool=paths['eval'])
  c.data.max_prompt_len = 64
  c.agent.tag_to_env = dict(tool='tool')
  c.agent.env_kwargs = {}
  for k, v in BUDGETS.items():
    c.agent[k] = v
  c.total_steps = steps
  c.eval_at_start = True
  c.eval_every = max(1, steps // 3)
  c.eval.num_prompts = 0
  c.eval.batch_size = 64
  c.eval.num_text_samples = 2
  c.rollout.prompts_per_step = 32
  c.rollout.n_samples = 1
  c.optim.lr = lr
  c.optim.warmup_steps = 0
  c.checkpoint.every = 0
  c.export.hf_dir = 'export'
  c.log_every = 1  # evaluations are logged at log steps only
  c.lock()
  return c


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--quick', action='store_true', help='a ~1-minute smoke run')
  ap.add_argument('--teacher-steps', type=int, default=600)
  ap.add_argument('--student-steps', type=int, default=60)
  ap.add_argument('--opd-steps', type=int, default=60)
  ap.add_argument('--opd-lr', type=float, default=1e-3)
  ap.add_argument('--student-model', default=STUDENT, help='the student before its SFT')
  args = ap.parse_args(argv)
  if args.quick:
    args.teacher_steps, args.student_steps, args.opd_steps = 40, 10, 4
  from opd_jax import data as data_lib
  from opd_jax.train import run
  t_start = time.time()
  w = args.workdir
  n_train, n_eval = (64, 16) if args.quick else (256, 64)
  paths = write_data(w, n_train, n_eval, args.seed)
  train = data_lib.read_jsonl(paths['train'])
  evals = data_lib.read_jsonl(paths['eval'])
  print('=== teacher', flush=True)
  teacher = sft(TEACHER, os.path.join(w, 'teacher'), train, steps=args.teacher_steps, lr=3e-3,
                batch=32, seed=args.seed)
  print('=== student', flush=True)
  student = sft(args.student_model, os.path.join(w, 'student'), train, steps=args.student_steps,
                lr=3e-3, batch=32, seed=args.seed + 1)
  t_eval = episode_eval(teacher, evals)
  print('teacher held-out:', t_eval, flush=True)
  print('=== opd', flush=True)
  result = run(opd_config(paths, teacher, student, steps=args.opd_steps, lr=args.opd_lr,
                          seed=args.seed, workdir=w), os.path.join(w, 'opd'))
  h = result['history']
  before = episode_eval(student, evals)
  after = episode_eval(os.path.join(w, 'opd', 'export'), evals)
  print('student before:', before, '\nstudent after:', after, flush=True)

  def at(key, step):
    return dict(h.get(key, [])).get(step)
  last = int(result['step'])
  rows = [('teacher (SFT on transcripts)', t_eval, None),
          ('student before OPD', before, at('eval/agent/reverse_kl', 0)),
          (f'student after {last} OPD steps', after, at('eval/agent/reverse_kl', last))]
  fmt = lambda x, f: '—' if x is None else format(x, f)
  lines = ['| model | held-out episode reward | right calculator call | answer copies the '
           'result (given the call) | turns | tool errors | reverse KL (student tokens) |',
           '|---|---|---|---|---|---|---|']
  lines += [f"| {n} | {e['reward']:.3f} | {e['right_call']:.3f} | {e['copied_given_call']:.3f} | "
            f"{e['turns']:.2f} | {e['tool_errors']} | {fmt(k, '.3f')} |" for n, e, k in rows]
  curve = ', '.join(f'{s}: {v:.3f}' for s, v in h.get('eval/accuracy/tool', []))
  lines.append('')
  lines.append(f'held-out reward by step: {curve}; {len(evals)} held-out problems, '
               f'{len(train)} training problems, wall {time.time() - t_start:.0f} s')
  text = '\n'.join(lines)
  with open(os.path.join(w, 'results.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
