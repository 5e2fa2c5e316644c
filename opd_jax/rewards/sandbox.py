"""Runs an untrusted Python program in a subprocess with time, memory and output limits, in a
fresh temporary directory, without network.

Layers, from the strongest:
  * the parent: a wall-clock timeout after which the whole process group is SIGKILLed
    (start_new_session=True, os.killpg); stdout and stderr go to anonymous temporary files of
    which at most `max_output_bytes` are read back; the working directory is a new temporary
    directory, deleted afterwards; the environment is minimal and `python -I -S -B` ignores
    PYTHON* variables, user and site packages (stdlib only unless site_packages=True).
  * the kernel: resource limits (CPU seconds, address space, file size, processes, open
    files, no core dumps), set by the child on itself before the program runs (_harness.py)
    rather than in a preexec_fn, which is unsafe in a process with threads (JAX's, or our own
    thread pool). Where `unshare` works unprivileged (detected once) the child also gets an
    empty network namespace and, preferably, its own user namespace, which takes away the
    capabilities that matter outside it (e.g. creating device nodes) even from root.
  * an audit hook installed before the program (see _harness.py) that refuses sockets,
    process creation, signals, ctypes and writes outside the directory. It is the layer that
    holds everywhere, but audit hooks are not a security boundary: C code can bypass them, so
    the modules known to do so (ctypes, _posixsubprocess, ...) are refused, and site packages
    (third-party C extensions; numpy needs ctypes) are off by default.
Not protected against: reading any file this user can read (the program has no way to send
it anywhere); filling the disk with up to max_output_bytes per file written; os.mkfifo /
os.mknod outside the directory (no audit event; device nodes need root without a user
namespace, and writing to one is refused); a program written to defeat the harness from
inside its own process (e.g. forging test results by walking the interpreter's frames).
RLIMIT_NPROC is not enforced for root (not even in a user namespace); elsewhere it also counts
threads, so max_processes=0 forbids threads too (None leaves it unset). Running the trainer
as root is therefore weaker than running it as an ordinary user.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_harness.py')
_STDERR_BYTES = 16 << 10


@dataclasses.dataclass
class RunResult:
  """What one sandboxed run did.

  returncode: exit status (negative: killed by that signal, e.g. -9 after a timeout).
  stdout: at most max_output_bytes of it, decoded as UTF-8 (undecodable bytes replaced).
  stderr: its first 16 KiB, for debugging.
  timed_out: killed by the wall-clock timeout.
  output_overflow: stdout reached max_output_bytes (the output is incomplete).
  started: the harness reached the program (False: Python or the sandbox itself failed).
  completed: the program and all its tests ran to the end (no crash, no timeout).
  assert_results: per test in 'asserts' mode, whether it passed (never reached: False).
  wall_s: seconds from start to exit or kill.
  """
  returncode: int
  stdout: str
  stderr: str
  timed_out: bool
  output_overflow: bool
  started: bool
  completed: bool
  assert_results: list[bool]
  wall_s: float


@functools.lru_cache(maxsize=None)
def _harness_source() -> str:
  with open(_HARNESS) as f:
    return f.read()


@functools.lru_cache(maxsize=None)
def network_namespace_prefix() -> tuple[str, ...]:
  """The `unshare` command line that gives a child an empty network namespace, or ().

  Tried once per process, in order: with a new user namespace mapping the current user, then
  mapping root (both work unprivileged where user namespaces are enabled, and even for root
  they drop the capabilities that count outside, e.g. creating device nodes), then plain
  `unshare --net` (root or CAP_SYS_ADMIN only).
  """
  exe = shutil.which('unshare')
  if exe is None:
    return ()
  for flags in (('--map-current-user', '--net'), ('--map-root-user', '--net'), ('--net',)):
    try:
      proc = subprocess.run([exe, *flags, sys.executable, '-I', '-S', '-c', ''],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
      continue
    if proc.returncode == 0:
      return (exe, *flags)
  log.info('sandbox: `unshare --net` does not work here; the audit hook alone blocks network')
  return ()


def _limits(timeout_s: float, memory_mb: int, max_output_bytes: int, max_open_files: int,
            max_processes: int | None) -> dict[str, int]:
  memory = int(memory_mb) << 20
  limits = {
      'RLIMIT_CPU': math.ceil(timeout_s) + 1,
      'RLIMIT_AS': memory,
      # +1: a file (or stdout) that reaches the limit shows that output was cut off.
      'RLIMIT_FSIZE': max_output_bytes + 1,
      'RLIMIT_NOFILE': max_open_files,
      'RLIMIT_CORE': 0,
      # Deep recursion (common in contest solutions) needs more than the default 8 MiB.
      'RLIMIT_STACK': min(memory, 256 << 20),
  }
  if max_processes is not None:
    limits['RLIMIT_NPROC'] = max_processes
  return limits


def _kill_group(proc: subprocess.Popen) -> None:
  for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
    try:
      kill()
    except (ProcessLookupError, PermissionError):
      pass


def run_python(program: str, *, stdin: str = '', asserts: list[str] | None = None,
               timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 8 << 20, max_open_files: int = 64,
               max_processes: int | None = 0, network_namespace: bool | None = None,
               site_packages: bool = False, python: str | None = None) -> RunResult:
  """Runs `program` once in the sandbox described in the module docstring.

  stdin: the program's standard input.
  asserts: None for a plain run; else Python snippets (e.g. 'assert f(1) == 2') run one by one
    after the program in its namespace, each passing when it raises nothing.
  timeout_s: wall-clock seconds for the whole run (program and all asserts); the CPU limit is
    one second more, rounded up.
  memory_mb: address-space limit. max_output_bytes: limit on stdout and on each file written.
  max_open_files: RLIMIT_NOFILE. max_processes: RLIMIT_NPROC (None: not set).
  network_namespace: run under `unshare --net` (None: when it works here; True: required).
  site_packages: let the program import installed third-party packages. Weaker: numpy and
    others need ctypes, which is then allowed, and C code is invisible to the audit hook.
  python: the interpreter (default: this one).
  """
  prefix = network_namespace_prefix() if network_namespace in (None, True) else ()
  if network_namespace and not prefix:
    raise RuntimeError('sandbox: network_namespace=True, but `unshare --net` does not work here')
  nonce = secrets.token_hex(16)
  config = dict(nonce=nonce, program=program, asserts=asserts, allow_ctypes=site_packages,
                limits=_limits(timeout_s, memory_mb, max_output_bytes, max_open_files,
                               max_processes))
  flags = ['-I', '-B', '-X', 'utf8', '-X', 'int_max_str_digits=0']
  if not site_packages:
    flags.insert(1, '-S')
  env = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8',
         'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
  workdir = tempfile.mkdtemp(prefix='opd_sandbox_')
  env.update(HOME=workdir, TMPDIR=workdir)
  try:
    with tempfile.TemporaryFile() as config_f, tempfile.TemporaryFile() as stdin_f, \
         tempfile.TemporaryFile() as stdout_f, tempfile.TemporaryFile() as stderr_f, \
         tempfile.TemporaryFile() as result_f:
      config_f.write(json.dumps(config).encode())
      config_f.seek(0)
      stdin_f.write(stdin.encode())
      stdin_f.seek(0)
      cmd = [*prefix, python or sys.executable, *flags, '-c', _harness_source(),
             str(config_f.fileno()), str(result_f.fileno())]
      start = time.monotonic()
      # Files, not pipes: no reader thread is needed, and RLIMIT_FSIZE bounds what is written.
      proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=stdin_f, stdout=stdout_f,
                              stderr=stderr_f, pass_fds=(config_f.fileno(), result_f.fileno()),
                              start_new_session=True)
      timed_out = False
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(proc)  # also reaps anything the program managed to start
        proc.wait()
      wall_s = time.monotonic() - start
      stdout_f.seek(0)
      out = stdout_f.read(max_output_bytes + 1)
      stderr_f.seek(0)
      err = stderr_f.read(_STDERR_BYTES)
      result_f.seek(0)
      lines = result_f.read(1 << 20).decode('utf-8', 'replace').splitlines()
  finally:
    shutil.rmtree(workdir, onerror=_force_remove)
    if os.path.exists(workdir):
      log.warning('sandbox: could not remove %s', workdir)

  # Only lines with this run's nonce count: the program can write to the same descriptor.
  mine = [line[len(nonce) + 1:] for line in lines if line.startswith(nonce + ' ')]
  started = 'ready' in mine
  passed = [False] * len(asserts or [])
  for entry in mine:
    index, _, ok = entry.partition(' ')
    if index.isdigit() and int(index) < len(passed) and ok in ('0', '1'):
      passed[int(index)] = ok == '1'
  stderr = err.decode('utf-8', 'replace')
  if not started and not timed_out:
    # Not the program's fault: a broken interpreter or sandbox would otherwise score 0 silently.
    raise RuntimeError(f'sandbox: the harness failed before running the program (exit '
                       f'{proc.returncode}): {stderr[-2000:]}')
  return RunResult(returncode=proc.returncode,
                   stdout=out[:max_output_bytes].decode('utf-8', 'replace'), stderr=stderr,
                   timed_out=timed_out, output_overflow=len(out) > max_output_bytes,
                   started=started, completed=not timed_out and 'done' in mine,
                   assert_results=passed, wall_s=wall_s)


def _force_remove(func, path, exc_info) -> None:
  # The program may have removed permissions from what it created; restore and retry once.
  try:
    os.chmod(os.path.dirname(path) or '.', 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
      os.chmod(path, 0o700)
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.unlink(path)
  except OSError:
    pass
