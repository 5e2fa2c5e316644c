"""A teacher served over HTTP (opd_jax.teachers.server, SGLang or vLLM), behind LocalTeacher's
interface, so the trainer's advantage code cannot tell the two apart.

Legend (docs/design.md §7): B rows of the batch, T positions (left-padded prompt +
right-padded response), K top-k.

For each routed row, the real tokens (mask 1, padding stripped) are posted as one request,
`remote_concurrency` requests at a time; each answer is scattered back to the row's real
positions, so `logprobs[b, t]` = log p(tokens[b, t] | the real tokens before it), 0 at the
first real token, at masked positions and on unrouted rows (as scoring.score_model does).

Protocols (`TeacherSpec.remote_protocol`):
  'sglang'  POST /generate {"input_ids", "sampling_params": {"max_new_tokens": 0,
            "temperature"}, "return_logprob": true, "logprob_start_len": 0[, "top_logprobs_num"]}
            and read meta_info.input_token_logprobs ([logprob, token_id, null], first null).
  'vllm'    POST /v1/completions {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0 or K}
            and pick each position's actual token from choices[0].prompt_logprobs. vLLM's
            prompt logprobs are untempered, so this mode needs temperature 1.

Failures: each request has a timeout (`remote_timeout_s`, per socket operation); connection
errors, timeouts and HTTP 5xx are retried `remote_retries` times with exponential backoff;
HTTP 4xx is raised at once with the server's message; the final error names the URL. At
construction the client asks GET /get_model_info and checks the vocabulary (size, and the
tokenizer's fingerprint where the server reports one) against the student's.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from opd_jax.data import VocabMismatchError
from opd_jax.teachers import wire
from opd_jax.teachers.local import Ready

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
PROTOCOLS = wire.PROTOCOLS


class RemoteTeacherError(RuntimeError):
  """The teacher server failed, refused a request, or answered something unexpected."""


def tokenizer_fingerprint(tokenizer) -> str:
  """A short hash of the tokenizer's full string -> id map (special tokens included)."""
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
  return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _server_message(err: urllib.error.HTTPError) -> str:
  try:
    text = err.read().decode('utf-8', 'replace')
  except Exception:  # noqa: BLE001
    return err.reason or ''
  try:
    obj = json.loads(text)
    msg = obj.get('error', obj) if isinstance(obj, dict) else obj
    msg = msg.get('message', msg) if isinstance(msg, dict) else msg
    return msg if isinstance(msg, str) else json.dumps(msg)
  except ValueError:
    return text[:1000]


def request_json(url: str, payload=None, *, timeout_s: float, retries: int,
                 backoff_s: float = 0.5, abort: threading.Event | None = None,
                 stats: dict | None = None):
  """GET (payload None) or POST JSON to `url`; returns the decoded JSON answer.

  Retries connection errors, timeouts and HTTP 5xx `retries` times, sleeping backoff_s,
  2 backoff_s, 4 backoff_s, ... (capped at 30 s, +-25% jitter so concurrent clients spread
  out); raises RemoteTeacherError at once on HTTP 4xx (with the server's message), after the
  last attempt (naming the URL), or when `abort` is set by a sibling request that failed.
  """
  data = None if payload is None else json.dumps(payload).encode()
  headers = {'Content-Type': 'application/json'} if data is not None else {}
  t0 = time.monotonic()
  last = None
  for attempt in range(retries + 1):
    if abort is not None and abort.is_set():
      raise RemoteTeacherError(f'{url}: abandoned because another request to it failed')
    if attempt:
      delay = min(MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
      if stats is not None:
        stats['retries'] = stats.get('retries', 0) + 1
      log.warning('%s: %s; retry %d/%d in %.1f s', url, last, attempt, retries, delay)
      if abort is not None and abort.wait(delay):
        raise RemoteTeacherError(f'{url}: abandoned because another request to it failed')
      if abort is None:
        time.sleep(delay)
    try:
      req = urllib.request.Request(url, data=data, headers=headers,
                                   method='GET' if data is None else 'POST')
      with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        body = resp.read()
    except urllib.error.HTTPError as e:
      msg = _server_message(e)
      if e.code < 500:
        raise RemoteTeacherError(f'{url}: HTTP {e.code} (not retried): {msg}') from None
      last = f'HTTP {e.code}: {msg}'
      continue
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      reason = e.reason if isinstance(e, urllib.error.URLError) else e
      last = ('timed out after %g s' % timeout_s if isinstance(reason, TimeoutError)
              else f'{type(reason).__name__}: {reason}')
      continue
    try:
      return json.loads(body)
    except ValueError as e:
      raise RemoteTeacherError(f'{url}: the answer is not JSON ({e}): {body[:200]!r}') from None
  raise RemoteTeacherError(
      f'teacher server {url} failed {retries + 1} attempts in {time.monotonic() - t0:.1f} s '
      f'(timeout {timeout_s:g} s per request, {retries} retries with backoff); last error: '
      f'{last}')


class RemoteTeacher:
  """LocalTeacher's interface (name, spec, top_k, tokens_scored, rows_forwarded, score) for
  a teacher at `spec.remote_url`.

  student_tokenizer / student_vocab_size: what the server's vocabulary is checked against.
  mesh: where results go when score() gets no out_sharding. backoff_s: the first retry delay.
  """

  def __init__(self, spec, *, student_tokenizer=None, mesh=None, top_k: int = 0,
               temperature: float = 1.0, student_vocab_size: int | None = None,
               backoff_s: float = 0.5):
    self.spec = spec
    self.name = spec.name
    if not spec.remote_url:
      raise ValueError(f'teacher {spec.name!r}: remote_url is not set')
    if spec.remote_protocol not in PROTOCOLS:
      raise ValueError(f'config.teachers.{spec.name}.remote_protocol={spec.remote_protocol!r}; '
                       f'expected one of {PROTOCOLS}')
    if spec.remote_protocol == 'vllm' and temperature != 1.0:
      raise ValueError(f'teacher {spec.name!r}: vLLM returns untempered prompt logprobs, but the '
                       f'rollout temperature is {temperature}; use remote_protocol=sglang '
                       f'(opd_jax.teachers.server applies the temperature) or temperature 1')
    self.url = spec.remote_url.rstrip('/')
    self.cfg = None  # the architecture is not known here (no FLOP accounting)
    self.mesh = mesh
    self.top_k = int(top_k)
    self.temperature = float(temperature)
    self.backoff_s = backoff_s
    self.tokens_scored = 0
    self.rows_forwarded = 0
    self.stats = {'requests': 0, 'retries': 0}
    self._pool = cf.ThreadPoolExecutor(max_workers=max(1, int(spec.remote_concurrency)),
                                       thread_name_prefix=f'teacher-{spec.name}')
    self.server_info = self._check_server(student_tokenizer, student_vocab_size)
    log.info('teacher %r: %s server at %s (vocab %s, max length %s)', self.name,
             spec.remote_protocol, self.url, self.server_info.get('vocab_size', '?'),
             self.server_info.get('max_length', '?'))

  # ------------------------------------------------------------------------------ setup
  def _request(self, path: str, payload=None, abort=None):
    self.stats['requests'] += 1
    return request_json(self.url + path, payload, timeout_s=self.spec.remote_timeout_s,
                        retries=self.spec.remote_retries, backoff_s=self.backoff_s,
                        abort=abort, stats=self.stats)

  def _check_server(self, tokenizer, student_vocab_size) -> dict:
    try:
      info = self._request('/get_model_info')
    except RemoteTeacherError as e:
      if self.spec.remote_protocol != 'vllm' or 'HTTP 404' not in str(e):
        raise RemoteTeacherError(f'teacher {self.name!r}: cannot reach its server: {e}') from None
      info = {}  # a real vLLM server has no /get_model_info
    self._model_id = info.get('model_path')
    if self.spec.remote_protocol == 'vllm' and not self._model_id:
      models = self._request('/v1/models').get('data') or [{}]
      self._model_id = models[0].get('id')
      info.setdefault('max_length', models[0].get('max_model_len'))
    where = f'teacher {self.name!r} at {self.url}'
    vocab = info.get('vocab_size')
    need = max(len(tokenizer) if tokenizer is not None else 0, student_vocab_size or 0)
    if vocab is None:
      log.warning('%s reports no vocab_size; the student/teacher vocabulary is NOT checked', where)
    elif vocab < need:
      raise VocabMismatchError(
          f'{where} has a vocabulary of {vocab} ids, but the student can produce ids up to '
          f'{need - 1} (tokenizer length {len(tokenizer) if tokenizer is not None else "?"}, '
          f'model vocabulary {student_vocab_size or "?"}); serve a teacher with the '
          f"student's tokenizer")
    theirs = info.get('tokenizer_fingerprint')
    if tokenizer is not None and theirs and theirs != tokenizer_fingerprint(tokenizer):
      raise VocabMismatchError(
          f"{where}: the server's tokenizer ({info.get('tokenizer_size')} tokens, fingerprint "
          f"{theirs}) differs from the student's ({len(tokenizer)} tokens, fingerprint "
          f'{tokenizer_fingerprint(tokenizer)}); teacher and student must share one tokenizer')
    return info

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)

  # ---------------------------------------------------------------------------- scoring
  def _payload(self, ids: list[int]) -> tuple[str, dict]:
    return wire.request(self.spec.remote_protocol, ids, temperature=self.temperature,
                        top_k=self.top_k, model_id=self._model_id)

  def _parse(self, ids: list[int], ans) -> dict:
    """{'logprobs' [n], 'top_logprobs' [n, K], 'top_ids' [n, K]} from one answer."""
    try:
      return wire.parse_response(self.spec.remote_protocol, ids, ans, top_k=self.top_k,
                                 where=f'{self.url}: malformed answer')
    except wire.MalformedAnswer as e:
      raise RemoteTeacherError(str(e)) from None

  def _score_one(self, ids: list[int], abort: threading.Event) -> dict:
    path, body = self._payload(ids)
    return self._parse(ids, self._request(path, body, abort=abort))

  def submit_sequences(self, seqs: list[list[int]]) -> 'PendingSequences':
    """Posts unpadded sequences, `remote_concurrency` in flight at a time, without waiting:
    the caller goes on while the server scores (docs/design.md §11). `.result()` waits and
    returns one dict per sequence, in order; the first failure cancels the rest."""
    abort = threading.Event()
    return PendingSequences([self._pool.submit(self._score_one, s, abort) for s in seqs], abort)

  def score_sequences(self, seqs: list[list[int]]) -> list[dict]:
    """Scores unpadded sequences concurrently; the first failure cancels the rest."""
    return self.submit_sequences(seqs).result()

  def submit(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None):
    """`score` without waiting for the server: the requests are posted (the batch's tokens
    are read to the host first, which waits for the arrays, not for scoring) and a handle is
    returned whose `.result()` waits for the answers and places them as `score` does."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
      return Ready(None)
    from opd_jax import sharding as shd
    # With several processes every host posts every routed row: correct, but the server
    # then scores each row once per host.
    tokens, mask = shd.to_host(tokens_BxT), shd.to_host(mask_BxT).astype(bool)
    positions = {int(r): np.nonzero(mask[r])[0] for r in rows}
    posted = [r for r, p in positions.items() if len(p)]  # a row with no tokens scores 0
    pending = self.submit_sequences([tokens[r, positions[r]].tolist() for r in posted])
    self.rows_forwarded += len(posted)
    return _PendingScore(self, pending, mask, positions, posted, out_sharding)

  def score(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None):
    """Scores `rows` of the batch on the server; returns {'logprobs' [B, T]} (plus
    'top_logprobs' / 'top_ids' [B, T, K] when top_k) for all B rows, zeros on unrouted rows,
    batch-sharded on `out_sharding`'s mesh (else this teacher's mesh), or None when no row is
    routed here. Blocks until the server has answered. The caller counts tokens_scored."""
    return self.submit(tokens_BxT, mask_BxT, rows, out_sharding=out_sharding).result()

  def _assemble(self, results, mask, positions, posted, out_sharding):
    b, l = mask.shape
    out = {'logprobs': np.zeros((b, l), np.float32)}
    if self.top_k:
      out['top_logprobs'] = np.zeros((b, l, self.top_k), np.float32)
      out['top_ids'] = np.zeros((b, l, self.top_k), np.int32)
    for r, res in zip(posted, results):
      for key in out:
        out[key][r, positions[r]] = res[key]
    # As scoring.score_model: a position counts only when it and its predecessor are real.
    valid = np.zeros((b, l), bool)
    valid[:, 1:] = mask[:, 1:] & mask[:, :-1]
    for key in out:
      out[key] *= valid.reshape(valid.shape + (1,) * (out[key].ndim - 2))
    return self._place(out, out_sharding)

  def _place(self, out: dict, out_sharding):
    import jax

    from opd_jax import sharding as shd
    mesh = out_sharding.mesh if out_sharding is not None else self.mesh
    if mesh is None:
      return jax.tree.map(jax.numpy.asarray, out)
    # As LocalTeacher: batch-sharded, or replicated for a batch the data axes do not divide.
    return {k: jax.device_put(v, shd.rows_sharding(mesh, v.shape[0], v.ndim))
            for k, v in out.items()}


class PendingSequences:
  """Scoring requests in flight (`RemoteTeacher.submit_sequences`)."""

  def __init__(self, futures: list, abort: threading.Event):
    self.futures, self.abort = futures, abort

  def done(self) -> bool:
    return all(f.done() for f in self.futures)

  def result(self) -> list[dict]:
    cf.wait(self.futures, return_when=cf.FIRST_EXCEPTION)
    failed = [f for f in self.futures if f.done() and not f.cancelled()
              and f.exception() is not None]
    if failed:
      self.abort.set()
      for f in self.futures:
        f.cancel()
      raise failed[0].exception()
    return [f.result() for f in self.futures]


class _PendingScore:
  """`RemoteTeacher.submit`'s handle: `.result()` is what `score` returns."""

  def __init__(self, teacher, pending, mask, positions, posted, out_sharding):
    self._args = (teacher, pending, mask, positions, posted, out_sharding)

  def done(self) -> bool:
    return self._args[1].done()

  def result(self):
    teacher, pending, mask, positions, posted, out_sharding = self._args
    return teacher._assemble(pending.result(), mask, positions, posted, out_sharding)
