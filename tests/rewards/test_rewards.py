"""Verifiable rewards on real cases: math-verify equivalences, the code sandbox (passing,
failing, crashing, hanging, memory-hungry, networked, forking and file-writing programs),
exact match, routing by tag, and pass@k against a brute-force count."""

import faulthandler
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from opd_jax import rewards
from opd_jax.rewards import code as code_mod
from opd_jax.rewards.sandbox import network_namespace_prefix, run_python

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _no_hang():
  # Nothing here may hang: a test still running after 120 s dumps its stack and ends the run.
  faulthandler.dump_traceback_later(120, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()


def _rec(tag='math', **fields):
  return {'id': 'r1', 'prompt': 'p', 'tag': tag, **fields}


# -------------------------------------------------------------------------------- import
def test_import_is_cheap_and_has_no_jax():
  out = subprocess.run(
      [sys.executable, '-c', 'import sys, opd_jax.rewards; '
       'print(sorted(m for m in ("jax", "sympy", "math_verify") if m in sys.modules))'],
      capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
  assert out.stdout.strip() == '[]'


# ---------------------------------------------------------------------------------- math
@pytest.mark.parametrize('truth, response', [
    ('1/2', 'So the answer is \\boxed{0.5}.'),
    ('0.5', 'Therefore \\boxed{\\frac{1}{2}}'),
    ('\\frac{1}{2}', 'The answer is 1/2'),
    ('\\boxed{\\frac12}', 'final answer: 0.5'),
    ('\\frac{1}{2}', '$\\dfrac{1}{2}$'),
    ('3', '\\boxed{3.0}'),
    ('3.0', 'First 2, then 7, so the result is 3'),
    (3, 'We get \\boxed{3}'),
    ('\\sqrt{2}', '\\boxed{2^{1/2}}'),
    ('(1,2)', '\\boxed{(1, 2)}'),
    (['4', '\\frac{1}{2}'], '\\boxed{0.5}'),
    ('3', '<think>maybe \\boxed{7}</think>It is \\boxed{3}'),
])
def test_math_equivalent_forms(truth, response):
  assert rewards.get_reward('math')(response, _rec(ground_truth=truth)) == 1.0


@pytest.mark.parametrize('truth, response', [
    ('1/2', '\\boxed{0.25}'),
    ('3', '\\boxed{3.001}'),
    ('3', 'I first thought 3, but it is 4'),
    ('3', '<think>\\boxed{3}</think>The answer is \\boxed{4}'),
    ('\\sqrt{2}', '\\boxed{2}'),
])
def test_math_wrong_answers(truth, response):
  assert rewards.get_reward('math')(response, _rec(ground_truth=truth)) == 0.0


@pytest.mark.parametrize('response', [
    '', 'I do not know.', 'qwe \\boxed{', '\\boxed{}', '}}}{{{\\frac{\\sqrt{',
    '\x00\xff\u2603' * 50, '\\boxed{' * 20000,
])
def test_math_unparsable_scores_zero(response):
  assert rewards.get_reward('math')(response, _rec(ground_truth='3')) == 0.0


@pytest.mark.parametrize('response', [
    '\\boxed{9^{9^{9^{9}}}}', '\\boxed{10^{10^{10}}}', '\\boxed{(10^{7})!}', 'x = 9**9**9**9',
    '1' * 1_000_000,
])
def test_math_pathological_answers_are_bounded_in_any_thread(response):
  # A huge power cannot be interrupted inside CPython's bignum code in a worker thread; the
  # screening must reject it before it is evaluated, in the main thread and in a pool.
  reward = rewards.get_reward('math')
  start = time.monotonic()
  assert reward(response, _rec(ground_truth='3')) == 0.0
  with ThreadPoolExecutor(2) as pool:
    assert list(pool.map(lambda _: reward(response, _rec(ground_truth='3')), range(2))) == [0, 0]
  assert time.monotonic() - start < 20


def test_math_deadline_interrupts_a_slow_check_in_main_and_worker_threads(monkeypatch):
  import math_verify

  def spin(*args, **kwargs):
    while True:
      pass

  monkeypatch.setattr(math_verify, 'verify', spin)
  reward = rewards.get_reward('math')
  start = time.monotonic()
  assert reward('\\boxed{3}', _rec(ground_truth='3'), timeout_s=0.3) == 0.0
  with ThreadPoolExecutor(2) as pool:
    outs = list(pool.map(lambda _: reward('\\boxed{3}', _rec(ground_truth='3'), timeout_s=0.3),
                         range(2)))
  assert outs == [0.0, 0.0] and time.monotonic() - start < 10
  monkeypatch.undo()
  time.sleep(0.6)  # a stray re-fired deadline would surface here or in the next check
  assert reward('\\boxed{3}', _rec(ground_truth='3')) == 1.0


def test_math_missing_ground_truth_names_record_and_field():
  with pytest.raises(ValueError, match=r"'r1'.*'ground_truth'"):
    rewards.get_reward('math')('\\boxed{1}', _rec())


# ---------------------------------------------------------------------------- exact match
@pytest.mark.parametrize('response, truth, expected', [
    ('Natalia sold 48 + 24 = 72 clips.\n#### 72', '72', 1.0),
    ('Answer:   New\n  York ', 'New York', 1.0),
    ('so \\boxed{B} it is', 'B', 1.0),
    ('<think>answer: A</think>ANSWER: C', 'C', 1.0),
    ('The answer is C', 'C', 0.0),
    ('#### 72.', '72', 0.0),
    ('answer: paris', ['Paris', 'paris'], 1.0),
])
def test_exact_match(response, truth, expected):
  assert rewards.get_reward('exact_match')(response, _rec('qa', ground_truth=truth)) == expected


# ----------------------------------------------------------------------------------- code
SQUARE = 'Here is my solution:\n```python\nn = int(input())\nprint(n * n)\n```\nDone.'
IO_TESTS = [{'input': '3\n', 'output': '9'}, {'input': '4\n', 'output': '16\n'},
            {'input': '-5', 'output': '25  \n\n'}]


def _code(response, tests, **kw):
  return rewards.get_reward('code')(response, _rec('code', test_cases=tests), **kw)


def test_code_extraction():
  assert code_mod.extract_program(SQUARE) == 'n = int(input())\nprint(n * n)\n'
  two = '```python\nprint(1)\n```\ntext\n```\nprint(2)\n```\n```text\nexample output\n```'
  assert code_mod.extract_program(two) == 'print(2)\n'
  assert code_mod.extract_program('print(3)') == 'print(3)'
  assert code_mod.extract_program('<think>```python\nx\n```</think>```py\ny\n```') == 'y\n'


def test_code_passes_stdin_stdout_tests():
  assert _code(SQUARE, IO_TESTS) == 1.0
  # ROLL's key names, and test_cases stored as a JSON string.
  roll = json.dumps([{'stdin': '2', 'expected_stdout': '4'},
                     {'stdin': '5', 'expected_stdout': '25'}])
  assert _code(SQUARE, roll) == 1.0
  assert _code(SQUARE, {'inputs': ['6', '7'], 'outputs': ['36', '48']}) == 0.5


def test_code_fails_some_asserts_gives_a_fraction():
  program = '```python\ndef add(a, b):\n    return a + b if a < 10 else 0\n```'
  tests = ['assert add(1, 2) == 3', 'assert add(2, 2) == 4', 'assert add(3, 3) == 6',
           'assert add(10, 1) == 11']
  assert _code(program, tests) == 0.75
  assert _code(program, {'asserts': tests}) == 0.75
  assert _code(program, [{'assert_code': t} for t in tests]) == 0.75
  assert _code(program, tests, all_or_nothing=True) == 0.0
  assert _code(program, tests[:3], all_or_nothing=True) == 1.0


def test_code_that_raises_or_does_not_compile_scores_zero():
  assert _code('```python\nprint(1 // 0)\n```', [{'input': '', 'output': '1'}]) == 0.0
  assert _code('```python\ndef f(:\n```', ['assert f() == 1']) == 0.0
  # Correct output followed by a crash is a runtime error, as on a judge.
  assert _code('print(4)\nraise ValueError', [{'input': '', 'output': '4'}]) == 0.0


def test_code_exiting_before_the_asserts_passes_none():
  for escape in ('import sys; sys.exit(0)', 'import os; os._exit(0)'):
    assert _code(f'def f():\n    return 1\n{escape}', ['assert f() == 1']) == 0.0


def test_code_infinite_loop_and_sleep_are_killed_by_the_timeout():
  start = time.monotonic()
  assert _code('while True:\n    pass', IO_TESTS, timeout_s=1.0) == 0.0
  assert _code('import time\ntime.sleep(600)', ['assert True'], timeout_s=1.0) == 0.0
  # The first timeout ends the record: 2 runs, not 4.
  assert time.monotonic() - start < 6
  result = run_python('while True:\n    pass', timeout_s=0.5)
  assert result.timed_out and result.returncode == -9 and not result.completed


@pytest.mark.parametrize('program', [
    'x = bytearray(64 << 30)',
    'x = [0] * (10 ** 10)',
    'chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))',
])
def test_code_memory_hog_is_stopped(program):
  start = time.monotonic()
  assert _code(program + '\nprint("ok")', [{'input': '', 'output': 'ok'}], timeout_s=5.0,
               memory_mb=256) == 0.0
  result = run_python(program, memory_mb=256, timeout_s=5.0)
  assert 'MemoryError' in result.stderr or result.returncode in (-9, -11)
  assert time.monotonic() - start < 12


def test_code_output_is_bounded():
  result = run_python("while True:\n    print('x' * 1000)", max_output_bytes=1 << 16)
  assert result.output_overflow and len(result.stdout) == 1 << 16 and result.returncode != 0


@pytest.fixture
def tcp_server():
  """A server on 127.0.0.1 recording every connection it accepts."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(8)
  server.settimeout(0.1)
  accepted, stop = [], threading.Event()

  def serve():
    while not stop.is_set():
      try:
        conn, _ = server.accept()
        accepted.append(conn)
      except (socket.timeout, OSError):
        pass

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  yield server.getsockname()[1], accepted
  stop.set()
  thread.join()
  for conn in accepted:
    conn.close()
  server.close()


@pytest.mark.parametrize('network_namespace', [False, None])
def test_code_socket_is_blocked(tcp_server, network_namespace):
  port, accepted = tcp_server
  socket.create_connection(('127.0.0.1', port)).close()  # the server works: one connection
  deadline = time.monotonic() + 5
  while not accepted and time.monotonic() < deadline:
    time.sleep(0.02)
  assert len(accepted) == 1
  attempts = [f"socket.create_connection(('127.0.0.1', {port}), timeout=2)",
              f"socket.socket().connect(('127.0.0.1', {port}))",
              "socket.getaddrinfo('localhost', 80)",
              "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(('127.0.0.1', 0))"]
  program = 'import socket\n' + '\n'.join(
      f'try:\n    {a}\n    print("connected")\nexcept PermissionError:\n    print("blocked")'
      for a in attempts)
  result = run_python(program, network_namespace=network_namespace)
  assert result.stdout.split() == ['blocked'] * 4, result.stderr
  connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\nprint('ok')"
  assert _code(connect, [{'input': '', 'output': 'ok'}],
               network_namespace=network_namespace) == 0.0
  time.sleep(0.3)
  assert len(accepted) == 1  # nothing from the sandbox reached the server


def test_unshare_is_detected_once_and_works_when_found():
  prefix = network_namespace_prefix()
  assert network_namespace_prefix() is prefix
  if prefix:
    # Even with the audit hook bypassed for this check, the namespace has no route out.
    out = subprocess.run([*prefix, sys.executable, '-c',
                          'import socket\ntry:\n socket.create_connection(("1.1.1.1", 53), 1)\n'
                          ' print("up")\nexcept OSError:\n print("down")'],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == 'down'


def test_code_cannot_fork_spawn_or_signal(tmp_path):
  marker = str(tmp_path / 'spawned')
  attempts = ['os.fork()', f'os.system("touch {marker}")',
              f'os.posix_spawn("/usr/bin/touch", ["touch", "{marker}"], {{}})',
              f'os.execv("/usr/bin/touch", ["touch", "{marker}"])',
              f'__import__("subprocess").run(["touch", "{marker}"])',
              f'__import__("pty").spawn(["touch", "{marker}"])',
              '__import__("multiprocessing").Process(target=print).start()',
              '__import__("ctypes").CDLL(None).fork()',
              'os.kill(os.getppid(), 0)']
  program = 'import os\n' + '\n'.join(
      f'try:\n    {a}\n    print("ran")\nexcept PermissionError:\n    print("blocked")'
      for a in attempts)
  result = run_python(program)
  assert result.stdout.split() == ['blocked'] * len(attempts), result.stderr
  assert not os.path.exists(marker)
  assert _code(f'import os\nos.system("touch {marker}")\nprint(1)',
               [{'input': '', 'output': '1'}]) == 0.0
  assert not os.path.exists(marker)


def test_code_writes_only_inside_its_temporary_directory(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('precious')
  outside = tmp_path / 'escape.txt'
  attempts = [f'open({str(outside)!r}, "w").write("x")',
              f'os.remove({str(victim)!r})',
              f'os.rename("mine.txt", {str(outside)!r})',
              f'os.symlink({str(victim)!r}, "link")',
              f'os.open({str(tmp_path)!r}, os.O_RDONLY)',
              'os.open("../escape.txt", os.O_WRONLY | os.O_CREAT)',
              f'__import__("shutil").rmtree({str(tmp_path)!r})']
  program = ('import os\nopen("mine.txt", "w").write("mine")\nos.mkdir("sub")\n'
             'open("sub/x", "w").write("y")\nprint(open("mine.txt").read())\n'
             + '\n'.join(f'try:\n    {a}\n    print("done")\nexcept PermissionError:\n'
                         f'    print("blocked")' for a in attempts)
             + '\nprint(os.getcwd())')
  result = run_python(program)
  lines = result.stdout.split()
  assert result.returncode == 0, result.stderr
  assert lines[0] == 'mine' and lines[1:-1] == ['blocked'] * len(attempts), result.stdout
  workdir = lines[-1]
  assert os.path.basename(workdir).startswith('opd_sandbox_')
  assert not os.path.exists(workdir)  # removed with everything the program wrote
  assert victim.read_text() == 'precious' and not outside.exists()


def test_code_cannot_write_to_a_device_node_it_makes():
  # As root without a user namespace mknod works, and the hook refuses the write instead;
  # otherwise mknod itself fails. /dev/null's numbers keep the check harmless either way.
  program = ('import os\ntry:\n    os.mknod("nul", 0o020600, os.makedev(1, 3))\n'
             '    open("nul", "w").write("x")\n    print("wrote")\n'
             'except PermissionError:\n    print("blocked")')
  for network_namespace in (False, None):
    result = run_python(program, network_namespace=network_namespace)
    assert result.stdout.strip() == 'blocked', result.stderr


def test_site_packages_are_off_unless_asked_for():
  program = 'import numpy\nprint(int(numpy.arange(4).sum()))'
  assert 'ModuleNotFoundError' in run_python(program).stderr
  assert run_python(program, site_packages=True, timeout_s=20).stdout.strip() == '6'


def test_code_test_cases_errors_name_record_and_field():
  for bad in (None, [], 'not json', {'foo': 1}, [{'in': 1}], [1, 2]):
    with pytest.raises(ValueError, match=r"'r1'.*'test_cases'"):
      _code(SQUARE, bad)


def test_harness_failure_is_loud():
  with pytest.raises(RuntimeError, match='harness failed'):
    run_python('print(1)', python='/bin/false')


# ------------------------------------------------------------------------ compute_rewards
def test_compute_rewards_routes_by_tag():
  records = [
      _rec('math', id='m1', ground_truth='1/2'),
      _rec('code', id='c1', test_cases=IO_TESTS),
      _rec('qa', id='q1', ground_truth='Paris'),
      _rec('math', id='m2', ground_truth='7'),
      _rec('code', id='c2', test_cases=['assert add(1, 1) == 2', 'assert add(1, 2) == 4']),
      _rec('trivia', id='t1', ground_truth='B'),
  ]
  responses = ['\\boxed{0.5}', SQUARE, 'answer: Paris', '\\boxed{8}',
               'def add(a, b):\n    return a + b', '\\boxed{B}']
  out = rewards.compute_rewards(responses, records,
                                {'math': 'math', 'code': 'code', 'qa': 'exact_match'},
                                default='exact_match', max_workers=2,
                                reward_kwargs={'code': {'timeout_s': 3.0}})
  assert out.dtype == np.float32 and out.shape == (6,)
  np.testing.assert_array_equal(out, np.array([1, 1, 1, 0, 0.5, 1], np.float32))
  # The same responses under swapped routing: the math reward cannot read the code record.
  with pytest.raises(ValueError, match=r"'c1'.*'ground_truth'"):
    rewards.compute_rewards(responses[:2], records[:2], {'math': 'math', 'code': 'math'})


def test_compute_rewards_unknown_tag_and_reward_errors():
  records = [_rec('math', ground_truth='1'), _rec('poetry', id='p7', ground_truth='x')]
  with pytest.raises(ValueError, match=r"'p7'.*'poetry'.*\['math'\]"):
    rewards.compute_rewards(['1', '2'], records, {'math': 'math'})
  with pytest.raises(ValueError, match=r"unknown reward 'nope'.*code.*exact_match.*math"):
    rewards.compute_rewards(['1', '2'], records, {'math': 'nope'})
  with pytest.raises(ValueError, match='unknown reward'):
    rewards.get_reward('nope')
  with pytest.raises(ValueError, match='2 responses but 1 records'):
    rewards.compute_rewards(['1', '2'], records[:1], {'math': 'math'})


def test_register_reward_and_range_check():
  @rewards.register_reward('_test_length')
  def length_reward(response, record, *, scale=1.0):
    return min(1.0, len(response) * scale)

  try:
    out = rewards.compute_rewards(['ab', ''], [_rec('x'), _rec('x')], {'x': '_test_length'},
                                  reward_kwargs={'_test_length': {'scale': 0.25}})
    np.testing.assert_array_equal(out, np.array([0.5, 0.0], np.float32))
    with pytest.raises(ValueError, match='already registered'):
      rewards.register_reward('_test_length')(lambda r, rec: 0.0)
    rewards.REWARDS['_test_length'] = lambda r, rec: 2.0
    with pytest.raises(ValueError, match=r"returned 2.0.*\[0, 1\]"):
      rewards.compute_rewards(['a'], [_rec('x')], {'x': '_test_length'})
  finally:
    del rewards.REWARDS['_test_length']


# --------------------------------------------------------------------------------- pass@k
def _brute_pass_at_k(n, c, k):
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert math.isclose(rewards.pass_at_k(n, c, k), _brute_pass_at_k(n, c, k),
                            rel_tol=1e-12, abs_tol=1e-12), (n, c, k)
  assert math.isclose(rewards.pass_at_k(200, 3, 100), 1 - math.comb(197, 100) / math.comb(200, 100))
  for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5)):
    with pytest.raises(ValueError):
      rewards.pass_at_k(*bad)


def test_pass_at_k_by_tag():
  per_sample = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0.5, 0], [1, 1, 1, 1]]
  tags = ['math', 'math', 'code', 'code']
  out = rewards.pass_at_k_by_tag(tags, per_sample, [1, 2])
  assert out == pytest.approx({
      'eval/pass@1': (0.25 + 0 + 0.5 + 1) / 4, 'eval/pass@1/math': 0.125,
      'eval/pass@1/code': 0.75,
      'eval/pass@2': (0.5 + 0 + 5 / 6 + 1) / 4, 'eval/pass@2/math': 0.25,
      'eval/pass@2/code': (5 / 6 + 1) / 2})
  with pytest.raises(ValueError, match='shape'):
    rewards.pass_at_k_by_tag(tags[:3], per_sample, 1)
