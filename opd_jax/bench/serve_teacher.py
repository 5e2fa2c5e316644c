"""Teacher scoring server throughput: tokens scored per second with 1 and with N clients.

  python -m opd_jax.bench.serve_teacher --model DIR --clients 1,16 --seq-len 256 --requests 64

Starts `python -m opd_jax.teachers.server --model DIR --port 0` (or uses a running server with
--url), then for each client count C sends `--requests` sequences of `--seq-len` random token
ids as SGLang /generate scoring requests, C at a time (closed loop: each client sends its
next request when the last one is answered). Every batch shape is compiled first (one batch
request per power-of-two size), then each setting runs once untimed and once timed. Prints
a detail line per setting (with p50 / p99 request latency), then one
`clients=C tokens_per_s=<n>` line each, the last last.
`device_busy` is the share of the wall time the server spent in device calls: near 1 the
model is the limit, well below 1 HTTP / JSON / Python overhead is. `--make-model` first
writes the ~4M-parameter Qwen3 of opd_jax.bench.sampler to --model if it has no config.json;
`--in-process` also times the same jitted scoring function without HTTP (the peer).
"""

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def _get(url):
  with urllib.request.urlopen(url, timeout=30) as r:
    return json.load(r)


def start_server(model, extra_args, timeout_s=600, prefix=(), env=None):
  """A serve_teacher process on a free loopback port; returns (process, url). `prefix` goes
  before the command (e.g. `taskset -c 1`); `env` (default: this process's) is its
  environment."""
  proc = subprocess.Popen(
      [*prefix, sys.executable, '-u', '-m', 'opd_jax.teachers.server', '--model', model,
       '--port', '0', *extra_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=env)
  urls, lines = queue.Queue(), []

  def read():
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('serving ') and ' on http://' in line:
        urls.put(line.rsplit(' on ', 1)[1].strip())
    urls.put(None)
  threading.Thread(target=read, daemon=True).start()
  try:
    url = urls.get(timeout=timeout_s)
  except queue.Empty:
    url = None
  if url is None:
    proc.kill()
    raise RuntimeError('the server did not start:\n' + ''.join(lines[-30:]))
  return proc, url


def run_setting(url, seqs, clients, *, timeout_s=600):
  """Sends `seqs` with `clients` concurrent closed-loop clients; returns per-request latencies
  and the wall time."""
  from opd_jax.teachers.remote import request_json
  todo = queue.Queue()
  for s in seqs:
    todo.put(s)
  latencies, errors = [], []

  def client():
    while True:
      try:
        ids = todo.get_nowait()
      except queue.Empty:
        return
      t0 = time.perf_counter()
      try:
        ans = request_json(url + '/generate', dict(
            input_ids=ids, return_logprob=True, logprob_start_len=0,
            sampling_params=dict(max_new_tokens=0, temperature=1.0)),
            timeout_s=timeout_s, retries=0)
        assert len(ans['meta_info']['input_token_logprobs']) == len(ids)
      except Exception as e:  # noqa: BLE001 -- reported below
        errors.append(e)
        return
      latencies.append(time.perf_counter() - t0)

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  if errors:
    raise RuntimeError(f'{len(errors)} requests failed; first: {errors[0]}')
  return latencies, wall


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', help='checkpoint directory to serve (not needed with --url)')
  ap.add_argument('--url', help='a running server instead of starting one')
  ap.add_argument('--clients', default='1,16', help='comma-separated concurrent client counts')
  ap.add_argument('--seq-len', type=int, default=256)
  ap.add_argument('--requests', type=int, default=64, help='sequences per setting')
  ap.add_argument('--server-args', default='--max-batch-size 16',
                  help='extra serve_teacher arguments when starting one')
  ap.add_argument('--in-process', action='store_true',
                  help='also time the jitted scoring function in-process (no HTTP), the peer')
  ap.add_argument('--make-model', action='store_true',
                  help='write the benchmark Qwen3 (opd_jax.bench.sampler) to --model first')
  args = ap.parse_args(argv)
  if not args.url and not args.model:
    ap.error('give --model (to start a server) or --url')
  if args.in_process and not args.model:
    ap.error('--in-process needs --model')

  import numpy as np
  proc = None
  if args.make_model:
    from opd_jax.bench.sampler import make_bench_model
    if not os.path.exists(os.path.join(args.model, 'config.json')):
      make_bench_model(args.model)
  url = args.url
  if not url:
    proc, url = start_server(args.model, args.server_args.split())
  try:
    info = _get(url + '/get_model_info')
    rng = np.random.RandomState(0)
    seqs = [rng.randint(0, info['vocab_size'], args.seq_len).tolist()
            for _ in range(args.requests)]
    print(f"model={info['model_path']} vocab={info['vocab_size']} mesh={info.get('mesh')} "
          f"max_batch_size={info.get('max_batch_size')} seq_len={args.seq_len} "
          f'requests={args.requests} url={url}', flush=True)
    # One batch request of n sequences is one device call of n rows: compile every batch
    # bucket the timed runs can produce, so no compile lands inside a timed run.
    from opd_jax.teachers.remote import request_json
    n = 1
    while n <= min(args.requests, info.get('max_batch_size') or args.requests):
      request_json(url + '/generate', dict(input_ids=seqs[:n], return_logprob=True,
                                           sampling_params=dict(max_new_tokens=0)),
                   timeout_s=600, retries=0)
      n *= 2
    results = []
    for clients in [int(c) for c in args.clients.split(',')]:
      run_setting(url, seqs, clients)  # untimed warm-up of this setting
      before = _get(url + '/get_model_info')
      latencies, wall = run_setting(url, seqs, clients)
      after = _get(url + '/get_model_info')
      calls = after['device_calls'] - before['device_calls']
      busy = (after['device_s'] - before['device_s']) / wall
      compiles = after['compiled_shapes'] - before['compiled_shapes']
      tps = args.requests * args.seq_len / wall
      print(f'  clients={clients} wall_s={wall:.2f} device_calls={calls} '
            f'mean_batch={args.requests / max(calls, 1):.1f} device_busy={busy:.2f} '
            f'p50_latency_ms={1e3 * statistics.median(latencies):.0f} '
            f'p99_latency_ms={1e3 * _percentile(latencies, 99):.0f} '
            f'new_compiles={compiles}', flush=True)
      results.append((clients, tps))
  finally:
    if proc is not None:
      proc.kill()
      proc.wait(timeout=30)
  if args.in_process:  # after the server is gone, so the two do not share the CPU
    for batch in sorted({1, max(c for c, _ in results)}):
      print(f'  in_process batch={batch} tokens_per_s='
            f'{in_process_tokens_per_s(args.model, args.seq_len, batch):.1f}', flush=True)
  for clients, tps in results:
    print(f'clients={clients} tokens_per_s={tps:.1f}')


def _percentile(values, q):
  """The q-th percentile (nearest rank) of `values`."""
  ordered = sorted(values)
  return ordered[max(0, min(len(ordered) - 1, -(-q * len(ordered) // 100) - 1))]


def in_process_tokens_per_s(model_path, seq_len, batch, runs=5):
  """The peer without HTTP: the same jitted scoring function on [batch, seq_len] in this
  process (median of `runs` after a compile)."""
  import jax
  import numpy as np
  from flax import nnx

  from opd_jax.models import load_pretrained
  from opd_jax.teachers.scoring import make_score_fn
  model = load_pretrained(model_path)
  graphdef, params = nnx.split(model)
  fn = make_score_fn(graphdef)
  tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (batch, seq_len))
  tokens, mask = tokens.astype(np.int32), np.ones((batch, seq_len), np.int32)
  jax.block_until_ready(fn(params, tokens, mask))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, tokens, mask))
    times.append(time.perf_counter() - t0)
  return batch * seq_len / statistics.median(times)

if __name__ == '__main__':
  main()
