"""The remote teacher: opd_jax.teachers.server as a real process on 127.0.0.1 and the
RemoteTeacher client against it (SGLang and vLLM protocols) compared with in-process scoring,
the trainer with its teacher remote, dynamic batching, and faults (no server, a killed
server, a slow server, HTTP 5xx / 400, vocabulary mismatch). Every wait is bounded and every
process started here is killed when its test ends."""

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import numpy as np
import pytest

from opd_jax import sharding as shd
from opd_jax.data import VocabMismatchError
from opd_jax.teachers.remote import RemoteTeacher, RemoteTeacherError
from opd_jax.teachers.local import LocalTeacher, TeacherSpec
from opd_jax.models.tiny import build_char_tokenizer, resolve_model
from opd_jax.train import run
from test_train import load_config, with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs._local import TINY_TEACHER  # noqa: E402

START_TIMEOUT_S = 180


class ServerProcess:
  """`python -m opd_jax.teachers.server --port 0 ...`; `url` once it prints its address."""

  def __init__(self, model, *args, devices=None):
    env = dict(os.environ)
    if devices:
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    self.proc = subprocess.Popen(
        [sys.executable, '-u', '-m', 'opd_jax.teachers.server', '--model', model, '--port', '0',
         *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines, self._urls = [], queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    try:
      self.url = self._urls.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
      self.kill()
      raise AssertionError('server did not start:\n' + ''.join(self.lines[-30:])) from None
    if self.url is None:
      raise AssertionError('server exited:\n' + ''.join(self.lines[-30:]))

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      if line.startswith('serving ') and ' on http://' in line:
        self._urls.put(line.rsplit(' on ', 1)[1].strip())
    self._urls.put(None)

  def info(self):
    with urllib.request.urlopen(self.url + '/get_model_info', timeout=10) as r:
      return json.load(r)

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait(timeout=30)


def _spec(url, protocol='sglang', **kw):
  kw = dict(dict(remote_timeout_s=60.0, remote_retries=2, remote_concurrency=16), **kw)
  return TeacherSpec(name='teacher', remote_url=url, remote_protocol=protocol, **kw)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def teacher_path():
  return resolve_model(TINY_TEACHER)


@pytest.fixture(scope='module')
def tokenizer(teacher_path):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(teacher_path)


@pytest.fixture(scope='module')
def server():
  # The server shards over its own 8 fake CPU devices (inherited XLA_FLAGS).
  s = ServerProcess(TINY_TEACHER, '--max-batch-size', '16', '--batch-wait-ms', '100')
  yield s
  s.kill()


@pytest.fixture(scope='module')
def mesh():
  return shd.make_mesh({'fsdp': -1})


@pytest.fixture(scope='module')
def local4(teacher_path, mesh):
  return LocalTeacher(TeacherSpec(name='teacher', model=teacher_path), student_mesh=mesh, top_k=4)


def _batch(seed=0, b=8, p=12, n=20, vocab=101):
  """Left-padded prompts + right-padded responses, as the trainer builds them. [B, P + N]."""
  rng = np.random.RandomState(seed)
  tokens = np.zeros((b, p + n), np.int32)
  mask = np.zeros((b, p + n), np.int32)
  for i in range(b):
    lp, ln = rng.randint(1, p + 1), rng.randint(0, n + 1)
    tokens[i, p - lp:p + ln] = rng.randint(0, vocab, lp + ln)
    mask[i, p - lp:p + ln] = 1
  return tokens, mask


def test_server_matches_in_process_scoring_both_protocols(server, tokenizer, mesh, local4):
  tokens, mask = _batch()
  sharding = shd.batch_sharding(mesh)
  tokens_d, mask_d = jax.device_put((tokens, mask), sharding)
  rows = np.array([0, 2, 3, 5, 6])
  want = jax.device_get(local4.score(tokens_d, mask_d, rows, out_sharding=sharding))
  valid = np.zeros_like(mask, bool)
  valid[:, 1:] = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
  assert np.abs(want['logprobs']).sum() > 0
  for protocol, k in [('sglang', 0), ('sglang', 4), ('vllm', 4)]:
    remote = RemoteTeacher(_spec(server.url, protocol), student_tokenizer=tokenizer, mesh=mesh,
                           top_k=k)
    got = remote.score(tokens_d, mask_d, rows, out_sharding=sharding)
    assert got['logprobs'].sharding.is_equivalent_to(sharding, 2)
    got = jax.device_get(got)
    np.testing.assert_allclose(got['logprobs'], want['logprobs'], atol=1e-5, rtol=0,
                               err_msg=f'{protocol} top_k={k}')
    assert remote.rows_forwarded == len(rows) and remote.score(tokens_d, mask_d, []) is None
    if k:
      np.testing.assert_allclose(got['top_logprobs'], want['top_logprobs'], atol=1e-5, rtol=0)
      np.testing.assert_array_equal(got['top_ids'][valid], want['top_ids'][valid])
    else:
      assert set(got) == {'logprobs'}
      # A batch the data axes do not divide (an evaluation's last chunk) comes back replicated.
      odd = remote.score(tokens_d[:3], mask_d[:3], np.array([0, 2]), out_sharding=sharding)
      np.testing.assert_allclose(np.asarray(odd['logprobs']),
                                 want['logprobs'][:3] * [[1], [0], [1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize('temperature, top_k, full_vocab', [(1.0, 0, None), (0.7, 5, None),
                                                         (0.7, 0, 'reverse_kl')])
def test_trainer_with_remote_teacher_matches_in_process(server, tmp_path, temperature, top_k,
                                                        full_vocab):
  # The remote teacher scores at the rollout temperature, as the in-process one does (it
  # used to be built without it, so at T != 1 the two gave different training signals).
  # Stopping "as if preempted" at the last step skips the final eval and export (time).
  common = dict(total_steps=3, debug__stop_at_step=3, checkpoint__every=100,
                rollout__temperature=temperature, rollout__top_k=top_k,
                loss__full_vocab=full_vocab, loss__full_vocab_top_k=4)
  local_cfg = with_overrides(load_config('opd_single_teacher', 'runlocal'), **common)
  remote_cfg = with_overrides(load_config('opd_remote_teacher', 'runlocal'),
                              teachers__teacher__remote_url=server.url, **common)
  a, b = local_cfg.to_dict(), remote_cfg.to_dict()
  assert b['teachers']['teacher']['model'] is None and a['teachers']['teacher']['model']
  a.pop('teachers'), b.pop('teachers')
  assert a == b  # the two recipes differ only in where the teacher lives
  before = server.info()['sequences_scored']
  local = run(local_cfg, str(tmp_path / 'local'))
  remote = run(remote_cfg, str(tmp_path / 'remote'))
  assert remote['step'] == local['step'] == 3
  keys = ['loss', 'opd/reverse_kl', 'opd/reverse_kl/teacher', 'grad_norm',
          'rollout/response_len'] + (['loss/full_vocab'] if full_vocab else [])
  for key in keys:
    want, got = dict(local['history'][key]), dict(remote['history'][key])
    assert sorted(got) == [1, 2, 3], key
    for step in (1, 2, 3):
      assert got[step] == pytest.approx(want[step], abs=1e-5), (key, step)
  assert remote['tokens_scored'] == local['tokens_scored']
  rows = 3 * remote_cfg.rollout.prompts_per_step * remote_cfg.rollout.n_samples
  assert server.info()['sequences_scored'] - before == rows


def test_concurrent_requests_are_batched(server, tokenizer, mesh, local4):
  remote = RemoteTeacher(_spec(server.url, remote_concurrency=16), student_tokenizer=tokenizer)
  rng = np.random.RandomState(1)
  seqs = [rng.randint(0, 101, rng.randint(20, 60)).tolist() for _ in range(16)]
  remote.score_sequences(seqs)  # compiles the shapes this test uses
  before = server.info()
  got = remote.score_sequences(seqs)
  after = server.info()
  calls = after['device_calls'] - before['device_calls']
  assert after['sequences_scored'] - before['sequences_scored'] == 16
  assert 1 <= calls < 16, calls
  tokens = np.zeros((16, 64), np.int32)
  mask = np.zeros((16, 64), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], mask[i, :len(s)] = s, 1
  tokens, mask = jax.device_put((tokens, mask), shd.batch_sharding(mesh))
  want = np.asarray(local4.score(tokens, mask, np.arange(16))['logprobs'])
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(got[i]['logprobs'], want[i, :len(s)], atol=1e-5, rtol=0)


def test_bad_requests_get_400_without_retries_and_the_server_keeps_serving(server, tokenizer):
  remote = RemoteTeacher(_spec(server.url, remote_retries=3), student_tokenizer=tokenizer,
                         backoff_s=5.0)
  t0 = time.monotonic()
  with pytest.raises(RemoteTeacherError, match=r'HTTP 400 \(not retried\).*token id 500 at '
                     r'position 1 is outside the vocabulary \[0, 101\)'):
    remote.score_sequences([[1, 500, 2]])
  assert time.monotonic() - t0 < 5 and remote.stats['retries'] == 0  # no backoff slept
  for body, message in [(b'{"input_ids": [1, 2', 'malformed JSON'),
                        (b'{"sampling_params": {}}', 'missing field input_ids'),
                        (json.dumps({'input_ids': [1] * 5000, 'return_logprob': True}).encode(),
                         'longer than the maximum length 4096'),
                        (b'{"input_ids": [1, 2], "return_logprob": true, '
                         b'"sampling_params": {"max_new_tokens": 8}}', 'max_new_tokens must be 0')]:
    req = urllib.request.Request(server.url + '/generate', data=body, method='POST')
    with pytest.raises(urllib.error.HTTPError) as err:
      urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert message in json.load(err.value)['error']['message']
  assert remote.score_sequences([[1, 2, 3]])[0]['logprobs'].shape == (3,)  # still serving


def test_vocabulary_mismatch_fails_at_start_up(server):
  with pytest.raises(VocabMismatchError, match=r'vocabulary of 101 ids.*tokenizer length 200'):
    RemoteTeacher(_spec(server.url), student_tokenizer=build_char_tokenizer(vocab_size=200))
  import string
  same_size_other_order = build_char_tokenizer(chars=string.ascii_letters + string.digits
                                               + string.punctuation + ' \n')
  with pytest.raises(VocabMismatchError, match="server's tokenizer .* differs from the student's"):
    RemoteTeacher(_spec(server.url), student_tokenizer=same_size_other_order)


def test_server_not_started_fails_after_retries_naming_the_url():
  url = f'http://127.0.0.1:{_free_port()}'
  t0 = time.monotonic()
  with pytest.raises(RemoteTeacherError, match=rf'cannot reach .*{url}/get_model_info failed 3 '
                     r'attempts.*ConnectionRefusedError'):
    RemoteTeacher(_spec(url, remote_retries=2, remote_timeout_s=2.0), backoff_s=0.2)
  elapsed = time.monotonic() - t0
  assert 0.2 * (1 + 2) * 0.75 <= elapsed < 10  # it did back off, and did not hang


def test_server_killed_mid_run_fails_cleanly(tokenizer):
  s = ServerProcess(TINY_TEACHER, devices=1)
  try:
    remote = RemoteTeacher(_spec(s.url, remote_retries=2, remote_timeout_s=5.0),
                           student_tokenizer=tokenizer, backoff_s=0.1)
    assert len(remote.score_sequences([[1, 2, 3]])[0]['logprobs']) == 3
    s.kill()
    t0 = time.monotonic()
    with pytest.raises(RemoteTeacherError, match=rf'{s.url}/generate failed 3 attempts'):
      remote.score_sequences([[1, 2, 3], [4, 5, 6, 7]])
    assert time.monotonic() - t0 < 15 and remote.stats['retries'] >= 2
  finally:
    s.kill()


class _FakeHandler(BaseHTTPRequestHandler):
  """/slow sleeps past the client's timeout; /flaky answers 503 twice, then a valid result."""
  calls = {'flaky': 0}

  def log_message(self, *args):
    pass

  def _json(self, status, obj):
    data = json.dumps(obj).encode()
    try:
      self.send_response(status)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # /slow: the client has timed out and gone, as intended

  def do_GET(self):  # noqa: N802
    self._json(200, {'model_path': 'fake', 'vocab_size': 101, 'max_length': 64})

  def do_POST(self):  # noqa: N802
    ids = json.loads(self.rfile.read(int(self.headers['Content-Length'])))['input_ids']
    if self.path.startswith('/slow'):
      time.sleep(3)
    elif self.path.startswith('/flaky'):
      self.calls['flaky'] += 1
      if self.calls['flaky'] <= 2:
        return self._json(503, {'error': {'message': 'warming up'}})
    entries = [[None if t == 0 else -1.0, i, None] for t, i in enumerate(ids)]
    self._json(200, {'text': '', 'meta_info': {'input_token_logprobs': entries}})


@pytest.fixture()
def fake_server():
  httpd = ThreadingHTTPServer(('127.0.0.1', 0), _FakeHandler)
  httpd.daemon_threads = True
  threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.1), daemon=True).start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()


def test_slow_server_times_out_and_5xx_is_retried(fake_server):
  slow = RemoteTeacher(_spec(fake_server + '/slow', remote_retries=1, remote_timeout_s=0.5),
                       backoff_s=0.1)
  t0 = time.monotonic()
  with pytest.raises(RemoteTeacherError, match=r'/slow/generate failed 2 attempts.*timed out '
                     r'after 0.5 s'):
    slow.score_sequences([[1, 2, 3]])
  assert time.monotonic() - t0 < 3  # two 0.5 s timeouts and one backoff, not the 3 s sleep
  flaky = RemoteTeacher(_spec(fake_server + '/flaky', remote_retries=3), backoff_s=0.05)
  out = flaky.score_sequences([[1, 2, 3]])
  np.testing.assert_array_equal(out[0]['logprobs'], [0.0, -1.0, -1.0])
  assert flaky.stats['retries'] == 2


def test_server_under_load_answers_every_client_with_its_own_result(server, teacher_path,
                                                                   tokenizer):
  """8 clients x 50 requests at once on loopback, each client at its own temperature / top-k
  and every sequence distinct: every answer is the in-process score of exactly the sequence
  sent (no request lost, none answered with another's result), and the server keeps
  serving. Latency under this load is measured by `python -m opd_jax.bench.serve_teacher
  --clients 8 --requests 400` (p50 / p99, docs/benchmarks.md), not here."""
  from flax import nnx
  from opd_jax.models import load_pretrained
  from opd_jax.teachers.scoring import make_score_fn
  clients, per_client = 8, 50
  rng = np.random.RandomState(7)
  seqs, seen = [], set()
  while len(seqs) < clients * per_client:
    s = tuple(rng.randint(0, 101, rng.randint(4, 48)).tolist())
    if s not in seen:
      seen.add(s)
      seqs.append(list(s))
  settings = [(1.0 if c % 2 == 0 else 0.7, 0 if c % 4 < 2 else 3) for c in range(clients)]
  before = server.info()
  answers = [[None] * per_client for _ in range(clients)]
  errors = []
  start = threading.Barrier(clients)

  def client(c):
    temperature, k = settings[c]
    remote = RemoteTeacher(_spec(server.url, remote_concurrency=1), student_tokenizer=tokenizer,
                           temperature=temperature, top_k=k)
    start.wait(timeout=60)
    try:
      for i in range(per_client):
        answers[c][i] = remote.score_sequences([seqs[c * per_client + i]])[0]
    except Exception as e:  # noqa: BLE001 -- reported by the assertion below
      errors.append(e)
    finally:
      remote.close()

  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=600)
  assert not errors, errors[:3]
  assert all(a is not None for row in answers for a in row)
  after = server.info()
  assert after['sequences_scored'] - before['sequences_scored'] == clients * per_client
  assert after['timeouts'] == before['timeouts']
  assert after['rejected_busy'] == before['rejected_busy']
  assert after['device_calls'] - before['device_calls'] < clients * per_client  # batched
  # The reference: the same checkpoint scored in this process, one call per client setting.
  graphdef, params = nnx.split(load_pretrained(teacher_path))
  length = 48
  for c, (temperature, k) in enumerate(settings):
    mine = seqs[c * per_client:(c + 1) * per_client]
    tokens = np.zeros((per_client, length), np.int32)
    mask = np.zeros((per_client, length), np.int32)
    for i, s in enumerate(mine):
      tokens[i, :len(s)], mask[i, :len(s)] = s, 1
    want = jax.device_get(make_score_fn(graphdef, temperature=temperature, top_k=k)(
        params, tokens, mask))
    for i, s in enumerate(mine):
      got, n = answers[c][i], len(s)
      np.testing.assert_allclose(got['logprobs'][1:], want['logprobs'][i, 1:n], atol=1e-5,
                                 rtol=0, err_msg=f'client {c} request {i}')
      if k:
        np.testing.assert_allclose(got['top_logprobs'][1:], want['top_logprobs'][i, 1:n],
                                   atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got['top_ids'][1:], want['top_ids'][i, 1:n])
  remote = RemoteTeacher(_spec(server.url), student_tokenizer=tokenizer)
  assert remote.score_sequences([[5, 6, 7]])[0]['logprobs'].shape == (3,)  # still serving


def test_submitted_requests_stay_in_flight_while_the_caller_goes_on(server, tokenizer, mesh,
                                                                   local4):
  """`submit` posts the batch and returns at once; its result is `score`'s."""
  remote = RemoteTeacher(_spec(server.url, remote_concurrency=4), student_tokenizer=tokenizer,
                         mesh=mesh)
  tokens, mask = _batch(seed=3)
  sharding = shd.batch_sharding(mesh)
  tokens_d, mask_d = jax.device_put((tokens, mask), sharding)
  rows = np.arange(8)
  before = remote.stats['requests']
  pending = remote.submit(tokens_d, mask_d, rows, out_sharding=sharding)
  while not pending.done():  # all 8 requests were posted by the pool, none by result()
    time.sleep(0.01)
  assert remote.stats['requests'] - before == 8
  got = jax.device_get(pending.result())
  want = jax.device_get(local4.score(tokens_d, mask_d, rows, out_sharding=sharding))
  np.testing.assert_allclose(got['logprobs'], want['logprobs'], atol=1e-5, rtol=0)


def test_server_killed_mid_training_stops_naming_the_url_and_checkpoint_then_resumes(
    server, tmp_path):
  """The trainer's server is SIGKILLed once step 1's checkpoint exists: the client retries
  (remote_retries=2 with backoff), then the run stops with an error naming the URL and the
  last checkpoint; a rerun with the same workdir and a live server resumes from it and ends
  with exactly the metrics of a run that was never interrupted."""
  common = dict(total_steps=4, checkpoint__every=1, eval__num_prompts=2, eval__batch_size=8,
                export__hf_dir='')
  whole = run(with_overrides(load_config('opd_remote_teacher', 'runlocal'),
                             teachers__teacher__remote_url=server.url, **common),
              str(tmp_path / 'whole'))
  doomed = ServerProcess(TINY_TEACHER)
  workdir = tmp_path / 'cut'
  stop = threading.Event()

  def kill_after_first_checkpoint():
    while not stop.is_set():
      if (workdir / 'checkpoints' / '1').is_dir():
        doomed.kill()
        return
      time.sleep(0.005)

  killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
  killer.start()
  try:
    cfg = with_overrides(load_config('opd_remote_teacher', 'runlocal'),
                         teachers__teacher__remote_url=doomed.url, **common)
    with pytest.raises(RemoteTeacherError) as err:
      run(cfg, str(workdir))
  finally:
    stop.set()
    killer.join(timeout=30)
    doomed.kill()
  msg = str(err.value)
  last = int(re.search(r'the last checkpoint is step (\d+) in (\S+);', msg).group(1))
  assert last >= 1 and f'{doomed.url}/generate failed 3 attempts' in msg, msg
  assert str(workdir / 'checkpoints') in msg and 'rerun with the same --workdir' in msg
  resumed = run(with_overrides(load_config('opd_remote_teacher', 'runlocal'),
                               teachers__teacher__remote_url=server.url, **common),
                str(workdir))
  assert resumed['step'] == whole['step'] == 4
  for key in ['loss', 'grad_norm', 'opd/reverse_kl']:
    assert dict(resumed['history'][key]) == pytest.approx(dict(whole['history'][key]),
                                                          abs=1e-6), key
  assert resumed['final']['eval/accuracy'] == whole['final']['eval/accuracy']
