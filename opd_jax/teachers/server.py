"""A teacher scoring server: per-token logprobs of given token ids, over HTTP, batched.

  python -m opd_jax.teachers.server --model /ckpt/Qwen3-32B --mesh fsdp=-1,tensor=1 --port 30000

Loads a HF checkpoint (or a `tiny:` spec, see opd_jax.models.tiny) with `load_pretrained`, sharded
over this host's devices, and speaks enough of two servers' protocols for scoring (the
requests and responses are defined once, in `opd_jax.teachers.wire`):

  POST /generate        SGLang's native API with max_new_tokens 0:
      {"input_ids": [ids] | [[ids], ...], "sampling_params": {"max_new_tokens": 0,
       "temperature": T}, "return_logprob": true, "logprob_start_len": S, "top_logprobs_num": K}
    -> {"text": "", "output_ids": [], "meta_info": {"input_token_logprobs":
       [[logprob, token_id, null], ...], "input_top_logprobs": [...], ...}}, a list of those
       for a batch input. Entry i is position S + i; position 0 has no context, so its logprob
       (and its top list) is null, as in SGLang. K = 0 omits input_top_logprobs.
  POST /v1/completions  vLLM's prompt scoring: {"prompt": [ids] | [[ids], ...], "max_tokens": 0|1,
       "prompt_logprobs": K} -> choices[i].prompt_logprobs = [null, {"<id>": {"logprob", "rank",
       "decoded_token"}}, ...] (the actual token and the top K). Nothing is generated (text "").
  GET  /health, /v1/models, /get_model_info (model_path, vocab_size, max_length, the tokenizer's
       fingerprint for the client's vocabulary check, and counters such as device_calls).

Temperature: /generate returns log_softmax(logits / T), the teacher at the student's sampling
temperature (T = 0, greedy, means untempered, as the sampler reports for greedy rows);
/v1/completions ignores T, like vLLM, whose prompt logprobs are untempered.

Batching: HTTP threads validate each request and queue one job per sequence (a bounded queue:
full -> HTTP 503); one worker thread takes what is queued (up to --max-batch-size sequences,
waiting at most --batch-wait-ms for requests already accepted but not yet queued, so a lone
request never waits), groups it by (temperature, top-k bucket), pads each group to a
power-of-two batch and length bucket (few shapes compile) and runs the jitted
`scoring.make_score_fn` once per group. A request waits at most --request-timeout-s
(then HTTP 504). Bad requests get HTTP 400 with a message naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from opd_jax.teachers import wire
from opd_jax.teachers.wire import BadRequest

log = logging.getLogger('opd_jax.teachers.server')

MAX_BODY_BYTES = 256 << 20


class Busy(RuntimeError):
  """The queue is full (HTTP 503) or the request timed out waiting (HTTP 504)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class _Job:
  ids: np.ndarray                     # [n] int32, the sequence to score
  temperature: float
  top_k: int                          # 0: no top-k lists
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: dict | None = None          # {'logprobs' [n], 'top_logprobs' [n, k], 'top_ids' [n, k]}
  error: BaseException | None = None
  abandoned: bool = False             # the HTTP side gave up; skip it


def parse_mesh(text: str) -> dict:
  """'fsdp=-1,tensor=2' -> {'fsdp': -1, 'tensor': 2}."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(','))):
    k, sep, v = item.partition('=')
    try:
      out[k.strip()] = int(v)
    except ValueError:
      sep = ''
    if not sep:
      raise argparse.ArgumentTypeError(f'bad entry {item!r}; expected e.g. fsdp=-1,tensor=1')
  return out


class ScoringEngine:
  """The model, its jitted scoring functions and the dynamic-batching worker thread."""

  def __init__(self, model_path: str, *, mesh_shape: dict | None = None, dtype: str = 'float32',
               max_len: int | None = None, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
               queue_size: int = 1024, max_batch_tokens: int = 1 << 16, rules: str = 'fsdp_tp'):
    import jax.numpy as jnp
    from flax import nnx

    from opd_jax import sharding as shd
    from opd_jax.models import tiny
    from opd_jax.models import load_pretrained

    self.model_path = tiny.resolve_model(model_path)
    self.mesh = shd.make_mesh(mesh_shape or {'fsdp': -1})
    model = load_pretrained(self.model_path, mesh=self.mesh, dtype=jnp.dtype(dtype), rules=rules)
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    self.vocab_size = int(model.cfg.vocab_size)
    self.max_len = int(max_len or model.cfg.max_position_embeddings)
    self.batch_multiple = shd.batch_size_multiple(self.mesh)
    self.max_batch_size = max(1, int(max_batch_size))
    self.max_batch_tokens = int(max_batch_tokens)
    self.batch_wait_s = batch_wait_ms / 1e3
    # Powers of two from 16, capped by max_len: at most ~log2(max_len) lengths compile.
    self.length_buckets = sorted({2**i for i in range(4, 40) if 2**i < self.max_len}
                                 | {self.max_len})
    self.tokenizer_info = _tokenizer_info(self.model_path)
    self._fns = {}
    self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, int(queue_size)))
    self._lock = threading.Lock()
    self.counters = dict(requests=0, bad_requests=0, sequences_scored=0, tokens_scored=0,
                         device_calls=0, padded_tokens=0, timeouts=0, rejected_busy=0,
                         device_s=0.0)  # device_s: seconds in device calls (compiles included)
    # Requests accepted whose jobs are not queued yet: the worker waits for these (at most
    # batch_wait), so a lone client's request runs at once and a burst shares one call.
    self._arriving = 0
    self._local = threading.local()
    self._stop = threading.Event()
    self._worker = threading.Thread(target=self._run, name='scoring-worker', daemon=True)
    self._worker.start()

  # ------------------------------------------------------------------------- front side
  def validate(self, ids, where: str) -> np.ndarray:
    """A list of token ids as int32, or BadRequest naming `where`."""
    if not isinstance(ids, list) or not ids:
      raise BadRequest(f'{where}: expected a non-empty list of token ids')
    if not all(type(i) is int for i in ids):  # bool and float are not token ids
      bad = next(i for i in ids if type(i) is not int)
      raise BadRequest(f'{where}: token ids must be integers, got {bad!r}')
    if len(ids) > self.max_len:
      raise BadRequest(f'{where}: {len(ids)} tokens is longer than the maximum length '
                       f'{self.max_len} of this server')
    arr = np.asarray(ids, np.int64)
    out = np.nonzero((arr < 0) | (arr >= self.vocab_size))[0]
    if len(out):
      raise BadRequest(f'{where}: token id {int(arr[out[0]])} at position {int(out[0])} is '
                       f'outside the vocabulary [0, {self.vocab_size})')
    return arr.astype(np.int32)

  def score(self, seqs: list[np.ndarray], *, temperature: float, top_k: int,
            timeout_s: float) -> list[dict]:
    """Queues `seqs` and waits for their results (Busy on a full queue or a timeout)."""
    if not 0 <= top_k <= self.vocab_size:
      raise BadRequest(f'top_logprobs_num / prompt_logprobs={top_k} must be in [0, '
                       f'{self.vocab_size}]')
    jobs = [_Job(s, float(temperature), int(top_k)) for s in seqs]
    for i, job in enumerate(jobs):
      try:
        self._queue.put_nowait(job)
      except queue.Full:
        for j in jobs[:i]:
          j.abandoned = True
        self._count(rejected_busy=1)
        raise Busy(f'the scoring queue is full ({self._queue.maxsize} sequences); retry later',
                   503) from None
    self.arrived()
    deadline = time.monotonic() + timeout_s
    for job in jobs:
      if not job.done.wait(max(0.0, deadline - time.monotonic())):
        for j in jobs:
          j.abandoned = True
        self._count(timeouts=1)
        raise Busy(f'scoring took longer than the request timeout ({timeout_s:g} s)', 504)
      if job.error is not None:
        raise job.error
    return [j.result for j in jobs]

  def info(self) -> dict:
    with self._lock:
      counters = dict(self.counters)
    return dict(model_path=self.model_path, is_generation=True, vocab_size=self.vocab_size,
                max_length=self.max_len, model_type=self.cfg.model_type,
                mesh=dict(self.mesh.shape), max_batch_size=self.max_batch_size,
                queue_size=self._queue.maxsize, queued=self._queue.qsize(),
                compiled_shapes=sum(f._cache_size() for f in list(self._fns.values())),
                **self.tokenizer_info, **counters)

  def stop(self):
    self._stop.set()
    self._worker.join(timeout=5)

  def arriving(self):
    """Called when a connection is accepted (its request will queue jobs soon)."""
    with self._lock:
      self._arriving += 1

  def start_request(self):
    """Called on the request's own thread: `arrived()` there ends its arrival."""
    self._local.arriving = True

  def arrived(self):
    """The current thread's request has queued its jobs or ended; idempotent."""
    if getattr(self._local, 'arriving', False):
      self._local.arriving = False
      with self._lock:
        self._arriving -= 1

  def _count(self, **kw):
    with self._lock:
      for k, v in kw.items():
        self.counters[k] += v

  # -------------------------------------------------------------------------- worker side
  def _run(self):
    while not self._stop.is_set():
      try:
        jobs = [self._queue.get(timeout=0.2)]
      except queue.Empty:
        continue
      deadline = time.monotonic() + self.batch_wait_s
      while len(jobs) < self.max_batch_size:
        try:  # what is already queued joins at once
          jobs.append(self._queue.get_nowait())
          continue
        except queue.Empty:
          pass
        left = deadline - time.monotonic()
        if not self._arriving or left <= 0:  # nothing on its way, or waited long enough
          break
        try:
          jobs.append(self._queue.get(timeout=min(left, 1e-3)))
        except queue.Empty:
          pass
      groups: dict[tuple, list[_Job]] = {}
      for job in jobs:
        if not job.abandoned:
          groups.setdefault((job.temperature, self._k_bucket(job.top_k)), []).append(job)
      for (temperature, k), group in groups.items():
        for batch in self._split(group):
          try:
            self._run_batch(batch, temperature, k)
          except Exception as e:  # noqa: BLE001 -- reported to each waiting request
            log.exception('scoring a batch of %d sequences failed', len(batch))
            for job in batch:
              job.error = e
              job.done.set()

  def _k_bucket(self, k: int) -> int:
    return 0 if k == 0 else min(self.vocab_size, 1 << (k - 1).bit_length())

  def _split(self, group: list[_Job]):
    """Batches of similar length (sorted) within max_batch_size and max_batch_tokens."""
    from opd_jax.buckets import bucket
    group = sorted(group, key=lambda j: len(j.ids))
    batch = []
    for job in group:
      longest = bucket(len(job.ids), self.length_buckets)
      if batch and (len(batch) + 1) * longest > self.max_batch_tokens:
        yield batch
        batch = []
      batch.append(job)
    if batch:
      yield batch

  def _fn(self, temperature: float, k: int):
    from opd_jax.teachers.scoring import make_score_fn
    key = (temperature, k)
    if key not in self._fns:
      # T = 0 (greedy) reports untempered logprobs, as the sampler does.
      self._fns[key] = make_score_fn(self.graphdef, temperature=temperature or 1.0, top_k=k)
    return self._fns[key]

  def _run_batch(self, batch: list[_Job], temperature: float, k: int):
    import jax
    from jax.sharding import NamedSharding

    from opd_jax import sharding as shd
    from opd_jax.buckets import batch_bucket, bucket

    t0 = time.perf_counter()
    n_rows = batch_bucket(len(batch), self.batch_multiple)
    length = bucket(max(len(j.ids) for j in batch), self.length_buckets)
    tokens = np.zeros((n_rows, length), np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    mask[:, 0] = 1  # padding rows hold one token, so no attention row is empty
    for i, job in enumerate(batch):  # right-padded: position t of the array is position t
      tokens[i, :len(job.ids)] = job.ids
      mask[i, :len(job.ids)] = 1
    sharding = NamedSharding(self.mesh, shd.batch_spec(2))
    tokens, mask = jax.device_put((tokens, mask), sharding)
    t1 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      out = self._fn(temperature, k)(self.params, tokens, mask)
    out = jax.device_get(out)
    real = sum(len(j.ids) for j in batch)
    self._count(device_calls=1, sequences_scored=len(batch), tokens_scored=real,
                padded_tokens=n_rows * length - real, device_s=time.perf_counter() - t1)
    for i, job in enumerate(batch):
      n = len(job.ids)
      res = {'logprobs': out['logprobs'][i, :n]}
      if job.top_k:
        res['top_logprobs'] = out['top_logprobs'][i, :n, :job.top_k]
        res['top_ids'] = out['top_ids'][i, :n, :job.top_k]
      job.result = res
      job.done.set()
    log.debug('batch of %d sequences (%d real tokens) in [%d, %d], T=%g k=%d: %.1f ms',
              len(batch), real, n_rows, length, temperature, k, 1e3 * (time.perf_counter() - t0))


def _tokenizer_info(path: str) -> dict:
  """The tokenizer's length and fingerprint (opd_jax.teachers.remote.tokenizer_fingerprint),
  if any."""
  try:
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:  # noqa: BLE001 -- a model without a tokenizer can still be served
    log.warning('%s: no tokenizer (%s); clients cannot check vocabulary identity', path, e)
    return dict(tokenizer_size=None, tokenizer_fingerprint=None)
  from opd_jax.teachers.remote import tokenizer_fingerprint
  return dict(tokenizer_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok))


# --------------------------------------------------------------------------- protocols
def _sequences(value, where: str, engine: ScoringEngine) -> tuple[list[np.ndarray], bool]:
  """([ids, ...], batched) from `[ids]` or `[[ids], ...]`."""
  if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
    raise BadRequest(f'{where}: this server scores token ids only; send token ids, not text')
  if isinstance(value, list) and value and isinstance(value[0], list):
    return [engine.validate(v, f'{where}[{i}]') for i, v in enumerate(value)], True
  return [engine.validate(value, where)], False


def handle_generate(engine: ScoringEngine, body: dict, timeout_s: float):
  """SGLang's /generate, scoring only (`wire.parse_generate`, `wire.generate_response`)."""
  req = wire.parse_generate(body, lambda v, where: _sequences(v, where, engine))
  results = engine.score(req.seqs, temperature=req.temperature, top_k=req.top_k,
                         timeout_s=timeout_s)
  return wire.generate_response(req, results)


def handle_completions(engine: ScoringEngine, body: dict, timeout_s: float):
  """vLLM's /v1/completions with prompt_logprobs, scoring only (`wire.parse_completions`,
  `wire.completions_response`)."""
  req = wire.parse_completions(body, lambda v, where: _sequences(v, where, engine))
  results = engine.score(req.seqs, temperature=req.temperature, top_k=req.top_k,
                         timeout_s=timeout_s)
  return wire.completions_response(req, results, body.get('model') or engine.model_path)


# ------------------------------------------------------------------------------ HTTP
def make_handler(engine: ScoringEngine, request_timeout_s: float):
  routes = {wire.PATHS['sglang']: handle_generate, wire.PATHS['vllm']: handle_completions}

  class Handler(BaseHTTPRequestHandler):
    server_version = 'opd_jax-teacher/1'

    def log_message(self, fmt, *args):  # one line per request only at debug level
      log.debug('%s %s', self.address_string(), fmt % args)

    def _send(self, status: int, obj):
      data = json.dumps(obj).encode()
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, status: int, message: str):
      if status == 400:
        engine._count(bad_requests=1)
      self._send(status, {'error': {'message': message, 'code': status,
                                    'type': 'BadRequestError' if status < 500 else 'ServerError'}})

    def do_GET(self):  # noqa: N802 -- http.server's naming
      path = self.path.split('?')[0].rstrip('/')
      if path in ('/health', '/health_generate'):
        self._send(200, {})
      elif path in ('/get_model_info', '/get_server_info'):
        self._send(200, engine.info())
      elif path == '/v1/models':
        self._send(200, {'object': 'list', 'data': [dict(
            id=engine.model_path, object='model', owned_by='opd_jax',
            max_model_len=engine.max_len)]})
      else:
        self._error(404, f'no route GET {path}')

    def do_POST(self):  # noqa: N802
      path = self.path.split('?')[0].rstrip('/')
      if path not in routes:
        self._error(404, f'no route POST {path}; known: {", ".join(routes)}')
        return
      try:
        n = int(self.headers.get('Content-Length') or -1)
      except ValueError:
        n = -1
      if not 0 <= n <= MAX_BODY_BYTES:
        self._error(400 if n < 0 else 413, 'a JSON body with a Content-Length of at most '
                    f'{MAX_BODY_BYTES} bytes is required')
        return
      engine._count(requests=1)
      try:
        try:
          body = json.loads(self.rfile.read(n) or b'null')
        except (ValueError, UnicodeDecodeError) as e:
          raise BadRequest(f'malformed JSON body: {e}') from None
        if not isinstance(body, dict):
          raise BadRequest('the body must be a JSON object')
        self._send(200, routes[path](engine, body, request_timeout_s))
      except BadRequest as e:
        self._error(400, str(e))
      except Busy as e:
        self._error(e.status, str(e))
      except Exception as e:  # noqa: BLE001 -- the server keeps serving
        log.exception('%s failed', path)
        self._error(500, f'{type(e).__name__}: {e}')

  return Handler


class _Server(ThreadingHTTPServer):
  """One thread per connection; tells the engine which requests are on their way."""
  daemon_threads = True
  request_queue_size = 1024  # the listen backlog (socketserver's 5 resets bursts of clients)

  def __init__(self, address, handler, engine: ScoringEngine):
    super().__init__(address, handler)
    self.engine = engine

  def process_request(self, request, client_address):  # the accept loop's thread
    self.engine.arriving()
    super().process_request(request, client_address)

  def process_request_thread(self, request, client_address):  # the request's thread
    self.engine.start_request()
    try:
      super().process_request_thread(request, client_address)
    finally:
      self.engine.arrived()


def serve(engine: ScoringEngine, host: str, port: int, request_timeout_s: float):
  """A bound HTTP server (call serve_forever / shutdown); port 0 picks a free one."""
  return _Server((host, port), make_handler(engine, request_timeout_s), engine)


def main(argv=None):
  ap = argparse.ArgumentParser(
      prog='python -m opd_jax.teachers.server', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--model', required=True, help='HF checkpoint directory or tiny:FAMILY[:k=v,...]')
  ap.add_argument('--mesh', type=parse_mesh, default={'fsdp': -1, 'tensor': 1},
                  help='mesh over this host\'s devices (default fsdp=-1,tensor=1)')
  ap.add_argument('--sharding', default='fsdp_tp', help='rule set in opd_jax.sharding.RULE_SETS')
  ap.add_argument('--host', default='127.0.0.1', help='0.0.0.0 to serve other hosts')
  ap.add_argument('--port', type=int, default=30000, help='0 picks a free port')
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--max-len', type=int, default=None,
                  help='longest sequence accepted (default: max_position_embeddings)')
  ap.add_argument('--max-batch-size', type=int, default=32, help='sequences per device call')
  ap.add_argument('--max-batch-tokens', type=int, default=1 << 16,
                  help='padded tokens per device call (rows x length bucket)')
  ap.add_argument('--batch-wait-ms', type=float, default=5.0,
                  help='the longest a batch waits for requests already arriving to join it')
  ap.add_argument('--queue-size', type=int, default=1024, help='queued sequences before HTTP 503')
  ap.add_argument('--request-timeout-s', type=float, default=300.0,
                  help='a request waiting longer gets HTTP 504')
  ap.add_argument('--log-level', default='INFO')
  args = ap.parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format='%(asctime)s %(name)s: %(message)s')
  for noisy in ('absl', 'jax._src'):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  engine = ScoringEngine(args.model, mesh_shape=args.mesh, dtype=args.dtype, max_len=args.max_len,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         queue_size=args.queue_size, max_batch_tokens=args.max_batch_tokens,
                         rules=args.sharding)
  server = serve(engine, args.host, args.port, args.request_timeout_s)
  host, port = server.server_address[:2]
  # Tests and scripts wait for this exact line (with --port 0 it names the chosen port).
  print(f'serving {engine.model_path} (vocab {engine.vocab_size}, mesh {dict(engine.mesh.shape)}) '
        f'on http://{host}:{port}', flush=True)
  try:
    server.serve_forever(poll_interval=0.2)
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    engine.stop()


if __name__ == '__main__':
  main()
