"""opd_jax.tools.aot: topology names, architecture presets, and the compile check itself: every
recipe's runlocal form compiles on fake CPU devices and reports memory, and one real-size
recipe compiles against a v5e-16-shaped mesh (the CPU estimate; the TPU topology path runs
when libtpu is installed)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from opd_jax.tools import aot
from opd_jax.models.presets import PRESETS, preset_config, preset_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 2**30


def _runlocal_recipes():
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    with open(path) as f:
      if not os.path.basename(path).startswith('_') and "'runlocal'" in f.read():
        out.append(os.path.basename(path)[:-3])
  return out


def _aot(tmp_path, *args, timeout=600):
  report = tmp_path / 'report.json'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the command picks its own device count
  out = subprocess.run([sys.executable, '-m', 'opd_jax.tools.aot', *args, f'--json={report}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(report) as f:
    return json.load(f), out.stdout


# ------------------------------------------------------------------------------ topology
@pytest.mark.parametrize('spec, gen, chips, layout', [
    ('v5e-16', 'v5e', 16, 'v5e:4x4'), ('v5litepod-16', 'v5e', 16, 'v5e:4x4'),
    ('v5e-8', 'v5e', 8, 'v5e:2x4'), ('v6e-64', 'v6e', 64, 'v6e:8x8'),
    ('v4-32', 'v4', 16, 'v4:2x2x4'), ('v4-8', 'v4', 4, 'v4:2x2x1'),
    ('v5p-64', 'v5p', 32, 'v5p:2x4x4'), ('v5p-128', 'v5p', 64, 'v5p:4x4x4'),
    ('v5e-1', 'v5e', 1, 'v5e:1x1'), ('v5e:2x2', 'v5e', 4, 'v5e:2x2')])
def test_parse_topology(spec, gen, chips, layout):
  t = aot.parse_topology(spec)
  assert (t.generation, t.chips, t.layout) == (gen, chips, layout)
  assert t.hbm_per_chip == {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}[gen] * GiB


@pytest.mark.parametrize('spec', ['v5e-12', 'v9-8', 'banana', 'v4-3'])
def test_bad_topology_names_the_problem(spec):
  with pytest.raises(aot.AotError, match='--topology'):
    aot.parse_topology(spec)


# ------------------------------------------------------------------------------- presets
def test_presets_have_the_published_sizes():
  sizes = {'Qwen3-0.6B': 0.6, 'Qwen3-1.7B': 1.7, 'Qwen3-4B': 4.0, 'Qwen3-8B': 8.2,
           'Qwen3-14B': 14.8, 'Qwen3-32B': 32.8, 'Llama-3.1-8B': 8.0, 'Qwen2.5-7B': 7.6}
  assert set(sizes) == set(PRESETS)
  for name, billions in sizes.items():
    cfg, hf = preset_config(name)
    assert abs(cfg.num_params / 1e9 - billions) / billions < 0.03, (name, cfg.num_params)
    assert hf['model_type'] == cfg.model_type


def test_preset_names_match_paths():
  assert preset_name('/ckpt/Qwen3-1.7B') == 'Qwen3-1.7B'
  assert preset_name('gs://b/ckpt/Qwen3-8B-Base/') == 'Qwen3-8B'
  assert preset_name('meta-llama/Llama-3.1-8B-Instruct') == 'Llama-3.1-8B'
  assert preset_name('/ckpt/my-model') is None


def test_model_source_prefers_the_directory_then_the_preset(tiny_qwen3):
  src = aot.model_source(tiny_qwen3, 'config.student.model')
  assert src.where == tiny_qwen3 and src.cfg.hidden_size == 64
  src = aot.model_source('/no/such/Qwen3-4B', 'config.student.model')
  assert 'Qwen3-4B preset' in src.where and src.cfg.num_layers == 36
  with pytest.raises(aot.AotError, match=r'config.teachers.t.model=.*no architecture preset'):
    aot.model_source('/no/such/model', 'config.teachers.t.model')


def test_backend_tpu_without_libtpu_is_a_clear_error():
  if aot.libtpu_available():
    pytest.skip('libtpu is installed here')
  with pytest.raises(aot.AotError, match='needs libtpu'):
    aot.run(None, topology='v5e-16', backend='tpu', argv=[])


# ---------------------------------------------------------------------- compile checks
@pytest.mark.parametrize('name', _runlocal_recipes())
@pytest.mark.e2e
def test_every_runlocal_recipe_compiles_and_reports_memory(name, tmp_path):
  rep, stdout = _aot(tmp_path, f'--config=configs/{name}.py:runlocal')
  assert rep['target'] == 'cpu-estimate' and rep['mesh']['fsdp'] == 8
  names = [f['name'] for f in rep['functions']]
  prefills = [n for n in names if n.startswith('rollout') and n.endswith('/prefill')]
  # every prefill is followed by its decode loop (a multi-turn engine's: turn, observe)
  assert prefills and all(n[:-len('prefill')] + 'decode' in names or {
      n[:-len('prefill')] + 'turn', n[:-len('prefill')] + 'observe'} <= set(names)
      for n in prefills)
  if name == 'opd_agentic':  # the episode engine's calls, never a private function
    assert [n for n in names if n.startswith('rollout/')] == [
        'rollout/cast', 'rollout/prefill', 'rollout/turn', 'rollout/observe']
  assert names[-1] == 'update'
  # the student's rollout starts with the cast onto its rollout layout
  assert (names[0] == 'rollout/cast') == ('rollout/prefill' in names)
  assert rep['decode_gathers'] and not rep['decode_gather_errors']
  for f in rep['functions']:
    assert f['measured'] and f['argument'] > 0 and f['total'] > 0, f
  assert rep['largest']['total'] == max(f['total'] for f in rep['functions'])
  teachers = {'opd_multi_teacher': {'math', 'code', 'general'}, 'exopd': {'teacher', 'reference'},
              'opd_remote_teacher': set()}  # a remote teacher is served elsewhere
  assert {n[len('score/'):] for n in names if n.startswith('score/')} == teachers.get(
      name, {'teacher'})
  assert 'per-device memory' in stdout and 'CPU ESTIMATE' in stdout


@pytest.mark.e2e
def test_continuous_rollout_compiles_its_segment_functions(tmp_path):
  """rollout.slots=8 < the 16 rows: the trainer samples with the continuous batcher, so the
  check compiles its refill (prefill of r = 8 new prompts into the slots), decode segment and
  cache compaction instead of the static prefill/decode, and reports their peaks."""
  rep, stdout = _aot(tmp_path, '--config=configs/opd_single_teacher.py:runlocal',
                     '--config.rollout.slots=8')
  fns = {f['name']: f for f in rep['functions']}
  assert list(fns)[:4] == ['rollout/cast', 'rollout/refill', 'rollout/segment',
                           'rollout/compact']
  assert 'rollout/prefill' not in fns and 'rollout/decode' not in fns
  # B=16 rows, R=8 slots, P=256 (prompt bucket), N=16, S = P + N + 32 (cache slack)
  assert fns['rollout/refill']['shapes'] == 'B=16 R=8 P=256 N=16 S=304 r=8'
  assert fns['rollout/segment']['shapes'] == 'B=16 R=8 P=256 N=16 S=304'
  for name in ('rollout/refill', 'rollout/segment', 'rollout/compact'):
    f = fns[name]
    assert f['measured'] and f['temp'] > 0 and f['peak'] == f['total'] + f['resident'], f
    assert f['alias'] > 0, f  # the slot state (KV cache included) is donated
    assert f'{name}  [' in stdout
  # one slot per device: 2 layers x (k, v) x S=304 x 1 kv head x head dim 16 x fp32
  assert fns['rollout/segment']['argument'] >= 2 * 2 * 304 * 16 * 4
  # during a segment the [B, N] tokens / mask / logps (int32, int32, fp32) are resident on
  # top of the train state; the refill takes them as arguments
  assert (fns['rollout/segment']['resident'] - fns['rollout/refill']['resident']
          == 16 * 16 * 12 // 8)
  assert rep['largest']['peak'] >= fns['rollout/segment']['peak']


@pytest.mark.e2e
def test_real_size_recipe_on_a_v5e16_shaped_cpu_mesh(tmp_path):
  """Qwen3-1.7B <- Qwen3-8B at the recipe's full shapes (B=256, L=5120) on 16 fake CPU
  devices, compiled from the presets because /ckpt does not exist here (about 1.5 min)."""
  rep, stdout = _aot(tmp_path, '--config=configs/opd_single_teacher.py', '--topology=v5e-16',
                     '--backend=cpu')
  assert rep['target'] == 'cpu-estimate' and rep['hbm_per_device'] == 16 * GiB
  assert rep['mesh'] == {'data': 1, 'fsdp': 16, 'tensor': 1}
  assert 'Qwen3-1.7B preset' in rep['models']['student']
  assert 'Qwen3-8B preset' in rep['models']['teacher teacher']
  fns = {f['name']: f for f in rep['functions']}
  assert fns['rollout/prefill']['shapes'] == 'B=256 P=1024 N=4096'
  assert fns['update']['shapes'] == 'B=256 (micro 32) L=5120'
  # the arguments are exact: the rollout samples with the bf16 student (1.72B x 2 bytes) on
  # its tensor-parallel layout (8 kv heads: t = 4, 2 per device), and the update takes the
  # train state (at least the fp32 parameters, FSDP over 16)
  assert 1.72e9 * 2 / 4 < fns['rollout/prefill']['argument'] < 1.72e9 * 2 / 4 * 1.1
  assert fns['rollout/cast']['shapes'] == 'rollout layout data=4 tensor=4'
  assert fns['update']['argument'] > 1.72e9 * 4 / 16
  (g,) = rep['decode_gathers']
  assert g['name'] == 'rollout/decode' and g['gathered_per_token'] == 0 and not g['error']
  est = rep['estimates']
  assert est['chip'] == 'v5e' and set(est['phases']) == {'rollout', 'score/teacher', 'update'}
  assert all(p['seconds'] > 0 for p in est['phases'].values()) and 0 < est['mfu'] < 1
  assert 'estimated time per step on v5e' in stdout
  assert 'v5e-16-shaped mesh on 16 fake CPU devices' in stdout
  assert 'DOES NOT FIT' in stdout or 'fits in 16.00 GiB' in stdout


@pytest.mark.skipif(not aot.libtpu_available(),
                    reason="libtpu is not installed (pip install 'jax[tpu]'): the TPU "
                           'topology path is exercised by hand, see launch/README.md')
@pytest.mark.e2e
def test_tpu_topology_path(tmp_path):
  rep, stdout = _aot(tmp_path, '--config=configs/opd_single_teacher.py:runlocal',
                     '--topology=v5e-8', '--backend=tpu')
  assert rep['target'] == 'tpu-topology' and rep['mesh']['fsdp'] == 8
  assert 'TPU v5 lite' in stdout and all(f['measured'] for f in rep['functions'])
