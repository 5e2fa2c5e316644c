"""Pipelined OPD (rollout.max_staleness=1, docs/design.md §11): the batch trained on at update
k + 1 is the rollout of the parameters from before update k; exact resume with a batch in
flight (SIGKILL and a stop at a step); in-process teachers on their own devices; the config
checks. Nothing here is timed (python -m opd_jax.bench.pipeline measures the speed-up)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from opd_jax import sharding as shd
from opd_jax.train import ConfigError, load_data, run
from opd_jax.training import episodes as episodes_lib
from opd_jax.training.builder import build_run
from opd_jax.training.checkpoint import Checkpointer
from test_train import load_config, with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(total_steps=3, eval__num_prompts=2, export__hf_dir='', checkpoint__keep=10)


def _pipelined(**kw):
  return with_overrides(load_config('opd_single_teacher', 'runlocal'),
                        rollout__max_staleness=1, **dict(COMMON, **kw))


def _capture(store):
  def on_update(step, batch, metrics):
    store[step] = {k: np.asarray(jax.device_get(getattr(batch, k))) for k in
                   ('tokens', 'attention_mask', 'loss_mask', 'behaviour_logprobs',
                    'advantages')}
    store[step]['staleness'] = metrics.get('pipeline/staleness')
  return on_update


def test_the_batch_of_update_k_plus_1_is_the_rollout_of_the_params_before_update_k(tmp_path):
  config = _pipelined()
  seen = {}
  result = run(config, str(tmp_path / 'run'), on_update=_capture(seen))
  assert result['step'] == 3 and [seen[k]['staleness'] for k in (1, 2, 3)] == [0, 1, 1]
  ratios = dict(result['history']['is/ratio_mean'])
  assert ratios[1] == pytest.approx(1.0, abs=1e-5) and ratios[3] != pytest.approx(1.0, abs=1e-7)
  # Rebuild the run and sample each batch independently: batch k with the parameters after
  # update k - 2 (the checkpoint of step k - 2; the initial ones for k <= 2), the k-th
  # prompts of the data stream, and step k's key.
  mesh = shd.make_mesh(dict(config.mesh))
  data = load_data(config)
  r = build_run(config, mesh, tokenizer=data.tokenizer)
  engine = episodes_lib.rollout_engine(config, r, data.tokenizer, data.encoder)
  cast = r.cast_fn()
  ckpt = Checkpointer(str(tmp_path / 'run'), every=1, keep=10, async_save=False)
  template = r.init_state()
  params = {0: template['params']}
  for k in (1,):
    params[k] = ckpt.restore(k, dict(template, behaviour_params=template['params']))[0]['params']
  n = int(config.rollout.n_samples)
  for k in (1, 2, 3):
    records = [x for x in data.prompts.next_batch(config.rollout.prompts_per_step)
               for _ in range(n)]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), k), 0)
    got = engine(cast(params[max(k - 2, 0)]), records, key)
    np.testing.assert_array_equal(np.asarray(got.tokens), seen[k]['tokens'], err_msg=f'step {k}')
    np.testing.assert_array_equal(np.asarray(got.loss_mask), seen[k]['loss_mask'])
    np.testing.assert_allclose(np.asarray(got.behaviour_logprobs),
                               seen[k]['behaviour_logprobs'], atol=1e-6, rtol=0)
  ckpt.close()


def test_max_staleness_0_is_the_synchronous_loop_and_step_1_agrees(tmp_path):
  sync_seen, pipe_seen = {}, {}
  sync = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), **COMMON),
             str(tmp_path / 'sync'), on_update=_capture(sync_seen))
  pipe = run(_pipelined(), str(tmp_path / 'pipe'), on_update=_capture(pipe_seen))
  assert 'pipeline/staleness' not in sync['history'] and sync_seen[1]['staleness'] is None
  # Batch 1 and update 1 are the same in both (same parameters, prompts and key); batch 2 is
  # sampled from the same initial parameters as batch 1 when pipelined.
  for key in ('tokens', 'behaviour_logprobs', 'advantages'):
    np.testing.assert_array_equal(sync_seen[1][key], pipe_seen[1][key])
  assert dict(sync['history']['loss'])[1] == dict(pipe['history']['loss'])[1]
  assert not np.array_equal(sync_seen[2]['behaviour_logprobs'], pipe_seen[2]['behaviour_logprobs'])


def _weights(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, 'export', 'model.safetensors'))


def _assert_same_weights(a, b):
  wa, wb = _weights(a), _weights(b)
  assert sorted(wa) == sorted(wb)
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_a_stop_with_a_batch_in_flight_resumes_to_the_uninterrupted_weights(tmp_path):
  """debug.stop_at_step (the SIGTERM path): the run saves at step 2 and drops batch 3, which
  was in flight; the resumed run samples it again from the saved sampling parameters."""
  kw = dict(total_steps=4, export__hf_dir='export')
  whole = run(_pipelined(**kw), str(tmp_path / 'whole'))
  first = run(_pipelined(debug__stop_at_step=2, **kw), str(tmp_path / 'cut'))
  assert first['preempted'] and first['step'] == 2
  resumed = run(_pipelined(**kw), str(tmp_path / 'cut'))
  assert resumed['step'] == 4
  _assert_same_weights(tmp_path / 'whole', tmp_path / 'cut')
  for key in ('loss', 'is/ratio_mean', 'opd/reverse_kl'):
    assert resumed['history'][key] == whole['history'][key], key
  assert resumed['history']['compute/flops/total'] == whole['history']['compute/flops/total']


def test_sigkill_with_a_batch_in_flight_then_resume_gives_the_uninterrupted_weights(tmp_path):
  steps = 6
  kw = dict(total_steps=steps, export__hf_dir='export')
  whole = run(_pipelined(**kw), str(tmp_path / 'whole'))
  workdir = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'opd_jax.train', '--config',
         os.path.join(ROOT, 'configs', 'opd_single_teacher.py') + ':runlocal',
         '--workdir', str(workdir), '--config.rollout.max_staleness=1',
         f'--config.total_steps={steps}', '--config.eval.num_prompts=2',
         '--config.checkpoint.keep=10']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 600
    while not (workdir / 'checkpoints' / '2').is_dir():
      assert proc.poll() is None, 'the trainer exited before its step 2 checkpoint'
      assert time.monotonic() < deadline
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  last = Checkpointer(str(workdir), every=1).latest_step()
  assert 2 <= last < steps, last  # killed mid-run, a batch in flight
  resumed = run(_pipelined(**kw), str(workdir))
  assert resumed['step'] == steps
  _assert_same_weights(tmp_path / 'whole', workdir)
  assert resumed['history']['loss'] == whole['history']['loss']


def test_teacher_on_its_own_devices_gives_the_same_pipelined_run(tmp_path):
  """An in-process teacher on its own device slice (teachers.X.devices): its scoring of batch
  k + 1 is dispatched before update k and read only when batch k + 1 is trained on; the run
  equals the one with the teacher on the student's mesh."""
  shared = run(_pipelined(), str(tmp_path / 'shared'))
  own = run(_pipelined(teachers__teacher__devices='4:8'), str(tmp_path / 'own'))
  for key in ('loss', 'opd/reverse_kl', 'is/ratio_mean', 'grad_norm'):
    a, b = dict(shared['history'][key]), dict(own['history'][key])
    assert sorted(a) == [1, 2, 3]
    for step in a:
      assert b[step] == pytest.approx(a[step], abs=1e-5), (key, step)
  assert own['tokens_scored'] == shared['tokens_scored']


def test_pipeline_config_errors_name_the_field(tmp_path):
  cases = [
      (dict(rollout__max_staleness=2), r'config.rollout.max_staleness=2: 0 \(synchronous\) or 1'),
      (dict(rollout__max_staleness=1, mode='sft'), r"config.rollout.max_staleness=1 applies to "
                                                   r"config.mode='opd'"),
      (dict(loss__tis_cap=0.0), r'config.loss.tis_cap=0.0: the truncation cap'),
      (dict(loss__tis_cap=2.0, loss__clip_eps=0.2), r'config.loss.tis_cap=2.0 with '
                                                    r'config.loss.clip_eps=0.2'),
  ]
  for overrides, pattern in cases:
    config = with_overrides(load_config('opd_single_teacher', 'runlocal'), **overrides)
    with pytest.raises(ConfigError, match=pattern):
      run(config, str(tmp_path / 'w'))


def test_pipelined_run_with_truncated_is_logs_the_truncated_share(tmp_path):
  plain = run(_pipelined(), str(tmp_path / 'plain'))
  tis = run(_pipelined(loss__tis_cap=1.0), str(tmp_path / 'tis'))
  frac = dict(tis['history']['is/tis_frac'])
  assert all(0.0 <= v <= 1.0 for v in frac.values()) and sorted(frac) == [1, 2, 3]
  # Update 1 is on-policy (rho = 1 up to rounding), so truncating at C = 1 changes nothing.
  assert dict(tis['history']['loss'])[1] == pytest.approx(dict(plain['history']['loss'])[1],
                                                          abs=1e-6)
  assert dict(tis['history']['pipeline/staleness'])[3] == 1.0
