"""The trainer end to end: every recipe loads and its runlocal form runs, TensorBoard and
console output, exact resume, SIGTERM, non-finite stop, SFT, and a shrunk CPU demo."""

import glob
import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _util import read_events
from opd_jax.train import ConfigError, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_'))


def load_config(name, arg=None):
  path = os.path.join(ROOT, 'configs', name + '.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, ROOT)
  try:
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
  finally:
    sys.path.remove(ROOT)


def with_overrides(config, **kw):
  config.unlock()
  for key, value in kw.items():
    obj = config
    *path, last = key.split('__')
    for p in path:
      obj = obj[p]
    obj[last] = value
  config.lock()
  return config


# Its runlocal form talks to a live teacher server; tests/teachers/test_remote.py starts one.
NEEDS_SERVER = {'opd_remote_teacher'}


def _runlocal_recipes():
  out = []
  for path in RECIPES:
    if os.path.basename(path)[:-3] in NEEDS_SERVER:
      continue
    with open(path) as f:
      if "'runlocal'" in f.read():
        out.append(os.path.basename(path)[:-3])
  return out


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_is_locked(path):
  name = os.path.basename(path)[:-3]
  config = load_config(name)
  assert config.is_locked and config.total_steps > 0
  with pytest.raises(AttributeError):
    config.no_such_field = 1  # a typo in an override is an error, not a new field
  with open(path) as f:
    assert 'python -m opd_jax' in f.read()  # the docstring shows the command line


@pytest.fixture(scope='module')
def single_teacher_run(tmp_path_factory, capfd_module=None):
  workdir = str(tmp_path_factory.mktemp('single'))
  config = load_config('opd_single_teacher', 'runlocal')
  result = run(config, workdir)
  return workdir, result


@pytest.mark.parametrize('name', [n for n in _runlocal_recipes() if n != 'opd_single_teacher'])
@pytest.mark.e2e
def test_runlocal_recipes_run_two_steps(name, tmp_path):
  result = run(load_config(name, 'runlocal'), str(tmp_path))
  assert result['step'] == 2 and not result['preempted']
  assert os.path.exists(tmp_path / 'checkpoints' / '2')
  assert os.path.exists(tmp_path / 'export' / 'config.json')
  assert np.isfinite(result['history']['loss'][-1][1])
  (_, trainable), = result['history']['params/trainable']
  (_, total), = result['history']['params/total']
  if name == 'opd_lora':  # only the adapters train; the PEFT adapter is exported too
    assert 0 < trainable < total / 5
    for f in ('adapter_config.json', 'adapter_model.safetensors'):
      assert os.path.exists(tmp_path / 'export' / 'adapter' / f)
  else:
    assert trainable == total


def test_bfloat16_compute_runs(tmp_path):
  """The full-size recipes compute in bfloat16 (fp32 master weights): the rollout's KV cache
  and attention take the compute dtype, and the losses stay finite."""
  cfg = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                       student__compute_dtype='bfloat16', teachers__teacher__dtype='bfloat16',
                       checkpoint__every=0, export__hf_dir='', eval_every=0)
  result = run(cfg, str(tmp_path))
  assert result['step'] == 2
  for key in ('loss', 'opd/reverse_kl'):
    assert all(np.isfinite(v) for _, v in result['history'][key]), key


@pytest.mark.e2e
def test_single_teacher_runlocal_logs_everything(single_teacher_run):
  workdir, result = single_teacher_run
  assert result['step'] == 2
  events = read_events(workdir)
  for tag in ['loss', 'opd/reverse_kl', 'opd/reverse_kl/teacher', 'opd/reverse_kl/tag/math',
              'is/ratio_mean', 'is/ratio_max', 'is/clip_frac', 'policy/entropy',
              'rollout/response_len', 'eval/accuracy', 'eval/accuracy/math',
              'eval/reverse_kl', 'perf/tokens_per_s/rollout', 'perf/tokens_per_s/scoring',
              'perf/tokens_per_s/update', 'eval/samples', 'is/sampler_logprob_gap',
              'opd/reverse_kl_k3', 'compute/flops/total', 'compute/flops/rollout',
              'compute/flops/scoring/teacher', 'compute/flops/update']:
    assert tag in events, (tag, sorted(events))
  assert [s for s, _ in events['loss']] == [1, 2]
  # On-policy with one optimizer step per batch, the importance ratio is exactly 1 and the
  # plain-IS loss equals the mean k1 reverse KL.
  np.testing.assert_allclose([v for _, v in events['is/ratio_mean']], 1.0, atol=1e-5)
  assert all(v < 1e-4 for _, v in events['is/sampler_logprob_gap'])  # fp32 sampler
  np.testing.assert_allclose([v for _, v in events['loss']],
                             [v for _, v in events['opd/reverse_kl']], rtol=1e-4, atol=1e-5)
  assert 'ground truth' in events['eval/samples'][0][1]
  assert result['tokens_scored']['teacher'] > 0


def test_console_progress_line(tmp_path):
  env = dict(os.environ, OPD_JAX_CACHE=os.environ.get('OPD_JAX_CACHE', ''))
  env.pop('OPD_JAX_CACHE') if not env['OPD_JAX_CACHE'] else None
  out = subprocess.run(
      [sys.executable, '-m', 'opd_jax.train', '--config',
       'configs/opd_single_teacher.py:runlocal', '--workdir', str(tmp_path),
       '--config.total_steps=2', '--config.eval.num_prompts=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith('step ')]
  assert lines[0].startswith('step 1/2 | ') and 'elapsed' in lines[0] and 'ETA' in lines[0]
  assert 'loss ' in lines[0] and 'reverse_kl ' in lines[0]
  assert any(l.startswith('eval step 2/2') and 'acc ' in l for l in out.stdout.splitlines())


def _history(result, key):
  return {s: v for s, v in result['history'].get(key, [])}


def test_resume_is_exact(tmp_path):
  base = dict(total_steps=4, checkpoint__every=10, eval__num_prompts=0)
  straight = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), **base),
                 str(tmp_path / 'straight'))
  cut = with_overrides(load_config('opd_single_teacher', 'runlocal'), debug__stop_at_step=2,
                       **base)
  first = run(cut, str(tmp_path / 'resumed'))
  assert first['preempted'] and first['step'] == 2
  second = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), **base),
               str(tmp_path / 'resumed'))
  assert second['step'] == 4
  for key in ('loss', 'opd/reverse_kl', 'grad_norm', 'rollout/response_len'):
    a, b = _history(straight, key), _history(second, key)
    assert set(b) == {1, 2, 3, 4}  # steps 1-2 travel with the checkpoint
    for step in (1, 2, 3, 4):
      assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), (key, step)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, '-u', '-m', 'opd_jax.train', '--config',
       'configs/opd_single_teacher.py:runlocal', '--workdir', str(tmp_path),
       '--config.total_steps=500', '--config.checkpoint.every=1000'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 400
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith('step 2/500'):
        proc.send_signal(signal.SIGTERM)
        break
      assert time.time() < deadline, ''.join(seen[-20:])
    rest, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  out = ''.join(seen) + rest
  assert proc.returncode == 0, out[-3000:]
  assert 'SIGTERM received' in out
  steps = sorted(int(p) for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit())
  assert steps and 2 <= steps[-1] < 500


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), total_steps=5,
                          optim__lr=1e30, optim__grad_clip=0.0, checkpoint__every=1,
                          eval__num_prompts=0)
  with pytest.raises(FloatingPointError, match=r'non-finite .* at step (\d+)') as err:
    run(config, str(tmp_path))
  bad_step = int(str(err.value).split('at step ')[1].split(';')[0])
  steps = sorted(int(p) for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit())
  assert steps[-1] == bad_step - 1  # nothing was written for the bad step
  assert f'step {bad_step - 1}' in str(err.value)
  # the last good checkpoint restores
  resumed = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                           total_steps=bad_step - 1, eval__num_prompts=0, optim__grad_clip=0.0)
  assert run(resumed, str(tmp_path))['step'] == bad_step - 1


def test_sft_on_teacher_generated_responses(tmp_path):
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), mode='sft',
                          sft__source='teacher', sft__batch_size=16, eval__num_prompts=2)
  result = run(config, str(tmp_path))
  assert result['step'] == 2 and np.isfinite(result['history']['loss'][-1][1])


def test_sft_on_several_teachers_samples_each_row_with_its_teacher():
  """Routed SFT on teacher samples: each row is sampled (greedy here) by the first teacher
  that handles its tag, exactly as that teacher alone samples it, and a row no teacher
  handles is an error that names its tag."""
  import jax
  from opd_jax import sharding as shd
  from opd_jax.training import flops as compute
  from opd_jax.training.builder import build_run
  from opd_jax.train import Loop, load_data, routed_teacher_sft_batch
  from opd_jax.teachers.local import route_matrix
  config = with_overrides(load_config('opd_multi_teacher', 'runlocal'), mode='sft',
                          sft__source='teacher', sft__temperature=0.0, sft__batch_size=8)
  mesh = shd.make_mesh(dict(config.mesh))
  data = load_data(config)
  r = build_run(config, mesh, tokenizer=data.tokenizer)
  loop = Loop(config, r, data, None, compute.FlopCounter(None), None, jax.random.key(0),
              r.cast_fn())
  records = data.prompts.next_batch(8)
  batch = routed_teacher_sft_batch(loop, records, jax.random.key(1))
  owner = np.argmax(route_matrix([x.tag for x in records], r.specs) > 0, axis=1)
  assert len(set(owner.tolist())) > 1, 'the sample batch should exercise several teachers'
  tokens = np.asarray(batch.tokens)
  lmask = np.asarray(batch.loss_mask)
  prompts = data.encoder.encode_batch(records)
  for j, t in enumerate(r.teachers):
    rows = np.flatnonzero(owner == j)
    if not len(rows):
      continue
    alone = r.teacher_samplers[j](t.params, [prompts[i] for i in rows], jax.random.key(2),
                                  r.teacher_sp)
    want, want_mask = alone.host_rows(alone.tokens), alone.host_rows(alone.mask)
    for k, i in enumerate(rows):
      got = tokens[i][lmask[i] > 0]
      assert got.tolist() == want[k][want_mask[k] > 0].tolist(), (t.name, i)
  assert loop.flops.totals["teacher_sampling"] > 0
  config.unlock()
  del config.teachers['general']  # the 'general' records now have no teacher
  config.lock()
  r2 = build_run(config, mesh, tokenizer=data.tokenizer)
  loop2 = Loop(config, r2, data, None, compute.FlopCounter(None), None, jax.random.key(0),
               r2.cast_fn())
  general = [x for x in data.prompts.next_batch(16) if x.tag == 'general'][:1]
  with pytest.raises(ValueError, match="no teacher in config.teachers handles tag 'general'"):
    routed_teacher_sft_batch(loop2, general * 8, jax.random.key(1))


def test_config_errors_name_the_field(tmp_path):
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'))
  config.unlock()
  del config.teachers['teacher']
  config.lock()
  with pytest.raises(ConfigError, match=r'config.teachers.*config.rl.estimator'):
    run(config, str(tmp_path))
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                          rollout__prompts_per_step=3)
  with pytest.raises(ConfigError, match='not divisible'):
    run(config, str(tmp_path / 'b'))


def test_config_errors_before_any_model_loads(tmp_path):
  missing = str(tmp_path / 'no_such_model')
  cases = [
      (dict(student__model=missing), r"config.student.model='.*no_such_model': no such "
                                     r'checkpoint directory'),
      (dict(teachers__teacher__model=missing), r'config.teachers.teacher.model=.*no such'),
      (dict(rollout__temperature=0.0), r'config.rollout.temperature=0.0: must be > 0'),
      (dict(rollout__top_p=0.0), r'config.rollout.top_k=0 / top_p=0.0'),
      (dict(loss__kl_estimator='k3'), r"config.loss.kl_estimator='k3': only k1"),
      (dict(rl__constant_advantage=-1.0), r"config.rl.constant_advantage=-1.0 replaces the "
                                          r"teachers' KL term"),
      (dict(rl__constant_advantage=-1.0, rl__use_opd=False, gopd__enabled=True),
       r'config.rl.constant_advantage=-1.0 and config.gopd.enabled'),
      (dict(rl__constant_advantage=-1.0, mode='sft'),
       r"config.rl.constant_advantage=-1.0 applies to config.mode=opd"),
  ]
  for overrides, pattern in cases:
    config = with_overrides(load_config('opd_single_teacher', 'runlocal'), **overrides)
    with pytest.raises(ConfigError, match=pattern):
      run(config, str(tmp_path / 'w'))


def test_no_held_out_data_skips_evaluation(tmp_path):
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), total_steps=1,
                          eval_at_start=True, export__hf_dir='')
  config.unlock()
  config.data.eval = {}
  config.lock()
  result = run(config, str(tmp_path))
  assert result['step'] == 1 and 'final' not in result
  assert not any(k.startswith('eval/') for k in result['history'])


def test_on_eval_adds_scalars_to_every_evaluation(tmp_path):
  """run(on_eval=...) is called at each evaluation (start, periodic, final) with the rollout's
  parameters, and its scalars land in that evaluation's history."""
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), total_steps=2,
                          eval_at_start=True, eval_every=1, log_every=1, export__hf_dir='',
                          checkpoint__every=0)
  seen = []

  def on_eval(step, params):
    import jax
    leaves = jax.tree_util.tree_leaves(params)
    seen.append(step)
    return {'task/first_param_sum': np.float32(np.asarray(leaves[0]).sum()), 'task/step': step}
  result = run(config, str(tmp_path), on_eval=on_eval)
  assert seen == [0, 1, 2]
  assert dict(result['history']['task/step']) == {0: 0.0, 1: 1.0, 2: 2.0}
  sums = dict(result['history']['task/first_param_sum'])
  assert sums[0] != sums[2]  # the parameters it sees are the trained ones
  assert result['final']['task/step'] == 2.0


@pytest.mark.parametrize('full_vocab', [None, 'jsd_exact', 'reverse_kl'])
def test_truncated_sampling_trains_on_policy(tmp_path, full_vocab):
  # The review's command: top-k 5 with PPO clipping gave ratio 0.068, clip 1.0, grad 0.0.
  # With a full_vocab term, that term is of the same truncated policy (finite, logged).
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), total_steps=1,
                          rollout__top_k=5, rollout__top_p=0.7, rollout__temperature=0.7,
                          loss__clip_eps=0.2, eval__num_prompts=0, export__hf_dir='',
                          loss__full_vocab=full_vocab)
  h = run(config, str(tmp_path))['history']
  if full_vocab:
    assert 0 < h['loss/full_vocab'][0][1] < 1e3
  for key in ('is/ratio_mean', 'is/ratio_min', 'is/ratio_max'):
    assert h[key][0][1] == pytest.approx(1.0, abs=1e-5), key
  assert h['is/clip_frac'][0][1] == 0.0 and h['grad_norm'][0][1] > 0


@pytest.mark.parametrize('option', ['reverse_kl_exact', 'forward_kl'])
def test_full_vocab_teacher_that_scores_no_row_of_a_batch(tmp_path, option):
  # The review's repro: opd_mixed_grpo's math rows with the teacher restricted to 'general'
  # crashed at step 1 (TypeError: 'NoneType' object is not subscriptable). A batch without
  # a scored row adds exactly 0 for the divergence.
  config = with_overrides(load_config('opd_mixed_grpo', 'runlocal'), total_steps=2,
                          teachers__teacher__tags=['general'], loss__full_vocab=option,
                          eval__num_prompts=0, export__hf_dir='')
  result = run(config, str(tmp_path))
  assert result['step'] == 2
  assert [v for _, v in result['history']['loss/full_vocab']] == [0.0, 0.0]
  assert 'reward/mean' in result['history']


def test_pure_rl_without_a_teacher(tmp_path):
  config = with_overrides(load_config('opd_mixed_grpo', 'runlocal'), total_steps=1,
                          rl__use_opd=False, eval__num_prompts=0, export__hf_dir='')
  config.unlock()
  config.teachers = {}
  config.lock()
  h = run(config, str(tmp_path))['history']
  assert 'reward/mean' in h and not any(k.startswith('opd/') for k in h)
  assert not any(k.startswith('compute/flops/scoring') for k in h)


def test_continuous_batching_trains_like_static(tmp_path):
  # Per-request keys make a request's draws independent of its slot: the trainer with 2
  # slots sees the same rollouts, hence the same metrics, as with static batches.
  base = dict(total_steps=2, eval__num_prompts=4, eval__batch_size=4, export__hf_dir='')
  static = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), **base),
               str(tmp_path / 'static'))
  cont = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), rollout__slots=2,
                            **base), str(tmp_path / 'continuous'))
  for key in ('loss', 'opd/reverse_kl', 'rollout/response_len', 'grad_norm',
              'compute/flops/total'):
    for (s1, a), (s2, b) in zip(static['history'][key], cont['history'][key]):
      assert s1 == s2 and a == pytest.approx(b, rel=1e-4, abs=1e-5), key
  assert cont['final']['eval/accuracy'] == static['final']['eval/accuracy']


def test_finished_run_reports_its_saved_results_and_flops(tmp_path):
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), total_steps=2,
                          eval__num_prompts=4, export__hf_dir='')
  first = run(config, str(tmp_path))
  assert first['final']['eval/accuracy'] is not None
  h = first['history']
  phases = [k for k in h if k.startswith('compute/flops/') and k != 'compute/flops/total']
  assert sorted(phases) == ['compute/flops/rollout', 'compute/flops/scoring/teacher',
                            'compute/flops/update']
  for step in (0, 1):  # cumulative, and the total is the sum of the phases
    assert h['compute/flops/total'][step][1] == pytest.approx(
        sum(h[k][step][1] for k in phases), rel=1e-12)
  assert h['compute/flops/total'][1][1] > h['compute/flops/total'][0][1] > 0
  again = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), total_steps=2,
                             eval__num_prompts=4, export__hf_dir=''), str(tmp_path))
  assert again['step'] == 2 and again['final'] == first['final']
  assert again['history'] == {k: [tuple(x) for x in v] for k, v in first['history'].items()}
  assert again['tokens_scored'] == first['tokens_scored']


@pytest.mark.e2e
def test_shrunk_demo_reverse_kl_falls(tmp_path):
  from opd_jax.tools.demo import run_demo
  out = run_demo(str(tmp_path), tiny=True, stages=('teacher', 'student', 'opd'))
  kl = out['results']['opd']['history']['eval/reverse_kl']
  print('eval reverse KL over OPD steps:', kl)
  assert kl[0][0] == 0 and kl[-1][0] == 30
  assert kl[-1][1] < 0.9 * kl[0][1]
  assert os.path.exists(tmp_path / 'results.md') and os.path.exists(tmp_path / 'demo_curves.png')
  # The same command again finds every stage finished and reports the same table (it used
  # to print a table of dashes: nothing was evaluated on resume).
  again = run_demo(str(tmp_path), tiny=True, stages=('teacher', 'student', 'opd'))
  assert again['rows'] == out['rows'] and '—' not in again['table'].split('\n', 3)[3]
