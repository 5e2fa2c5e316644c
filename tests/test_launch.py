"""launch/: the scripts parse and pass shellcheck, print their usage, pass the trainer's
arguments through every layer of quoting, survive a preemption (against a fake gcloud that
plays a queued resource's life), and launch/local.sh runs a real two-step training."""

import glob
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'launch', '*.sh')))
USER_SCRIPTS = ['local.sh', 'setup_worker.sh', 'tpu_pod.sh', 'tpu_queued.sh']

# Trainer arguments that break naive quoting: spaces, a quote, $, a glob, an = in a value.
TRAIN_ARGS = ['--config', 'configs/opd_single_teacher.py', '--workdir', '/mnt/opd/runs/my run',
              "--config.data.train.math=/data/it's $HOME/*.jsonl", '--config.optim.lr=1e-5',
              '--config.student.model=/ckpt/Qwen3-1.7B']


def sh(*args, env=None, timeout=60, check=True):
  out = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  return out


def commands(stdout):
  """The commands a --dry-run printed ('+ cmd args...'), each split back into argv."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def remote_trainer_argv(argv):
  """The trainer's argv inside `gcloud ... ssh --command=...` (split as the worker's shell
  would), or None if this command does not run the trainer."""
  cmd = next((a[len('--command='):] for a in argv if a.startswith('--command=')), None)
  if cmd is None or 'opd_jax.train' not in cmd:
    return None
  words = shlex.split(cmd)
  i = words.index('opd_jax.train')
  return words[i + 1:]


def test_all_user_scripts_exist():
  assert sorted(os.path.basename(s) for s in SCRIPTS) == sorted(USER_SCRIPTS)
  for s in SCRIPTS:
    assert os.stat(s).st_mode & stat.S_IXUSR, f'{s} is not executable'
    assert os.path.exists(os.path.join(ROOT, 'launch', 'README.md'))


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  sh('bash', '-n', script)
  with open(script) as f:
    lines = f.read().splitlines()
  assert lines[0] == '#!/usr/bin/env bash' and lines[1].startswith('# Usage: launch/')
  assert 'set -euo pipefail' in lines


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (apt-get install shellcheck)')
def test_shellcheck_clean():
  out = sh('shellcheck', *SCRIPTS, check=False)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize('script', USER_SCRIPTS)
def test_help_prints_the_usage_block(script):
  out = sh(os.path.join('launch', script), '--help')
  assert out.stdout.startswith(f'Usage: launch/{script}')
  assert 'Options:' in out.stdout and '--help' in out.stdout and 'set -euo' not in out.stdout


def test_unknown_option_is_an_error_that_names_it():
  out = sh('launch/tpu_pod.sh', '--bogus', '--', *TRAIN_ARGS, check=False)
  assert out.returncode == 2 and "'--bogus'" in out.stderr
  out = sh('launch/tpu_pod.sh', '--dry-run', '--', '--workdir', '/x', '--config.seed=1',
           check=False)
  assert out.returncode == 2 and 'need --config' in out.stderr
  for script in USER_SCRIPTS:
    out = sh(f'launch/{script}', '--venv' if script == 'setup_worker.sh' else '--nproc'
             if script == 'local.sh' else '--zone', check=False)
    assert out.returncode == 2 and 'needs a value' in out.stderr, (script, out.stderr)


def test_tpu_pod_dry_run_creates_copies_sets_up_and_runs_with_exact_arguments():
  out = sh('launch/tpu_pod.sh', '--dry-run', '--name', 'opd-v5e16', '--zone', 'us-west4-a',
           '--project', 'my-proj', '--accelerator-type', 'v5litepod-16',
           '--env', 'HF_HOME=/mnt/hf cache', '--', *TRAIN_ARGS)
  cmds = commands(out.stdout)
  gflags = ['--zone=us-west4-a', '--project=my-proj']
  create = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']]
  assert create == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'opd-v5e16', *gflags,
                     '--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite']]
  assert any(c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in c
             for c in cmds)
  ssh = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert all(c[5] == 'opd-v5e16' and '--worker=all' in c and all(g in c for g in gflags)
             for c in ssh)
  assert any('setup_worker.sh' in a for c in ssh for a in c)
  runs = [remote_trainer_argv(c) for c in ssh if remote_trainer_argv(c) is not None]
  assert runs == [TRAIN_ARGS + ['--config.distributed=True']]
  remote = next(a for c in ssh for a in c if 'opd_jax.train' in a)
  assert shlex.split(remote)[shlex.split(remote).index('env') + 1] == 'HF_HOME=/mnt/hf cache'


def test_tpu_pod_dry_run_keeps_an_explicit_distributed_flag_and_supports_spot_and_repo():
  out = sh('launch/tpu_pod.sh', '--dry-run', '--spot', '--repo', 'https://example.com/o.git',
           '--ref', 'v1.0', '--accelerator-type', 'v4-32', '--', *TRAIN_ARGS,
           '--config.distributed=False')
  cmds = commands(out.stdout)
  create = next(c for c in cmds if 'create' in c)
  assert '--spot' in create and '--version=tpu-ubuntu2204-base' in create
  assert not any('scp' in c for c in cmds)
  clone = next(a for c in cmds for a in c if 'git clone' in a)
  assert 'https://example.com/o.git' in clone and 'v1.0' in clone
  runs = [remote_trainer_argv(c) for c in cmds if remote_trainer_argv(c) is not None]
  assert runs == [TRAIN_ARGS + ['--config.distributed=False']]


def test_tpu_queued_dry_run_requests_a_spot_slice_and_runs_on_it():
  out = sh('launch/tpu_queued.sh', '--dry-run', '--name', 'opd-v5e16', '--zone', 'us-west4-a',
           '--', *TRAIN_ARGS)
  cmds = commands(out.stdout)
  qr_create = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources',
                                            'create']]
  assert qr_create == [['gcloud', 'compute', 'tpus', 'queued-resources', 'create',
                        'opd-v5e16-qr', '--zone=us-west4-a', '--node-id=opd-v5e16',
                        '--accelerator-type=v5litepod-16',
                        '--runtime-version=v2-alpha-tpuv5-lite', '--spot']]
  assert not any(c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'] for c in cmds)
  runs = [remote_trainer_argv(c) for c in cmds if remote_trainer_argv(c) is not None]
  assert runs == [TRAIN_ARGS + ['--config.distributed=True']]
  assert cmds[-1][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete']


FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""A stand-in for gcloud: logs every call; queued-resource states and the exit codes of
trainer runs come from files, one per line (the last line repeats)."""
import json, os, sys

d = os.environ['FAKE_GCLOUD_DIR']
args = sys.argv[1:]
with open(os.path.join(d, 'calls.jsonl'), 'a') as f:
  f.write(json.dumps(args) + '\n')

def pop(name, default):
  path = os.path.join(d, name)
  lines = open(path).read().split() if os.path.exists(path) else []
  if not lines:
    return default
  if len(lines) > 1:
    open(path, 'w').write('\n'.join(lines[1:]) + '\n')
  return lines[0]

if args[:4] == ['compute', 'tpus', 'queued-resources', 'describe']:
  state = pop('qr_states', 'ACTIVE')
  if state == 'MISSING':
    sys.exit(1)
  print(state)
elif args[:4] == ['compute', 'tpus', 'tpu-vm', 'describe']:
  print('READY')
elif args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and any(
    a.startswith('--command=') and 'opd_jax.train' in a for a in args):
  sys.exit(int(pop('run_codes', '0')))
'''


@pytest.fixture
def fake_gcloud(tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  path = bindir / 'gcloud'
  path.write_text(FAKE_GCLOUD.replace('#!/usr/bin/env python3', '#!' + sys.executable, 1))
  path.chmod(0o755)
  state = tmp_path / 'gcloud'
  state.mkdir()

  def setup(qr_states, run_codes):
    (state / 'qr_states').write_text('\n'.join(qr_states) + '\n')
    (state / 'run_codes').write_text('\n'.join(map(str, run_codes)) + '\n')
    return {'PATH': f'{bindir}:{os.environ["PATH"]}', 'FAKE_GCLOUD_DIR': str(state)}

  def calls():
    with open(state / 'calls.jsonl') as f:
      return [json.loads(line) for line in f]
  return setup, calls


def _queued(env, *extra):
  return sh('launch/tpu_queued.sh', '--name', 'n1', '--zone', 'z1', '--poll', '0',
            '--settle', '0', *extra, '--', *TRAIN_ARGS, env=env, check=False, timeout=120)


def test_tpu_queued_recreates_the_slice_after_a_preemption_and_reruns(fake_gcloud):
  setup, calls = fake_gcloud
  # missing -> requested -> waiting -> ACTIVE; the run dies (255) and the queued resource is
  # SUSPENDED (preempted) -> deleted, requested again -> ACTIVE; the run finishes.
  env = setup(['MISSING', 'WAITING_FOR_RESOURCES', 'ACTIVE', 'SUSPENDED', 'MISSING', 'ACTIVE',
               'ACTIVE'], [255, 0])
  out = _queued(env)
  assert out.returncode == 0, out.stdout + out.stderr
  log = calls()
  kinds = [' '.join(c[2:4]) for c in log if c[:2] == ['compute', 'tpus']]
  assert kinds.count('queued-resources create') == 2
  assert kinds.count('queued-resources delete') == 2  # after the preemption, after the run
  runs = [remote_trainer_argv(c) for c in log if remote_trainer_argv(c) is not None]
  assert runs == [TRAIN_ARGS + ['--config.distributed=True']] * 2
  assert not any(c[2:4] == ['tpu-vm', 'create'] for c in log)
  assert 'restart 1 of 20' in out.stdout


def test_tpu_queued_does_not_retry_a_failure_on_a_healthy_slice(fake_gcloud):
  setup, calls = fake_gcloud
  env = setup(['ACTIVE'], [3])
  out = _queued(env, '--keep')
  assert out.returncode == 3
  assert 'not retrying' in out.stdout
  log = calls()
  assert sum(remote_trainer_argv(c) is not None for c in log) == 1
  assert not any(c[2:4] == ['queued-resources', 'delete'] for c in log)


def test_tpu_queued_gives_up_after_max_restarts(fake_gcloud):
  setup, calls = fake_gcloud
  env = setup(['ACTIVE', 'SUSPENDED', 'ACTIVE', 'SUSPENDED'], [255])
  out = _queued(env, '--max-restarts', '1')
  assert out.returncode == 1 and 'giving up' in out.stdout


def test_setup_worker_check_and_up_to_date_marker(tmp_path):
  venv = tmp_path / 'venv'
  out = sh('launch/setup_worker.sh', '--check', '--venv', str(venv), check=False)
  assert out.returncode == 1 and 'needs setup' in out.stdout
  want = out.stdout.split('(want ')[1].split(')')[0]
  venv.mkdir()
  (venv / '.opd_jax_setup').write_text(want + '\n')
  assert sh('launch/setup_worker.sh', '--check', '--venv', str(venv)).returncode == 0
  out = sh('launch/setup_worker.sh', '--venv', str(venv))  # installs nothing
  assert 'up to date' in out.stdout
  out = sh('launch/setup_worker.sh', '--check', '--venv', str(venv), '--accelerator', 'cpu',
           check=False)
  assert out.returncode == 1  # another accelerator is another environment


def test_local_dry_run_sets_the_distributed_environment_per_process():
  out = sh('launch/local.sh', '--dry-run', '--nproc', '3', '--cpu-devices', '2', '--port',
           '23456', '--log-dir', '/tmp/logs x', '--', *TRAIN_ARGS)
  lines = [l for l in out.stdout.splitlines() if l.startswith('+ ')]
  assert len(lines) == 3
  for i, line in enumerate(lines):
    argv = shlex.split(line[2:])
    if i:
      assert argv[-2:] == ['>', f'/tmp/logs x/process_{i}.log']
      argv = argv[:-2]
    assert argv[0] == 'env'
    env = dict(a.split('=', 1) for a in argv[1:] if '=' in a and not a.startswith('-'))
    assert env['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:23456'
    assert env['JAX_NUM_PROCESSES'] == '3' and env['JAX_PROCESS_ID'] == str(i)
    assert env['JAX_PLATFORMS'] == 'cpu'
    assert env['XLA_FLAGS'].endswith('--xla_force_host_platform_device_count=2')
    assert argv[argv.index('opd_jax.train') + 1:] == TRAIN_ARGS


def test_local_runs_a_two_step_training(tmp_path):
  out = sh('launch/local.sh', '--python', sys.executable, '--cpu-devices', '4', '--',
           '--config', 'configs/opd_single_teacher.py:runlocal', '--workdir',
           str(tmp_path / 'run dir'), '--config.total_steps=2', '--config.eval.num_prompts=2',
           timeout=600)
  assert 'step 2/2' in out.stdout, out.stdout[-2000:]
  assert os.path.isdir(tmp_path / 'run dir' / 'checkpoints' / '2')


FAKE_TRAINER = r'''#!/usr/bin/env bash
# Stands in for `python -m opd_jax.train`: process 1 exits with $FAIL_WITH (after a second, so
# that every process has started and logged), the others wait.
echo "process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS: ${*:3}"
if [[ "$JAX_PROCESS_ID" == 1 ]]; then sleep 1; exit "${FAIL_WITH:-0}"; fi
if [[ "${FAIL_WITH:-0}" != 0 ]]; then exec sleep 60; fi
'''


@pytest.mark.parametrize('fail_with', [0, 3])
def test_local_multi_process_exit_status_and_cleanup(tmp_path, fail_with):
  fake = tmp_path / 'fake_python'
  fake.write_text(FAKE_TRAINER)
  fake.chmod(0o755)
  out = sh('launch/local.sh', '--python', str(fake), '--nproc', '3', '--log-dir',
           str(tmp_path / 'logs'), '--', '--config', 'c.py', '--workdir', 'w',
           env={'FAIL_WITH': str(fail_with)}, check=False, timeout=50)
  assert out.returncode == fail_with, out.stdout + out.stderr
  assert 'process 0 of 3 at 127.0.0.1:' in out.stdout and '--config c.py --workdir w' in out.stdout
  assert (tmp_path / 'logs' / 'process_2.log').read_text().startswith('process 2 of 3')
  if fail_with:  # the others were stopped (not left running for 60 s) and the logs shown
    assert 'process 1 (pid' in out.stderr and 'exited with status 3; stopping' in out.stderr
    assert 'process_1.log (last lines)' in out.stderr
