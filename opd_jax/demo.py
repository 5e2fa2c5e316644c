"""CPU demo. Until the trainer lands this is a model smoke run: it writes a tiny random Qwen3
checkpoint, loads it sharded over the local devices, runs a forward pass and exports it."""

import argparse
import os
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='runs/demo')
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from opd_jax import sharding
  from opd_jax.models import load_pretrained, save_pretrained
  from opd_jax.tiny import make_tiny_checkpoint

  t0 = time.time()
  path = make_tiny_checkpoint(os.path.join(args.workdir, 'tiny_qwen3'))
  mesh = sharding.make_mesh({'fsdp': -1})
  model = load_pretrained(path, mesh=mesh)
  ids = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (jax.device_count(), 16))
  logits = model(jnp.asarray(ids, jnp.int32))
  save_pretrained(model, os.path.join(args.workdir, 'export'))
  print(f'devices={jax.device_count()} params={model.cfg.num_params} '
        f'logits={tuple(logits.shape)} finite={bool(jnp.isfinite(logits).all())} '
        f'time={time.time() - t0:.1f}s')


if __name__ == '__main__':
  main()
