"""TRL reference: seconds per on-policy distillation step on the bench.step checkpoints.

  /tmp/trl-venv/bin/python tests/reference/trl_distill_bench.py --student DIR --teacher DIR \
      --batch 16 --prompt-len 32 --new-tokens 64 [--eos-prob P] [--steps K]

Uses trl 1.16's `DistillationTrainer` (on-policy: the student generates, the teacher scores;
beta=1 = reverse KL). --eos-prob is NOT applied on the TRL side yet (no hook for a
LogitsProcessor in its generation path was wired); only fixed lengths are comparable. Prompts: exactly --prompt-len random characters. Fixed
lengths: min_new_tokens = max_new_tokens = --new-tokens. --eos-prob: a LogitsProcessor sets
p(eos) = P. Prints per-step seconds and `s_per_step=<median>` (after one warm-up step).
Run in the separate venv made by tests/reference/make_trl_env.sh, never the project's.
"""

import argparse
import math
import statistics
import time


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
  gen = dict(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0)
  if args.eos_prob:
    lo = math.log(args.eos_prob / (1 - args.eos_prob))
    eos = tok.eos_token_id

    class StopBias(transformers.LogitsProcessor):
      def __call__(self, input_ids, scores):
        others = scores.clone(); others[:, eos] = -float('inf')
        scores[:, eos] = torch.logsumexp(others, -1) + lo
        return scores
    gen['logits_processor'] = transformers.LogitsProcessorList([StopBias()])
  else:
    gen['min_new_tokens'] = args.new_tokens
  print('trl', trl.__version__, 'torch', torch.__version__, 'threads', torch.get_num_threads(),
        'has DistillationTrainer:', hasattr(trl, 'DistillationTrainer'))
  gk = {'min_new_tokens': args.new_tokens} if not args.eos_prob else {}
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
  print(f's_per_step={statistics.median(times[1:] or times):.4f}')


if __name__ == '__main__':
  main()
