"""LoRA vs full fine-tuning: optimizer-state memory and the update's time.

  python -m opd_jax.bench.lora --model DIR --make-model --rank 16 --batch 8 --seq 256 --runs 5

Builds both train states the trainer would (`update.make_train_state`: full = every
parameter; LoRA = the adapters of `--targets`, docs/design.md §9) from one checkpoint and
prints their byte counts from the actual pytrees (`opt_state_bytes`, `state_bytes` =
params + optimizer state; LoRA's frozen base is reported apart as `frozen_base_bytes`).
Then it times the jitted update (`update.make_update_fn`, the 'pg' loss on a random batch
of `--batch` x `--seq` tokens, fp32, remat) alternating full / LoRA for `--runs` rounds
after one warm-up each, and prints every time and `update_s full=<median> lora=<median>`.
`--make-model` first writes a random Qwen3 (`--hidden`, `--layers`, `--vocab`) to DIR if it
has no config.json.
"""

import argparse
import os
import statistics
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', required=True)
  ap.add_argument('--make-model', action='store_true')
  ap.add_argument('--hidden', type=int, default=512)
  ap.add_argument('--layers', type=int, default=4)
  ap.add_argument('--vocab', type=int, default=2048)
  ap.add_argument('--rank', type=int, default=16)
  ap.add_argument('--alpha', type=float, default=32.0)
  ap.add_argument('--targets', default=None, help='regex (default: the 7 projections)')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq', type=int, default=256)
  ap.add_argument('--runs', type=int, default=5)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from ml_collections import ConfigDict

  from opd_jax.models import lora
  from opd_jax.config_lib import LORA_TARGETS
  from opd_jax.models import load_pretrained
  from opd_jax.models.decoder import LoraSpec
  from opd_jax.training.update import LossSpec, make_optimizer, make_train_state, make_update_fn

  if args.make_model and not os.path.exists(os.path.join(args.model, 'config.json')):
    from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
    make_tiny_checkpoint(args.model, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 128),
                         tokenizer=build_char_tokenizer(vocab_size=args.vocab), seed=0)
  model = load_pretrained(args.model)
  graphdef, params = nnx.split(model)
  # Committed to the device like the trainer's arrays (a first call on uncommitted inputs
  # would compile the step a second time once its outputs come back committed).
  params = jax.device_put(params, jax.devices()[0])
  spec = LoraSpec(args.rank, args.alpha, args.targets or LORA_TARGETS)
  lgraph, adapters = lora.init_adapters(model.cfg, model.hf_config, spec,
                                        jax.tree.map(lambda x: x.sharding, params), jnp.float32)
  tx, sched = make_optimizer(ConfigDict(dict(
      lr=1e-4, schedule='constant', warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999,
      eps=1e-8, grad_clip=1.0)), total_steps=1000)
  loss = LossSpec(kind='pg', remat=True)

  def nbytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))

  states = jax.device_put({'full': make_train_state(jax.tree.map(jnp.copy, params), tx),
                           'lora': make_train_state(adapters, tx)}, jax.devices()[0])
  fns = {'full': make_update_fn(graphdef, tx, sched, loss),
         'lora': make_update_fn(lgraph, tx, sched, loss, frozen=params)}
  print(f'model={args.model} params={lora.num_params(params)} layers={model.cfg.num_layers} '
        f'hidden={model.cfg.hidden_size} rank={args.rank} '
        f'adapter_params={lora.num_params(adapters)} batch={args.batch} seq={args.seq}')
  for k, st in states.items():
    print(f'{k}: opt_state_bytes={nbytes(st["opt_state"])} '
          f'state_bytes={nbytes(st["params"]) + nbytes(st["opt_state"])}'
          + (f' frozen_base_bytes={nbytes(params)}' if k == 'lora' else ''))
  rng = np.random.RandomState(0)
  b, t = args.batch, args.seq
  lmask = np.zeros((b, t), np.float32)
  lmask[:, t // 4:] = 1
  batch = {'tokens': jnp.asarray(rng.randint(0, model.cfg.vocab_size, (b, t)), jnp.int32),
           'attention_mask': jnp.ones((b, t), jnp.int32), 'loss_mask': jnp.asarray(lmask),
           'behaviour_logprobs': jnp.asarray(-3.0 * lmask),
           'advantages': jnp.asarray(rng.randn(b, t).astype(np.float32) * lmask)}

  def step(k):
    t0 = time.perf_counter()
    states[k], m = fns[k](states[k], batch)
    jax.block_until_ready(m['loss'])
    return time.perf_counter() - t0

  for k in fns:
    print(f'{k}: compile+first_s={step(k):.3f}')
  times = {k: [] for k in fns}
  for i in range(args.runs):
    for k in (('full', 'lora') if i % 2 == 0 else ('lora', 'full')):
      times[k].append(step(k))
  for k, v in times.items():
    print(f'{k}: update_s=' + ' '.join(f'{x:.3f}' for x in v))
  full, lo = statistics.median(times['full']), statistics.median(times['lora'])
  print(f'update_s full={full:.4f} lora={lo:.4f} lora_over_full={lo / full:.3f}')


if __name__ == '__main__':
  main()
