"""colab/opd_small_models.ipynb runs top to bottom (its offline path, tiny settings), so the
notebook cannot rot: the demo trains, the curves plot, the before/after answers decode, and
the Qwen3 section runs its OPD steps with tiny stand-ins (the hub is offline in tests)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'colab', 'opd_small_models.ipynb')


def _kernel(tmp_path):
  """A kernelspec for this interpreter, registered in a temporary Jupyter path (the user's
  home and the venv's own kernelspecs are left alone); returns (name, env)."""
  prefix = tmp_path / 'jupyter'
  name = 'opd-jax-test'
  subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--prefix', str(prefix),
                  '--name', name], check=True, capture_output=True)
  env = {'JUPYTER_PATH': str(prefix / 'share' / 'jupyter'),
         'JUPYTER_RUNTIME_DIR': str(tmp_path / 'runtime'),
         'IPYTHONDIR': str(tmp_path / 'ipython'),
         'MPLCONFIGDIR': str(tmp_path / 'mpl'),
         'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
         'HF_HUB_OFFLINE': '1'}
  return name, env


def test_notebook_structure():
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  params = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1 and 'TINY = ' in params[0].source
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), \
      'commit the notebook without outputs'
  text = '\n'.join(c.source for c in nb.cells)
  for needle in ('run_demo', 'snapshot_download', 'Qwen/Qwen3-0.6B', 'Qwen/Qwen3-1.7B',
                 'opd_jax.train import run', 'student/export', 'opd/export'):
    assert needle in text, needle


def test_notebook_runs_offline_with_tiny_settings(tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient

  name, env = _kernel(tmp_path)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  idx = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  workdir = tmp_path / 'demo'
  # papermill-style: a cell after the parameters overrides them
  nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(
      f'TINY = True\nWORKDIR = {str(workdir)!r}\nQWEN_STEPS = 2'))
  client = NotebookClient(nb, timeout=600, kernel_name=name,
                          resources={'metadata': {'path': os.path.join(ROOT, 'colab')}})
  client.execute()

  outputs = {}
  for i, cell in enumerate(nb.cells):
    text = []
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        text.append(out.text)
      elif out.output_type == 'error':
        pytest.fail(f'cell {i} raised {out.ename}: {out.evalue}')
    outputs[i] = ''.join(text)
  everything = '\n'.join(outputs.values())
  assert 'nothing to install' in everything  # the pinned packages are this venv's
  assert '| student after OPD |' in everything
  assert 'held-out reverse KL:' in everything
  assert any(o.output_type == 'display_data' and 'image/png' in o.get('data', {})
             for c in nb.cells for o in c.get('outputs', [])), 'no plot was shown'
  assert everything.count('--- before OPD') == 6 and everything.count('--- after OPD') == 6
  assert 'offline: running the same steps with tiny random stand-ins' in everything
  assert 'opd/reverse_kl [(1,' in everything
  assert os.path.isdir(workdir / 'opd' / 'export')
