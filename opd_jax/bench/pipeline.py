"""Pipelined vs synchronous OPD with a served teacher: training steps per second.

  python -m opd_jax.bench.pipeline [--steps 12 --warmup 4 --repeats 1]

Starts the teacher server (`python -m opd_jax.teachers.server`, one CPU device) pinned to one
core with `taskset -c 1`, then trains the same OPD config (configs/opd_remote_teacher.py's
runlocal form with the models and batch below, no evaluation, no checkpoints) twice with the
trainer pinned to the other core (`taskset -c 0`): with `rollout.max_staleness=0` (rollout,
then scoring, then the update, one after another) and with `max_staleness=1` (batch k + 1 is
sampled while the server scores batch k). Each run's time per step is the wall time between
the updates of step `--warmup` and of the last step (compiles excluded), divided by the steps
between them. The models are sized so that the student's rollout and the teacher's scoring
of a batch take comparable time on one core (the sync run's phase times are printed to show
it). First it prints `core_parallelism`: what two CPU-bound processes pinned to the two
cores get done at once relative to one (2.0 for independent cores): overlap cannot beat it.
Prints a line per run, then `pipelined_over_sync=X` (steps/s ratio; median over `--repeats`
alternating pairs).

`--trainer` is the internal entry point of one training run (it prints `step_times=...`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Sized on the 2-core development machine so that rollout (+ update) and scoring take
# similar time: the student decodes up to 128 tokens per row, the teacher scores the rows.
STUDENT = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=2,num_kv_heads=1,seed=0'
TEACHER = 'tiny:qwen3:hidden_size=128,num_layers=4,num_heads=4,num_kv_heads=2,seed=1'
ONE_DEVICE = '--xla_force_host_platform_device_count=1'


def trainer_config(url: str, max_staleness: int, steps: int, *, prompts: int, new_tokens: int,
                   student: str):
  """The benchmarked OPD config: opd_remote_teacher's runlocal form against `url`."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.path.insert(0, root)
  try:
    from configs import opd_remote_teacher
  finally:
    sys.path.remove(root)
  c = opd_remote_teacher.get_config('runlocal')
  c.unlock()
  c.total_steps = steps
  c.student.model = student
  c.rollout.prompts_per_step = prompts
  c.rollout.max_new_tokens = new_tokens
  c.rollout.max_staleness = max_staleness
  c.teachers.teacher.remote_url = url
  c.teachers.teacher.remote_concurrency = prompts
  c.checkpoint.every = 0
  c.data.eval = {}
  c.export.hf_dir = ''
  c.log_every = 1
  c.lock()
  return c


def train_once(args) -> None:
  """One training run in this process; prints the wall time at each update and the phases."""
  import logging

  from opd_jax import train
  config = trainer_config(args.url, args.max_staleness, args.steps, prompts=args.prompts,
                          new_tokens=args.new_tokens, student=args.student)
  times = {}

  def on_update(step, batch, metrics):
    del batch
    times[step] = time.perf_counter()
    times.setdefault('metrics', {})[step] = {k: v for k, v in metrics.items()
                                             if k.startswith(('perf/', 'pipeline/', 'rollout/'))}
  logging.getLogger('opd_jax').setLevel(logging.WARNING)
  with tempfile.TemporaryDirectory() as workdir:
    result = train.run(config, workdir, on_update=on_update)
  for key in ('perf/update_s', 'perf/step_s'):  # known after the update
    for step, value in result['history'].get(key, []):
      times['metrics'][step][key] = value
  print('step_times=' + json.dumps({k: v for k, v in times.items() if k != 'metrics'}))
  print('step_metrics=' + json.dumps(times['metrics']))


_PROBE = ('import os, time\nimport numpy as np\na = np.random.RandomState(0).rand(400, 400)\n'
          't = time.perf_counter()\nfor _ in range(200): a @ a\nprint(time.perf_counter() - t)')


def core_parallelism(cores: tuple[str, str]) -> float:
  """How much two CPU-bound processes pinned to `cores` get done at once, relative to one:
  2 x (the time of a NumPy matmul loop alone on the first core) / (the longer of the two
  when both run together). 2.0: independent cores; ~1.0: the two share one core's
  throughput (SMT siblings, a hypervisor's share, other jobs), and no overlap of the
  trainer with the server can then speed a step up."""
  def start(core):
    return subprocess.Popen(['taskset', '-c', core, sys.executable, '-c', _PROBE],
                            env=dict(os.environ, OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1'),
                            stdout=subprocess.PIPE, text=True)
  alone = float(start(cores[0]).communicate()[0])
  both = [start(c) for c in cores]
  together = max(float(p.communicate()[0]) for p in both)
  return 2 * alone / together


def warm_server(url: str, rows: int, max_len: int) -> None:
  """Compiles every (batch bucket, length bucket) the runs can make the server call, so no
  compile lands inside a timed span (batch requests of n sequences are one n-row call)."""
  from opd_jax.teachers.remote import request_json
  n = 1
  while n <= rows:
    length = 16
    while length <= max_len:
      request_json(url + '/generate', dict(
          input_ids=[[1] * (length - 1)] * n, return_logprob=True, logprob_start_len=0,
          sampling_params=dict(max_new_tokens=0, temperature=1.0)), timeout_s=600, retries=0)
      length *= 2
    n *= 2


def server_counters(url: str) -> dict:
  from opd_jax.teachers.remote import request_json
  return request_json(url + '/get_model_info', timeout_s=30, retries=2)


def _run_trainer(url, staleness, args) -> dict:
  cmd = ['taskset', '-c', args.trainer_core, sys.executable, '-u', '-m', 'opd_jax.bench.pipeline',
         '--trainer', '--url', url, '--max-staleness', str(staleness), '--steps', str(args.steps),
         '--prompts', str(args.prompts), '--new-tokens', str(args.new_tokens),
         '--student', args.student]
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE)
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
  if out.returncode:
    raise RuntimeError(f'trainer (max_staleness={staleness}) failed:\n{out.stdout[-3000:]}'
                       f'\n{out.stderr[-3000:]}')
  found = {}
  for line in out.stdout.splitlines():
    for key in ('step_times', 'step_metrics'):
      if line.startswith(key + '='):
        found[key] = json.loads(line[len(key) + 1:])
  times = {int(k): v for k, v in found['step_times'].items()}
  metrics = {int(k): v for k, v in found['step_metrics'].items()}
  span = times[args.steps] - times[args.warmup]
  steady = [metrics[s] for s in range(args.warmup + 1, args.steps + 1)]
  keys = set.intersection(*(set(m) for m in steady))
  phases = {k: statistics.median(m[k] for m in steady) for k in sorted(keys)}
  return {'steps_per_s': (args.steps - args.warmup) / span, 'phases': phases}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--steps', type=int, default=16)
  ap.add_argument('--warmup', type=int, default=6, help='steps before the timed span')
  ap.add_argument('--repeats', type=int, default=1, help='sync / pipelined pairs')
  ap.add_argument('--prompts', type=int, default=8, help='rollout.prompts_per_step')
  ap.add_argument('--new-tokens', type=int, default=128, help='rollout.max_new_tokens')
  ap.add_argument('--max-len', type=int, default=512,
                  help='longest length bucket warmed up on the server (prompt + response)')
  ap.add_argument('--student', default=STUDENT)
  ap.add_argument('--teacher', default=TEACHER)
  ap.add_argument('--trainer-core', default='0')
  ap.add_argument('--server-core', default='1')
  ap.add_argument('--timeout-s', type=float, default=1800)
  ap.add_argument('--trainer', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--url', help=argparse.SUPPRESS)
  ap.add_argument('--max-staleness', type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.trainer:
    return train_once(args)
  if not args.warmup < args.steps:
    ap.error('--warmup must be below --steps')

  parallelism = core_parallelism((args.trainer_core, args.server_core))
  print(f'core_parallelism={parallelism:.2f} (2.00: two independent cores; the ceiling of '
        f'pipelined_over_sync here is about min(2, this))', flush=True)
  from opd_jax.bench.serve_teacher import start_server
  from opd_jax.models import tiny
  teacher = tiny.resolve_model(args.teacher)
  tiny.resolve_model(args.student)
  # the server's one device; this process's environment is left alone (a caller's later
  # subprocesses, e.g. in the test session, must not inherit it)
  proc, url = start_server(teacher, ['--max-batch-size', str(2 * args.prompts),
                                     '--batch-wait-ms', '5'],
                           prefix=['taskset', '-c', args.server_core],
                           env=dict(os.environ, XLA_FLAGS=ONE_DEVICE))
  warm_server(url, rows=2 * args.prompts, max_len=args.max_len)
  print(f'student={args.student} teacher={args.teacher} prompts={args.prompts} '
        f'new_tokens={args.new_tokens} steps={args.steps} warmup={args.warmup} '
        f'trainer_core={args.trainer_core} server_core={args.server_core} url={url}', flush=True)
  ratios, runs = [], {0: [], 1: []}
  try:
    for _ in range(args.repeats):
      for staleness in (0, 1):
        before = server_counters(url)
        res = _run_trainer(url, staleness, args)
        after = server_counters(url)
        runs[staleness].append(res['steps_per_s'])
        phases = ' '.join(f'{k}={v:.3f}' for k, v in sorted(res['phases'].items()))
        device_s = (after['device_s'] - before['device_s']) / args.steps
        print(f"  max_staleness={staleness} steps_per_s={res['steps_per_s']:.3f} "
              f'server_device_s_per_step={device_s:.3f} '
              f"server_new_compiles={after['compiled_shapes'] - before['compiled_shapes']} "
              f'{phases}', flush=True)
      ratios.append(runs[1][-1] / runs[0][-1])
  finally:
    proc.kill()
    proc.wait(timeout=30)
  print(f'sync_steps_per_s={statistics.median(runs[0]):.3f} '
        f'pipelined_steps_per_s={statistics.median(runs[1]):.3f}')
  print(f'pipelined_over_sync={statistics.median(ratios):.2f}')


if __name__ == '__main__':
  main()
