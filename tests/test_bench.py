"""Quick checks of the benchmark pipelines (never of a speed)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_bench_tiny(tmp_path, capsys):
  from opd_jax.bench import step
  from opd_jax.tiny import build_char_tokenizer, make_tiny_checkpoint
  tok = build_char_tokenizer(vocab_size=256)
  s = make_tiny_checkpoint(str(tmp_path / 's'), hidden_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, tokenizer=tok, seed=0)
  t = make_tiny_checkpoint(str(tmp_path / 't'), hidden_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, tokenizer=tok, seed=1)
  step.main(['--student', s, '--teacher', t, '--batch', '8', '--prompt-len', '6',
             '--new-tokens', '4', '--steps', '1', '--peak-size', '64'])
  out = capsys.readouterr().out
  assert re.search(r'^tokens_per_s=[0-9.]+$', out.strip().splitlines()[-1])
  flops = dict(re.findall(r'phase=(\w+) s=\S+ flops=(\S+)', out))
  assert set(flops) == {'rollout', 'scoring', 'update', 'step'}
  parts = sum(float(flops[k]) for k in ('rollout', 'scoring', 'update'))
  assert all(float(flops[k]) > 0 for k in flops)
  assert abs(parts - float(flops['step'])) <= 1e-3 * parts
  assert 'warning: prompts encode' not in out


def test_accelerator_dry_run():
  env = dict(os.environ, DRY_RUN='1', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  p = subprocess.run(['bash', os.path.join(ROOT, 'bench', 'accelerator.sh')], env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'update_mfu=' in p.stdout and 'decode_hbm_GBps=' in p.stdout
  assert 'ACCELERATOR_CHECK_DONE' in p.stdout
