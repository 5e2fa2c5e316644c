"""TRL reference: seconds per on-policy distillation step on the bench.step checkpoints.

  /tmp/trl-venv/bin/python tests/reference/trl_distill_bench.py --student DIR --teacher DIR \
      --batch 16 --prompt-len 32 --new-tokens 64 [--eos-prob P] [--steps K]

Uses trl 1.16's `DistillationTrainer` (on-policy: the student generates, the teacher scores;
beta=1 = reverse KL). Prompts: exactly --prompt-len random characters. Fixed lengths (no
--eos-prob): min_new_tokens = max_new_tokens = --new-tokens. --eos-prob P: `StopBias`, a
transformers LogitsProcessor that is the torch twin of opd_jax.bench.rollout.stop_bias_fn
(the stop logit becomes logsumexp(others) + log(P / (1 - P)), so p(stop) = P at every step;
tests/bench/test_bench.py checks the two agree), is passed to the student's `generate()` on every
rollout (DistillationTrainer builds its GenerationConfig itself and has no logits-processor
argument, so the student's `generate` is wrapped), and the stop token is the one bench.step
uses: the smallest of the checkpoint's and the tokenizer's eos ids (opd_jax.training.builder.stop_ids).
Prints per-step seconds, the mean completion length per step, and `s_per_step=<median>`
(after one warm-up step). Run in the separate venv made by tests/reference/make_trl_env.sh,
never the project's.
"""

import argparse
import math
import statistics
import time


def make_stop_bias(stop: int, eos_prob: float):
  """A transformers LogitsProcessor doing what opd_jax.bench.rollout.stop_bias_fn does to a
  step's logits [B, V]: p(stop) = eos_prob exactly (eos_prob 0: the stop token removed)."""
  import torch
  import transformers
  log_odds = math.log(eos_prob / (1 - eos_prob)) if eos_prob else None

  class StopBias(transformers.LogitsProcessor):
    def __call__(self, input_ids, scores):
      scores = scores.clone()
      if log_odds is None:
        scores[:, stop] = -float('inf')
        return scores
      others = scores.clone()
      others[:, stop] = -float('inf')
      scores[:, stop] = torch.logsumexp(others, dim=-1) + log_odds
      return scores
  return StopBias()


def stop_id(model_dir: str, tok) -> int:
  """bench.step's stop token: min of config.json's eos ids and the tokenizer's eos."""
  import json
  import os
  with open(os.path.join(model_dir, 'config.json')) as f:
    eos = json.load(f).get('eos_token_id')
  ids = {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
  if tok.eos_token_id is not None:
    ids.add(int(tok.eos_token_id))
  return min(ids) if ids else 1


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--student', required=True)
  ap.add_argument('--teacher', required=True)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--prompt-len', type=int, default=32)
  ap.add_argument('--new-tokens', type=int, default=64)
  ap.add_argument('--eos-prob', type=float, default=0.0)
  ap.add_argument('--steps', type=int, default=3)
  args = ap.parse_args()
  import functools
  import numpy as np
  import torch
  import transformers
  import trl
  from datasets import Dataset

  torch.manual_seed(0)
  tok = transformers.AutoTokenizer.from_pretrained(args.student)
  student = transformers.AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
  teacher = transformers.AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
  rng = np.random.RandomState(0)
  alphabet = list('abcdefghijklmnopqrstuvwxyz0123456789')
  n = args.batch * (args.steps + 1)
  rows = [{'prompt': ''.join(rng.choice(alphabet, args.prompt_len))} for _ in range(n)]
  ds = Dataset.from_list(rows)
  lengths = []  # generated tokens per row, per rollout (up to and including the stop token)
  if args.eos_prob:
    stop = stop_id(args.student, tok)
    gk = {'eos_token_id': [stop]}  # bench.step stops on this one id only
    bias = transformers.LogitsProcessorList([make_stop_bias(stop, args.eos_prob)])
    generate = student.generate

    @functools.wraps(generate)
    def generate_with_stop_bias(*a, **k):
      k.setdefault('logits_processor', bias)
      out = generate(*a, **k)
      new = out[:, k['input_ids'].shape[1]:]
      hit = new == stop
      lengths.append(torch.where(hit.any(1), hit.int().argmax(1) + 1,
                                 torch.tensor(new.shape[1])).float().mean().item())
      return out
    student.generate = generate_with_stop_bias
  else:
    stop = None
    gk = {'min_new_tokens': args.new_tokens}
  print('trl', trl.__version__, 'torch', torch.__version__, 'threads', torch.get_num_threads(),
        'has DistillationTrainer:', hasattr(trl, 'DistillationTrainer'),
        f'eos_prob={args.eos_prob} stop={stop}')
  cfg = trl.DistillationConfig(
      output_dir='/tmp/trl_bench_out', per_device_train_batch_size=args.batch,
      max_steps=args.steps + 1, beta=1.0, temperature=1.0, max_completion_length=args.new_tokens,
      generation_kwargs=gk, learning_rate=1e-5, logging_steps=1, report_to=[],
      save_strategy='no', use_cpu=True, seed=0)
  tr = trl.DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                               processing_class=tok)
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, *a, **k): self.t0 = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t0)
  tr.add_callback(Timer())
  tr.train()
  print('step_s=' + ','.join(f'{t:.4f}' for t in times))
  if lengths:
    print('mean_response_len=' + ','.join(f'{x:.1f}' for x in lengths))
  print(f's_per_step={statistics.median(times[1:] or times):.4f}')


if __name__ == '__main__':
  main()
