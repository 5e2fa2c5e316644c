"""Repository invariants: the README's test command is what CI runs; the package imports
without side effects."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  setup = text.split('## Set up', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```bash\n(.*?)\n```', setup, re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
  commands = _readme_commands()
  assert len(commands) == 2, commands
  demo, test = commands
  assert 'opd_jax' in demo and 'pytest' in test
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci_lines = [l.strip() for l in f if l.strip() and not l.startswith('#')]
  assert test.strip() in ci_lines


def test_import_has_no_side_effects():
  code = ('import sys, opd_jax, opd_jax.models, opd_jax.sharding; '
          'print("jax.numpy" in sys.modules and False)')
  out = subprocess.run([sys.executable, '-c', 'import opd_jax; import sys; '
                        'print(sorted(m for m in sys.modules if m.startswith("jax")))'],
                       capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == '[]'  # importing the package does not even import jax
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, capture_output=True)


def test_readme_documents_every_config_field():
  from opd_jax.config_lib import base_config
  with open(os.path.join(ROOT, 'README.md')) as f:
    reference = f.read().split('## Config reference', 1)[1].split('\n## ', 1)[0]
  rows = [l.split('|')[1] for l in reference.splitlines() if l.startswith('| `')]
  documented = ' '.join(rows)

  def fields(d, prefix=''):
    for k, v in d.items():
      if k == 'teachers':  # user-named entries, documented as `teachers.NAME`
        continue
      if type(v).__name__ == 'ConfigDict' and len(v):
        yield from fields(v, prefix + k + '.')
      else:
        yield prefix + k

  missing = []
  for name in fields(base_config()):
    section, _, leaf = name.rpartition('.')
    # a row may list several fields of one section: `optim.lr` / `schedule` / ...
    if f'`{name}`' not in documented and not (
        section and f'`{section}.' in documented and f'`{leaf}`' in documented):
      missing.append(name)
  assert not missing, f'README config reference lacks: {missing}'


# Run as a new user without torch (requirements.txt does not install it): importing
# transformers then logs 'PyTorch was not found. Models won't be available ...'.
_NO_TORCH = ('import runpy, sys; sys.modules["torch"] = None; sys.argv = sys.argv[1:]; '
             'runpy.run_module(sys.argv[0], run_name="__main__")')


def test_a_runlocal_command_prints_no_pytorch_advice(tmp_path):
  """transformers' 'PyTorch was not found' line is silenced (opd_jax never uses its
  models); the check is that the line would appear here without the filter."""
  probe = subprocess.run([sys.executable, '-c', 'import sys; sys.modules["torch"] = None; '
                          'import transformers'], capture_output=True, text=True, cwd=ROOT)
  assert 'PyTorch was not found' in probe.stderr + probe.stdout  # the setting reproduces it
  out = subprocess.run(
      [sys.executable, '-c', _NO_TORCH, 'opd_jax.train', '--config',
       'configs/opd_single_teacher.py:runlocal', '--workdir', str(tmp_path / 'run'),
       '--config.total_steps=1'], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'PyTorch was not found' not in out.stdout + out.stderr


def test_the_pytorch_filter_lets_other_transformers_messages_through():
  import logging
  import opd_jax
  filt = [f for f in logging.getLogger('transformers').filters
          if type(f).__name__ == '_NoTorchAdvice']
  assert len(filt) == 1
  rec = lambda msg: logging.LogRecord('transformers', logging.WARNING, __file__, 1, msg,
                                      None, None)
  assert not filt[0].filter(rec("PyTorch was not found. Models won't be available and only "
                                'tokenizers, configuration and file/data utilities can be '
                                'used.'))
  assert filt[0].filter(rec('Some other transformers warning'))
  assert opd_jax.__version__
