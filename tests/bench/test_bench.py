"""Quick checks of the benchmark pipelines (never of a speed)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_pair(tmp_path):
  from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
  tok = build_char_tokenizer(vocab_size=256)
  s = make_tiny_checkpoint(str(tmp_path / 's'), hidden_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, tokenizer=tok, seed=0)
  t = make_tiny_checkpoint(str(tmp_path / 't'), hidden_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, tokenizer=tok, seed=1)
  return s, t


def _check_step_output(out):
  assert re.search(r'^tokens_per_s=[0-9.]+$', out.strip().splitlines()[-1])
  flops = dict(re.findall(r'phase=(\w+) s=\S+ flops=(\S+)', out))
  assert set(flops) == {'rollout', 'scoring', 'update', 'step'}
  parts = sum(float(flops[k]) for k in ('rollout', 'scoring', 'update'))
  assert all(float(flops[k]) > 0 for k in flops)
  assert abs(parts - float(flops['step'])) <= 1e-3 * parts
  assert 'warning: prompts encode' not in out


def test_step_bench_tiny(tmp_path, capsys):
  from opd_jax.bench import step
  s, t = _tiny_pair(tmp_path)
  step.main(['--student', s, '--teacher', t, '--batch', '8', '--prompt-len', '6',
             '--new-tokens', '4', '--steps', '1', '--peak-size', '64'])
  out = capsys.readouterr().out
  _check_step_output(out)
  assert re.search(r'^rollout_path=static$', out, re.M)
  assert re.search(r'^mean_response_len=4\.0$', out, re.M)  # the stop token is masked


def test_step_bench_continuous_with_stop_bias(tmp_path, capsys):
  """--slots R < --batch: the rollout runs on the continuous sampler (the trainer's path for
  config.rollout.slots), with the --eos-prob stop bias; --slots >= --batch stays static."""
  from opd_jax.bench import step
  s, t = _tiny_pair(tmp_path)
  common = ['--student', s, '--teacher', t, '--batch', '16', '--prompt-len', '6',
            '--new-tokens', '8', '--steps', '1', '--peak-size', '64', '--eos-prob', '0.3']
  step.main(common + ['--slots', '2'])
  out = capsys.readouterr().out
  _check_step_output(out)
  # slots round up to the data axes (8 fake devices in the tests): R = 8 < 16 rows
  m = re.search(r'^rollout_path=continuous .*\bsegments=(\d+) refills=(\d+) .*\bslots=(\d+)\b',
                out, re.M)
  assert m and int(m.group(1)) > 1 and int(m.group(2)) > 1 and int(m.group(3)) < 16, out
  lens = [float(x) for x in re.search(r'^mean_response_len=(\S+)$', out, re.M).group(1)
          .split(',')]
  assert all(1 <= x <= 8 for x in lens)
  step.main(common + ['--slots', '16'])
  out = capsys.readouterr().out
  assert 'rollout_path=static (--slots 16: 16 rows do not exceed 16 slots)' in out


def test_trl_stop_bias_matches_the_project_logits_fn():
  """The TRL reference's LogitsProcessor raises the stop token exactly as bench.step's
  logits_fn does (p(stop) = P per step; P = 0: removed), on the same logits."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import importlib.util
  import jax
  import numpy as np
  from opd_jax.bench.rollout import stop_bias_fn
  spec = importlib.util.spec_from_file_location(
      'trl_distill_bench', os.path.join(ROOT, 'tests', 'reference', 'trl_distill_bench.py'))
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)  # imports only argparse/math/statistics/time at the top
  logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
  for p in (0.05, 0.3, 0.0):
    want = np.asarray(stop_bias_fn(7, p)(jax.numpy.asarray(logits)))
    got = ref.make_stop_bias(7, p)(None, torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    probs = np.asarray(jax.nn.softmax(want, -1))
    np.testing.assert_allclose(probs[:, 7], p, atol=1e-6)


def test_accelerator_dry_run():
  env = dict(os.environ, DRY_RUN='1', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  p = subprocess.run(['bash', os.path.join(ROOT, 'bench', 'accelerator.sh')], env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'update_mfu=' in p.stdout and 'decode_hbm_GBps=' in p.stdout
  assert 'ACCELERATOR_CHECK_DONE' in p.stdout


@pytest.mark.e2e
def test_pipeline_bench_quick(capsys):
  """The pipelined-vs-synchronous benchmark end to end on tiny settings: a served teacher, two
  pinned training runs, the ratio line (its value is not checked)."""
  import shutil
  if shutil.which('taskset') is None:
    pytest.skip('taskset is not installed')
  from opd_jax.bench import pipeline
  env = dict(os.environ)
  pipeline.main(['--steps', '3', '--warmup', '1', '--prompts', '2', '--new-tokens', '8',
                 '--max-len', '16'])
  # the server's one-device XLA_FLAGS went to its process only: later subprocesses of this
  # session (e.g. tests/test_pipeline.py's trainer) keep the 8 fake devices
  assert dict(os.environ) == env
  out = capsys.readouterr().out
  assert re.search(r'^core_parallelism=[0-9.]+ ', out, re.M)
  runs = re.findall(r'^  max_staleness=(\d) steps_per_s=[0-9.]+ .*server_new_compiles=\d+', out,
                    re.M)
  assert runs == ['0', '1'], out
  assert 'pipeline/staleness=1.000' in out and 'perf/scoring_wait_s=' in out
  assert re.search(r'^pipelined_over_sync=[0-9.]+$', out.strip().splitlines()[-1])
