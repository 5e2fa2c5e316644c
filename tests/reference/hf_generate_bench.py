"""Reference throughput: transformers' generate() (PyTorch, CPU) on the same checkpoint,
batch and lengths as `python -m opd_jax.bench.sampler`, with per-token logprobs through
`output_scores` + `compute_transition_scores`. torch lives only in tests/, never in opd_jax.

  python tests/reference/hf_generate_bench.py --model DIR --batch 16 --prompt-len 32 --new-tokens 64
"""

import argparse
import statistics
import time

import numpy as np
import torch
import transformers


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--model', required=True)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--prompt-len', type=int, default=32)
  ap.add_argument('--new-tokens', type=int, default=64)
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = default)')
  args = ap.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
  model.eval()
  rng = np.random.RandomState(0)
  ids = torch.tensor(rng.randint(1, model.config.vocab_size, (args.batch, args.prompt_len)))
  mask = torch.ones_like(ids)

  def run(seed):
    torch.manual_seed(seed)
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=0)
      logp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return out.sequences[:, args.prompt_len:], logp

  t0 = time.perf_counter()
  seqs, _ = run(0)
  first = time.perf_counter() - t0
  times = []
  for i in range(args.runs):
    t0 = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - t0)
  n = seqs.numel()
  print(f'transformers={transformers.__version__} torch={torch.__version__} '
        f'threads={torch.get_num_threads()} batch={args.batch} prompt_len={args.prompt_len} '
        f'new_tokens={args.new_tokens}')
  print(f'first_run_s={first:.2f}')
  print('run_s=' + ','.join(f'{t:.4f}' for t in times))
  print(f'tokens_per_s={n / statistics.median(times):.1f}')


if __name__ == '__main__':
  main()
