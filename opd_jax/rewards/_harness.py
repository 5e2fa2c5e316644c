"""Child side of opd_jax.rewards.sandbox: runs one untrusted Python program, then its tests.

Not imported by opd_jax: sandbox.py passes this file's text to `python -I -S -B -c` with two
inherited file descriptors as arguments, CONFIG_FD (JSON, read and closed first) and
RESULT_FD (where progress lines '<nonce> <what>' go). In order, before any untrusted code:
  1. resource limits (setrlimit on this process: the kernel enforces them from then on),
  2. an audit hook (sys.addaudithook; it cannot be removed) that raises PermissionError on
     network use, process creation, signals to other processes, ctypes, changes to the
     limits, and writes or deletions outside the working directory,
  3. '<nonce> ready', then the program runs as __main__; in 'asserts' mode each test runs
     after it in the same namespace and '<nonce> <i> <0|1>' records its outcome at once;
     '<nonce> done' follows the last one.
Everything the hook uses is bound when it is installed, so the program cannot change what
the hook does by patching os, builtins or this module.
"""

import builtins
import json
import os
import resource
import sys
import traceback


def _apply_limits(limits):
  for name, value in limits.items():
    which = getattr(resource, name)
    soft, hard = resource.getrlimit(which)
    if name == 'RLIMIT_STACK':  # only ever raised (deep recursion), within the hard limit
      if soft != resource.RLIM_INFINITY and value > soft:
        new = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (new, hard))
      continue
    if name == 'RLIMIT_CPU':  # SIGXCPU at the soft limit, SIGKILL one second later
      soft_new, hard_new = value, value + 1
    else:
      soft_new = hard_new = value
    if hard != resource.RLIM_INFINITY:
      soft_new, hard_new = min(soft_new, hard), min(hard_new, hard)
    resource.setrlimit(which, (soft_new, hard_new))


def _install_audit_hook(root, allow_ctypes):
  """Installs the audit hook confining the program (see the module docstring).

  allow_ctypes: numpy and other third-party packages import ctypes; allowing it also lets the
  program call C functions that the hook never sees.
  """
  getcwd, stat = os.getcwd, os.stat
  _type, _str, _bytes, _int, _len = type, str, bytes, int, len
  _PermissionError, _OSError = PermissionError, OSError
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
  root_prefix = root.rstrip('/') + '/'
  # Event-name prefixes that are always refused.
  blocked = ('socket.', 'subprocess.', 'os.system', 'os.exec', 'os.fork', 'os.posix_spawn',
             'os.spawn', 'os.startfile', 'pty.', 'os.kill', 'signal.pthread_kill',
             'resource.setrlimit', 'resource.prlimit', 'os.symlink', 'os.link', 'sqlite3.',
             'syslog.', 'gc.get_referrers', 'gc.get_referents', 'gc.get_objects',
             'winreg.', '_winapi.', 'msvcrt.')
  # Extension modules that reach the OS without raising audit events: _posixsubprocess forks
  # and execs directly, the others create files or shared memory outside the directory.
  blocked_modules = ('_posixsubprocess', '_posixshmem', '_sqlite3', '_dbm', '_gdbm', 'readline')
  if not allow_ctypes:
    blocked += ('ctypes.',)
    blocked_modules += ('_ctypes', 'ctypes')
  # {event: (indices of path arguments, indices of dir_fd arguments)}: allowed only inside root.
  path_events = {
      'os.remove': ((0,), (1,)), 'os.rmdir': ((0,), (1,)), 'os.mkdir': ((0,), (2,)),
      'os.rename': ((0, 1), (2, 3)),  # os.replace raises 'os.rename' too
      'os.chmod': ((0,), (2,)), 'os.chown': ((0,), (3,)), 'os.utime': ((0,), (3,)),
      'os.truncate': ((0,), ()), 'os.setxattr': ((0,), ()), 'os.removexattr': ((0,), ()),
      'os.chflags': ((0,), ()), 'shutil.rmtree': ((0,), ()),
  }

  def deny(event, detail=''):
    raise _PermissionError(f'sandbox: {event} is not allowed{detail}')

  def resolve(path):
    """Absolute path with '.' and '..' removed textually; None for anything but str/bytes."""
    if _type(path) is _bytes:
      path = path.decode('utf-8', 'surrogateescape')
    elif _type(path) is not _str:
      return None  # path-like objects could answer differently the second time they are asked
    if not path.startswith('/'):
      path = getcwd() + '/' + path
    parts = []
    for part in path.split('/'):
      if part == '..':
        if parts:
          parts.pop()
      elif part and part != '.':
        parts.append(part)
    return '/' + '/'.join(parts)

  def inside(path):
    if _type(path) in (_str, _bytes):
      relative = path if _type(path) is _str else path.decode('utf-8', 'surrogateescape')
      # A relative '..' may be resolved against a directory descriptor rather than the
      # working directory, which the hook cannot see: refuse it.
      if not relative.startswith('/') and '..' in relative.split('/'):
        return False
    full = resolve(path)
    return full is not None and (full + '/').startswith(root_prefix)

  def file_type(path):
    try:
      return stat(path).st_mode & 0o170000
    except (_OSError, TypeError, ValueError):
      return None

  def is_dir(path):
    return file_type(path) == 0o040000

  def is_device(path):
    return file_type(path) in (0o020000, 0o060000)  # character or block device

  def hook(event, args):
    if event.startswith(blocked):
      deny(event)
    if event == 'import':
      name = args[0]
      if _type(name) is _str and name.rpartition('.')[2] in blocked_modules:
        deny(event, f': {name}')
      return
    if event == 'open':
      path, mode, flags = args
      if _type(path) is _int:
        return  # wraps a descriptor the program already has; its access mode is fixed
      writing = ((_type(mode) is _str and ('w' in mode or 'a' in mode or 'x' in mode
                                           or '+' in mode))
                 or (_type(flags) is _int and flags & write_flags))
      if writing:
        if path == '/dev/null':
          return
        if not inside(path):
          deny('writing', f' outside the working directory: {path!r}')
        if is_device(path):  # a device node made inside (root can) would reach the hardware
          deny('writing', f' to a device: {path!r}')
      elif resolve(path) is None:
        deny('opening', ' a path given as a non-str object')
      elif not inside(path) and is_dir(path):
        # A descriptor of an outside directory would let dir_fd=... calls escape the checks.
        deny('opening', f' a directory outside the working directory: {path!r}')
      return
    spec = path_events.get(event)
    if spec is not None:
      paths, dir_fds = spec
      for i in dir_fds:
        if i < _len(args) and args[i] not in (None, -1, -100):
          deny(event, ' with dir_fd')
      for i in paths:
        if i < _len(args) and not inside(args[i]):
          deny(event, f' outside the working directory: {args[i]!r}')

  sys.addaudithook(hook)


def main():
  config_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
  with open(config_fd, 'rb') as f:
    config = json.loads(f.read())
  nonce = config['nonce']
  _apply_limits(config['limits'])
  _install_audit_hook(os.getcwd(), config['allow_ctypes'])

  # Bound now: the program may rebind any of these names before the tests run.
  write, fd, _compile, _exec = os.write, result_fd, compile, exec
  _BaseException, _SystemExit, _isinstance = BaseException, SystemExit, isinstance
  stdout, stderr, print_exc = sys.stdout, sys.stderr, traceback.print_exc

  def report(what):
    write(fd, f'{nonce} {what}\n'.encode())

  module = type(sys)('__main__')
  module.__builtins__ = builtins
  sys.modules['__main__'] = module
  sys.argv = ['solution.py']
  del config['nonce']
  status = 0
  report('ready')
  try:
    _exec(_compile(config['program'], 'solution.py', 'exec'), module.__dict__)
    ran = True
  except _SystemExit as e:
    # Exiting before the tests run must not pass them; with stdin/stdout tests the output decides.
    ran = config['asserts'] is None
    status = e.code if _isinstance(e.code, int) else (0 if e.code is None else 1)
  except _BaseException:
    print_exc()
    ran, status = False, 1
  if ran and config['asserts'] is not None:
    for i, test in enumerate(config['asserts']):
      try:
        _exec(_compile(test, f'test_{i}', 'exec'), module.__dict__)
        ok = 1
      except _BaseException:
        print_exc()
        ok = 0
      report(f'{i} {ok}')
  if ran:
    report('done')
  for stream in (stdout, stderr):
    try:
      stream.flush()
    except _BaseException:
      status = status or 1
  raise _SystemExit(status)


main()
