"""Two jax.distributed processes on loopback (4 CPU devices each) train the runlocal recipe
and reach the same losses as one process with 8 devices and the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from _util import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ['-m', 'opd_jax.train', '--config', 'configs/opd_single_teacher.py:runlocal',
        '--config.total_steps=3', '--config.eval.num_prompts=4']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COORDINATOR')}
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(extra)
  return env


@pytest.mark.e2e
def test_two_processes_match_one(tmp_path):
  single = subprocess.run([sys.executable, *ARGS, '--workdir', str(tmp_path / 'one')],
                          cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, *ARGS, '--workdir', str(tmp_path / 'two')], cwd=ROOT,
      env=_env(4, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i}:\n{out[-3000:]}'
  # only process 0 logs progress and writes TensorBoard / the export
  assert 'step 3/3' in outs[0] and 'step 3/3' not in outs[1]

  one, two = read_events(str(tmp_path / 'one')), read_events(str(tmp_path / 'two'))
  for key in ('loss', 'opd/reverse_kl', 'rollout/response_len', 'grad_norm'):
    a, b = [v for _, v in one[key]], [v for _, v in two[key]]
    assert len(a) == len(b) == 3, key
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=key)
  assert os.path.exists(tmp_path / 'two' / 'checkpoints' / '3')
  assert os.path.exists(tmp_path / 'two' / 'export' / 'model.safetensors')
