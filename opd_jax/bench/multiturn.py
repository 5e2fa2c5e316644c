"""Multi-turn rollout throughput against single-turn at equal total tokens.

  python -m opd_jax.bench.multiturn --model /tmp/bench_model --make-model \
      --batch 16 --turns 4 --turn-tokens 32 --obs-chars 12

Episodes of `--turns` student turns of exactly `--turn-tokens` tokens each (the stop token
is masked out, so no turn ends early), separated by a fixed observation of `--obs-chars`
characters (plus its ChatML wrapping), run by `MultiTurnSampler`: every turn one jitted
decode loop, every observation one cached prefill of only its tokens, the environment on
the host in between. The single-turn baseline samples, from the same prompts, one response
as long as a whole episode after the prompt (student + observation tokens), so both hold
the same number of tokens in context; it generates all of them itself. Prints, as medians
over `--runs` timed runs after a warm-up: `multi_turn_student_tokens_per_s`,
`multi_turn_total_tokens_per_s` (observation tokens counted too), `single_turn_tokens_per_s`
and their ratio. `--make-model` writes the docs/benchmarks.md benchmark Qwen3 (hidden 256,
4 layers, char tokenizer padded to 2048) to --model first.
"""

import argparse
import statistics
import time


class FixedObservation:
  """A benchmark environment: the same observation after every turn, never done."""

  def __init__(self, chars: int = 12):
    self.obs = ('observation ' * (chars // 12 + 1))[:chars]

  def reset(self, record):
    return record['messages'][-1]['content']

  def step(self, student_text):
    return self.obs, False, 0.0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', required=True)
  ap.add_argument('--make-model', action='store_true')
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--turns', type=int, default=4)
  ap.add_argument('--turn-tokens', type=int, default=32)
  ap.add_argument('--obs-chars', type=int, default=12)
  ap.add_argument('--runs', type=int, default=3)
  args = ap.parse_args(argv)

  import jax
  import numpy as np
  import transformers
  from flax import nnx

  from opd_jax import data as data_lib
  from opd_jax import envs as envs_lib
  from opd_jax.rollout import multiturn
  from opd_jax.bench.sampler import make_bench_model
  from opd_jax.models import load_pretrained
  from opd_jax.rollout.decode import SamplingParams
  from opd_jax.rollout.sampler import Sampler

  if args.make_model:
    make_bench_model(args.model)
  if 'bench_fixed_obs' not in envs_lib.ENVS:
    envs_lib.register_env('bench_fixed_obs')(lambda: FixedObservation(args.obs_chars))
  tok = transformers.AutoTokenizer.from_pretrained(args.model)
  model = load_pretrained(args.model)
  graphdef, params = nnx.split(model)
  eos = tok.eos_token_id

  def no_stop(logits_BxV):  # every turn runs its whole budget
    return logits_BxV.at[:, eos].set(-1e9)

  encoder = data_lib.PromptEncoder(tok, max_prompt_len=256)
  records = [data_lib.Record(id=str(i), tag='bench', messages=[
      {'role': 'user', 'content': f'task {i}: ' + 'x' * (i % 7)}]) for i in range(args.batch)]
  obs_tokens = len(tok(FixedObservation(args.obs_chars).obs)['input_ids']) + 24
  budgets = multiturn.Budgets(
      max_turns=args.turns, max_tokens_per_turn=args.turn_tokens,
      max_episode_tokens=args.turns * (args.turn_tokens + obs_tokens),
      max_obs_tokens=obs_tokens)
  mt = multiturn.MultiTurnSampler(graphdef, tokenizer=tok, encoder=encoder, stop_ids=(eos,),
                                  tag_to_env={'bench': 'bench_fixed_obs'}, budgets=budgets,
                                  logits_fn=no_stop)
  sampler = Sampler(graphdef, pad_id=tok.pad_token_id or 0, logits_fn=no_stop)
  prompts = encoder.encode_batch(records)

  def episodes(seed):
    ep = mt(params, records, jax.random.key(seed))
    return ep, int(ep.student_tokens.sum()), int(ep.attn.sum())

  t0 = time.perf_counter()
  ep, student, total = episodes(0)
  compile_mt = time.perf_counter() - t0
  assert (ep.turns == args.turns).all(), ep.turns
  per_row = int(ep.attn.sum(-1).max())
  sp = SamplingParams(max_new_tokens=per_row, temperature=1.0, stop_ids=(eos,))

  def single(seed):
    out = sampler(params, prompts, jax.random.key(seed), sp)
    jax.block_until_ready(out.logprobs)
    return int(np.asarray(out.mask).sum())

  t0 = time.perf_counter()
  single_tokens = single(0)
  compile_st = time.perf_counter() - t0
  t_mt, t_st = [], []
  for i in range(args.runs):
    t0 = time.perf_counter()
    episodes(i + 1)
    t_mt.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    single(i + 1)
    t_st.append(time.perf_counter() - t0)
  mt_s, st_s = statistics.median(t_mt), statistics.median(t_st)
  print(f'model={args.model} params={model.cfg.num_params:,} ({jax.devices()[0].platform}) '
        f'batch={args.batch} turns={args.turns} turn_tokens={args.turn_tokens} '
        f'obs_tokens_per_row={(total - student) // args.batch} '
        f'tokens_after_prompt_per_row={per_row}')
  print(f'compile_and_first_run_s multi_turn={compile_mt:.2f} single_turn={compile_st:.2f}')
  print('multi_turn_run_s=' + ','.join(f'{t:.3f}' for t in t_mt))
  print('single_turn_run_s=' + ','.join(f'{t:.3f}' for t in t_st))
  print(f'multi_turn_student_tokens_per_s={student / mt_s:.1f}')
  print(f'multi_turn_total_tokens_per_s={total / mt_s:.1f}')
  print(f'single_turn_tokens_per_s={single_tokens / st_s:.1f}')
  print(f'multi_over_single_student_tokens_per_s={(student / mt_s) / (single_tokens / st_s):.3f}')


if __name__ == '__main__':
  main()
