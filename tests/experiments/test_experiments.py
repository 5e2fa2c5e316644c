"""The compute-efficiency experiment's pipeline (`--quick`, a few minutes on a CPU): every
stage runs, the outputs exist, and the FLOP accounting adds up. Never asserts a result."""

import json
import math
import os

import pytest


def test_chain_task_checker_and_splits(tmp_path):
  from opd_jax.tasks import chain
  assert chain.solve('7+5*3-9+4') == '7+5=2\n2*3=6\n6-9=7\n7+4=1\n#### 1'
  assert chain.check('7+5=2\n#### 1', '7+5*3-9+4') and not chain.check('#### 2', '7+5*3-9+4')
  paths = chain.write_dataset(str(tmp_path), n_train=300, n_val=20, n_eval=20, seed=0)
  sets = {}
  for name in ('train', 'val', 'eval'):
    with open(paths[name]) as f:
      recs = [json.loads(line) for line in f]
    sets[name] = {r['prompt'] for r in recs}
    for r in recs:
      assert chain.check(r['response'], r['prompt']) and r['ground_truth'] == str(
          chain.answer(r['prompt']))
  assert not sets['train'] & sets['eval'] and not sets['train'] & sets['val']
  assert not sets['val'] & sets['eval']


@pytest.mark.e2e
def test_quick_pipeline_runs_and_flops_add_up(tmp_path, capsys):
  from opd_jax.experiments import compute_efficiency as ce
  summary = ce.run_experiment(str(tmp_path), seed=0, quick=True)
  out = capsys.readouterr().out.rstrip().splitlines()
  assert any(line.startswith('| OPD (pure) |') for line in out[-8:])
  for f in ('results.md', 'results.json', 'accuracy_vs_flops.png'):
    assert os.path.exists(tmp_path / f), f
  assert set(summary['rows']) == {'opd', 'sft_teacher', 'grpo', 'mixed'}
  for name in ('opd', 'sft_teacher', 'grpo', 'mixed'):
    res_path = next(p for p in os.listdir(tmp_path) if p.startswith(name + '_lr'))
    with open(tmp_path / res_path / 'result.json') as f:
      hist = json.load(f)['history']
    phases = {k: v for k, v in hist.items() if k.startswith('compute/flops/')
              and k != 'compute/flops/total'}
    total = hist['compute/flops/total']
    for i, (step, value) in enumerate(total):  # at every logged step
      parts = sum(dict(v).get(step, 0.0) for v in phases.values())
      assert value == pytest.approx(parts, rel=1e-9), (name, step)
    assert total[-1][1] > 0
    last = {k[len('compute/flops/'):]: v[-1][1] for k, v in phases.items()}
    scoring = sum(v for k, v in last.items() if k.startswith('scoring/'))
    if name == 'sft_teacher':
      assert last.get('teacher_sampling', 0) > 0 and scoring == 0
    elif name == 'grpo':
      assert scoring == 0 and last.get('teacher_sampling', 0) == 0 and last['rollout'] > 0
    else:  # opd, mixed: the teacher scores the student's samples
      assert scoring > 0 and last['rollout'] > 0
    # every evaluation step has a cumulative FLOP count
    ce.accuracy_curve(hist)
  # a rerun reuses every finished stage
  again = ce.run_experiment(str(tmp_path), seed=0, quick=True)
  assert again['rows']['opd']['accuracy'] == summary['rows']['opd']['accuracy']
  assert 'reused' in capsys.readouterr().out
  ce.aggregate([str(tmp_path), str(tmp_path)])


def test_subtraction_task_and_facts():
  from opd_jax.tasks import arithmetic, facts
  assert arithmetic.solve_sub(583, 267) == '13-7-0=6\n8-6-1=1\n5-2-0=3\n#### 316'
  # the noisy solution takes the borrow but never pays it back
  assert arithmetic.solve_sub(583, 267, forget_borrow=True).endswith('#### 326')
  assert arithmetic.solve_sub(1000, 1).endswith('#### 999')
  # smaller from larger: 3 - 7 becomes 7 - 3, no borrow
  assert arithmetic.solve_sub(83, 47, smaller_from_larger=True) == '7-3-0=4\n8-4-0=4\n#### 44'
  assert arithmetic.solve_sub(87, 43, smaller_from_larger=True) == arithmetic.solve_sub(87, 43)
  with pytest.raises(ValueError, match='exclusive'):
    arithmetic.solve_sub(83, 47, forget_borrow=True, smaller_from_larger=True)
  with pytest.raises(ValueError, match='sub_error'):
    arithmetic.make_records(2, seed=0, op='-', sub_error='nope')
  with pytest.raises(ValueError, match='a >= b'):
    arithmetic.solve_sub(1, 2)
  import random
  rng = random.Random(0)
  for _ in range(500):
    a = rng.randint(100, 999)
    b = rng.randint(100, a)
    assert arithmetic.solve_sub(a, b).rsplit('#### ', 1)[1] == str(a - b)
  ev = arithmetic.make_records(50, seed=1, op='-', tag='sub')
  tr = arithmetic.make_records(500, seed=0, op='-', tag='sub', carry_error_rate=0.5,
                               exclude={r['prompt'] for r in ev})
  assert not {r['prompt'] for r in ev} & {r['prompt'] for r in tr}
  assert all(r['tag'] == 'sub' and int(r['ground_truth']) >= 0 for r in tr)
  assert any(r['source'] == 'synthetic-noisy' for r in tr)
  sfl = arithmetic.make_records(300, seed=0, op='-', tag='sub', carry_error_rate=1.0,
                                sub_error='smaller_from_larger', min_digits=2, max_digits=2)
  for r in sfl:  # every answer is the column-wise |x - y| (wrong exactly when x < y somewhere)
    a, b = map(int, r['prompt'].split('-'))
    want = int(''.join(str(abs(int(x) - int(y))) for x, y in zip(str(a), str(b).zfill(2))))
    assert r['response'].endswith(f'#### {want}'), r
  fs = facts.make_facts(100, seed=0)
  assert len({r['prompt'] for r in fs}) == 100
  assert all(r['response'] == f'#### {r["ground_truth"]}' for r in fs)


@pytest.mark.e2e
def test_gopd_quick_pipeline_runs(tmp_path, capsys):
  from opd_jax.experiments import gopd
  summary = gopd.run_experiment(str(tmp_path), seed=0, quick=True)
  out = capsys.readouterr().out.rstrip().splitlines()
  assert any(line.startswith('| ExOPD + reward correction') for line in out[-6:])
  for f in ('results.md', 'results.json', 'accuracy_vs_lambda.png', 'per_domain.png',
            'rl_curves.png'):
    assert os.path.exists(tmp_path / f), f
  # the experts gate is printed before any distillation (its verdict is not asserted)
  assert any(line.startswith('GATE: ') for line in out)
  assert set(summary['gate']['rows']) == {'add', 'sub'}
  assert set(summary['multi']) == {'sft', 'opd', 'exopd'}
  # one RL run per learning rate, the rate chosen on validation (tags add_val / sub_val)
  for d in ('add', 'sub'):
    assert summary['gate']['rows'][d]['lr'] in gopd.load_recipe().QUICK_RL_LRS
    with open(tmp_path / f'rl_{d}_lr0.0001' / 'result.json') as f:
      hist = json.load(f)['history']
    assert f'eval/pass@1/{d}_val' in hist and 'reward/groups_with_signal' in hist
  for name in ('lambda1.25', 'rc_exopd_corrected'):  # G-OPD counts the reference's FLOPs
    with open(tmp_path / f'{name}_lr0.0001' / 'result.json') as f:
      hist = json.load(f)['history']
    assert hist['compute/flops/reference'][-1][1] > 0
  with open(tmp_path / 'multi_sft_lr0.0001' / 'result.json') as f:  # both experts sampled
    assert json.load(f)['history']['compute/flops/teacher_sampling'][-1][1] > 0
  gopd.aggregate([str(tmp_path), str(tmp_path)], str(tmp_path / 'agg'))
  assert os.path.exists(tmp_path / 'agg' / 'aggregate.md')
  assert os.path.exists(tmp_path / 'agg' / 'rl_curves_all.png')


@pytest.mark.e2e
def test_continual_quick_pipeline_runs(tmp_path, capsys):
  from opd_jax.experiments import continual
  summary = continual.run_experiment(str(tmp_path), seed=0, quick=True)
  out = capsys.readouterr().out.rstrip().splitlines()
  assert any(line.startswith('| + knowledge SFT (facts + replay), then OPD') for line in out[-6:])
  for f in ('results.md', 'results.json', 'continual.png'):
    assert os.path.exists(tmp_path / f), f
  assert set(summary['rows']) == {'post', 'sft_facts', 'sft_mix', 'sft_facts_opd',
                                 'sft_mix_opd'}
  continual.aggregate([str(tmp_path), str(tmp_path)], str(tmp_path / 'agg'))


@pytest.mark.e2e
def test_divergences_quick_pipeline_runs(tmp_path, capsys):
  from opd_jax.experiments import divergences as dv
  summary = dv.run_experiment(str(tmp_path), seed=0, quick=True)
  out = capsys.readouterr().out.rstrip().splitlines()
  assert any(line.startswith('| exact reverse KL') for line in out[-6:])
  for f in ('results.md', 'results.json', 'divergences.png'):
    assert os.path.exists(tmp_path / f), f
  assert set(summary['rows']) == set(dv.METHODS) and set(dv.METHODS) <= set(summary['grad'])


@pytest.mark.e2e
def test_cross_tokenizer_quick_pipeline_runs(tmp_path, capsys):
  from opd_jax.experiments import cross_tokenizer as xt
  summary = xt.run_experiment(str(tmp_path), seed=0, quick=True)
  out = capsys.readouterr().out.rstrip().splitlines()
  assert any(line.startswith('| student after OPD, cross-tokenizer teacher') for line in out[-7:])
  for f in ('results.md', 'results.json', 'cross_tokenizer.png'):
    assert os.path.exists(tmp_path / f), f
  assert set(summary['rows']) == {k for k, _ in xt.ROWS}
  # the BPE teacher really has another tokenizer (trained on the task's text)
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'teacher_bpe' / 'export'))
  assert len(tok) <= xt.BPE_VOCAB and tok.tokenize("#### 583") == ["####", "Ġ", "5", "8", "3"]
  xt.aggregate([str(tmp_path), str(tmp_path)], str(tmp_path / 'agg'))


def test_keyed_task_splits_and_zipf(tmp_path):
  from opd_jax.tasks import keyed
  from opd_jax.rewards.exact import exact_match_reward
  keys = dict(keyed.make_keys(50))
  name = next(iter(keys))
  assert keyed.solve(f'{name}:0123', 50) == f'#### 0123-{keys[name]}'
  assert keyed.make_keys(50) == keyed.make_keys(50)  # the same rules for every split
  w = keyed.zipf_weights(50, 1.0)
  assert abs(sum(w) - 1) < 1e-12 and w[0] / w[9] == pytest.approx(10.0)
  paths = keyed.write_dataset(str(tmp_path), num_keys=50, n_teacher=400, n_pool=300, n_val=40,
                              n_eval=40)
  sets = {}
  for split in ('teacher', 'pool', 'val', 'eval'):
    recs = keyed.read_jsonl(paths[split])
    sets[split] = {r['prompt'] for r in recs}
    for r in recs:
      assert r['response'] == keyed.solve(r['prompt'], 50)
      assert exact_match_reward(r['response'], r) == 1.0
    assert exact_match_reward('#### 0000-00', recs[0]) == float(recs[0]['ground_truth']
                                                                == '0000-00')
  names = list(sets)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not sets[a] & sets[b], (a, b)
  # Zipf: the rank-1 key is far more frequent in the pool than in the uniform teacher set
  pool = keyed.read_jsonl(paths['pool'])
  assert sum(r['rank'] == 1 for r in pool) > 5 * len(pool) / 50


def test_regime_gate_check_and_fit():
  from opd_jax.experiments import sft_regime as sr
  ns = [128, 256, 512, 1024, 2048]
  a, b, r2 = sr.fit_loglinear(ns, [0.1 + 0.05 * k for k in range(5)])
  assert b == pytest.approx(0.05) and a == pytest.approx(0.1 - 0.05 * 7) and r2 == pytest.approx(1)
  g = sr.gate_check(ns, [0.3, 0.38, 0.46, 0.55, 0.62], teacher_acc=0.95)
  assert g['passed'] and g['window']['doublings'] == 4
  # a plateau then a jump is not log-linear; a curve that reaches the teacher fails the gap
  assert not sr.gate_check(ns, [0.0, 0.0, 0.0, 0.9, 0.95], 0.95)['passed']
  assert not sr.gate_check(ns, [0.5, 0.6, 0.7, 0.8, 0.9], 0.95)['passed']
  cv = [(0.0, 0.2, 0), (10.0, 0.4, 1), (20.0, 0.8, 2)]
  assert sr.flops_to_reach(cv, 0.6) == pytest.approx(15.0)
  assert sr.flops_to_reach(cv, 0.9) is None


@pytest.mark.e2e
def test_sft_regime_quick_pipeline(tmp_path, capsys):
  """Every stage of the OPD-vs-SFT regime experiment runs (pipeline only, no result)."""
  from opd_jax.experiments import sft_regime as sr
  out = sr.run_experiment(str(tmp_path), seed=0, quick=True)
  text = capsys.readouterr().out
  assert 'GATE ' in text
  for f in ('gate.md', 'gate.json', 'gate.png', 'results.md', 'results.json',
            'accuracy_vs_flops.png'):
    assert os.path.exists(tmp_path / f), f
  s = out['summary']
  assert set(s['rows']) == {'opd', 'opd_topk', 'sft_teacher', 'grpo', 'negadv'}
  with open(tmp_path / 'opd_topk_lr0.001' / 'result.json') as f:
    hist = json.load(f)['history']
  assert 'loss/full_vocab' in hist  # the top-20 row trains on the teacher's top tokens
  with open(tmp_path / 'negadv_lr0.001' / 'result.json') as f:
    hist = json.load(f)['history']
  phases = {k for k in hist if k.startswith('compute/flops/')}
  assert not any(k.startswith('compute/flops/scoring') for k in phases)  # no teacher
  with open(tmp_path / 'sft_teacher_lr0.001' / 'result.json') as f:
    hist = json.load(f)['history']
  assert hist['compute/flops/teacher_sampling'][-1][1] > 0
  samples = [json.loads(x) for x in open(tmp_path / 'samples' / 'sft_samples.jsonl')]
  assert len(samples) == max(sr.recipe().QUICK_GATE_NS)
  again = sr.run_experiment(str(tmp_path), seed=0, quick=True)  # reuses every stage
  assert 'reused' in capsys.readouterr().out
  assert again['gate']['accuracy'] == out['gate']['accuracy']
  sr.aggregate([str(tmp_path), str(tmp_path)], str(tmp_path / 'agg'))
  for f in ('aggregate.md', 'gate_seeds.png', 'accuracy_vs_flops_seeds.png'):
    assert os.path.exists(tmp_path / 'agg' / f), f


def test_regime_ratio_bounds_when_opd_misses_the_target():
  """summarize: OPD never reaches the target, so a method that does gets an upper bound on
  its ratio (its FLOPs to target over OPD's whole run), one that misses too gets none; the
  data-free accounting leaves teacher sampling out."""
  from opd_jax.experiments import sft_regime as sr

  def run(accs, flops, sampling=None):
    h = {'compute/flops/total': [[s, f] for s, f in zip((10, 20), flops)],
         'eval/accuracy/keyed': [[s, a] for s, a in zip((0, 10, 20), accs)],
         'eval/accuracy/val': [[s, a] for s, a in zip((0, 10, 20), accs)]}
    if sampling:
      h['compute/flops/teacher_sampling'] = [[s, f] for s, f in zip((10, 20), sampling)]
    return {'history': h, 'final': {'eval/accuracy/keyed': accs[-1],
                                    'eval/accuracy/val': accs[-1]}, 'wall_s': 1.0}

  stages = {'teacher': {'final': {'eval/accuracy/keyed': 1.0}},
            'opd_lr0.001': run([0.6, 0.6, 0.6], [40.0, 80.0]),
            'sft_teacher_lr0.001': run([0.6, 0.7, 0.9], [20.0, 40.0], sampling=[10.0, 20.0]),
            'grpo_lr0.001': run([0.6, 0.5, 0.6], [10.0, 20.0])}
  gate = {'points': [{'n': 256, 'accuracy': 0.6, 'steps': 400, 'flops': 1.0}]}
  s = sr.summarize(stages, gate, sr.recipe(), (1e-3,), ('opd', 'sft_teacher', 'grpo'), 256,
                   {'flops_per_example': 1.0}, quick=True)
  assert s['target'] == pytest.approx(0.8)
  sft = s['rows']['sft_teacher']
  # 0.8 is halfway between steps 10 and 20: FLOPs 30 counted, 15 with sampling left out
  assert sft['flops_to_target_teacher_counted'] == pytest.approx(30.0)
  assert sft['flops_to_target_data_free'] == pytest.approx(15.0)
  assert sr._ratio_txt(sft, 'teacher_counted') == '< 0.38x'  # 30 / 80
  assert sr._ratio_txt(sft, 'data_free') == '< 0.19x'        # 15 / 80
  assert sr._ratio_txt(s['rows']['grpo'], 'data_free') == '—'


def test_regime_ratio_at_opd_own_accuracy():
  """own_target_ratios (TM's other target, each OPD variant's final accuracy): continued
  SFT's FLOPs to it read off its curve by linear interpolation, over the variant's total,
  in both accountings; a variant that ended below the start gets no ratio; a target SFT's
  curve misses is read off the gate's log-linear fit."""
  import types
  from opd_jax.experiments import sft_regime as sr
  sft = {'curve': [(0.0, 0.5, 0), (40.0, 0.7, 10), (80.0, 0.8, 20)],
         'curve_data_free': [(0.0, 0.5, 0), (20.0, 0.7, 10), (40.0, 0.8, 20)]}
  rows = {'sft_teacher': sft,
          'opd': {'accuracy': 0.45, 'total_flops_teacher_counted': 100.0},
          'opd_topk': {'accuracy': 0.6, 'total_flops_teacher_counted': 100.0}}
  own = sr.own_target_ratios(rows, {}, None, 256, 0.5, 1.0, quick=False)
  assert own['opd']['below_start']
  r = own['opd_topk']  # 0.6 is halfway from 0.5 to 0.7: FLOPs 20 counted, 10 data free
  assert r['ratio_teacher_counted'] == pytest.approx(0.2)
  assert r['ratio_data_free'] == pytest.approx(0.1)
  assert not r['extrapolated_data_free']
  # 0.9 is past SFT's curve: the gate fit acc = 0.1 + 0.1 log2 N crosses it at N* = 256;
  # with the start at N = 64 (400 steps of 1 FLOP), 60 passes of 256 at batch 64 = 240 steps
  # -> max(400, 240) = 400: no extra update FLOPs; generation (256 - 64) x 2 FLOPs = 384
  rows['opd_topk']['accuracy'] = 0.9
  gate = {'window': {'a': 0.1, 'slope_per_doubling': 0.1},
          'points': [{'n': 64, 'steps': 400, 'flops': 400.0}]}
  rc = types.SimpleNamespace(GATE_MIN_STEPS=400, GATE_EPOCHS=60, GATE_BATCH=64)
  r = sr.own_target_ratios(rows, gate, rc, 64, 0.5, 2.0, quick=False)['opd_topk']
  assert r['extrapolated_teacher_counted'] and r['extrapolated_data_free']
  assert r['sft_flops_data_free'] == pytest.approx(0.0)
  assert r['sft_flops_teacher_counted'] == pytest.approx(384.0)


@pytest.mark.e2e
def test_pipeline_quality_quick_pipeline_runs(tmp_path, capsys):
  """Pipelined vs synchronous OPD on the demo's task (pipeline only, no result)."""
  from opd_jax.experiments import pipeline_quality as pq
  summary = pq.run_experiment(str(tmp_path), seed=0, quick=True)
  out = capsys.readouterr().out
  assert '| pipelined (max_staleness 1) |' in out and 'pipelined ρ = exp(s − s_b)' in out
  assert summary['sync']['steps'] == summary['pipelined']['steps'] == 20
  assert summary['rho']['staleness'] == 1 and summary['rho']['updates'] > 0
  assert pq.aggregate([str(tmp_path)], str(tmp_path / 'agg')).startswith('seeds: 0;')


def test_agentic_gate_and_sft_flops():
  from opd_jax.experiments import agentic_tool as at
  from opd_jax.models import hf_io, tiny
  import numpy as np
  assert at.gate_check(0.25)['pass'] and at.gate_check(0.10)['pass']
  assert not at.gate_check(0.09)['pass'] and not at.gate_check(0.61)['pass']
  g = {**at.gate_check(0.7), 'step': 30, 'val_reward': 0.4}
  assert at.gate_text(g, 1).startswith('GATE FAIL: seed 1:')
  # update FLOPs of one SFT batch by hand: 3 x (the forward's matmuls + attention + unembed)
  cfg = hf_io.read_hf_config(tiny.resolve_model(at.student_spec(0, 32)))[0]
  lens = np.array([5, 9])
  attn = (np.arange(12)[None] < lens[:, None]).astype(np.int32)
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_token = cfg.num_layers * 2 * (d * (q + 2 * kv) + q * d + 3 * d * f)
  pairs = sum(n * (n + 1) // 2 for n in lens)
  attention = cfg.num_layers * 2 * 2 * q * pairs
  unembed = 2 * d * v * int((lens - 1).sum())
  assert at.sft_flops(cfg, attn) == 3 * (per_token * lens.sum() + attention + unembed)
  # student FLOPs from a trainer history: rollout + update, cumulative per logged step
  h = {'compute/flops/rollout': [(1, 2.0), (2, 5.0)], 'compute/flops/update': [(1, 1.0),
       (2, 3.0)], 'compute/flops/scoring/teacher': [(1, 7.0), (2, 9.0)]}
  assert at.student_flops(h) == {0: 0.0, 1: 3.0, 2: 8.0}
  # the shared mean ± sample std the aggregate uses (None entries are left out)
  from opd_jax.experiments.common import mean_std
  assert mean_std([1.0, 2.0, 3.0])[:2] == (2.0, 1.0) and mean_std([0.5])[:2] == (0.5, 0.0)
  assert mean_std([1.0, None, 3.0]) == (2.0, math.sqrt(2.0), 2)


@pytest.mark.e2e
def test_agentic_quick_pipeline_runs(tmp_path, capsys):
  from opd_jax.experiments import agentic_tool as at
  s = at.run_experiment(str(tmp_path), seed=0, quick=True, long_opd=(1e-3, 3))
  out = capsys.readouterr().out
  assert any(line.startswith('GATE ') for line in out.splitlines())  # its verdict not asserted
  for f in ('results.md', 'results.json', 'reward_vs_flops.png', 'data/val.jsonl'):
    assert os.path.exists(tmp_path / f), f
  splits = {k: {json.loads(l)['prompt'] for l in open(tmp_path / 'data' / f'{k}.jsonl')}
            for k in ('train', 'val', 'eval')}
  assert not (splits['train'] & splits['val'] or splits['train'] & splits['eval']
              or splits['val'] & splits['eval'])
  assert set(s['rows']) == {'teacher', 'init', 'opd', 'sft', 'opd_obs', 'opd_long'}
  opd, sft = s['runs']['opd']['0.001'], s['runs']['sft']['0.001']
  # the trainer's on_eval hook put the held-out episode metrics in OPD's history
  assert 'heldout/right_call' in opd['history'][-1] and opd['history'][0]['step'] == 0
  assert opd['flops'] > 0 and opd['teacher_flops'] > 0
  # SFT runs until its update FLOPs reach OPD's student FLOPs (rollout + update)
  assert sft['flops'] >= s['rows']['opd']['flops'] and sft['history'][-1]['flops'] == sft['flops']
  assert sft['teacher_flops'] > 0
  # a rerun reuses every stage
  again = at.run_experiment(str(tmp_path), seed=0, quick=True, long_opd=(1e-3, 3))
  assert again['rows'] == s['rows'] and 'reused' in capsys.readouterr().out
  at.aggregate([str(tmp_path), str(tmp_path)], str(tmp_path / 'agg'))
  assert os.path.exists(tmp_path / 'agg' / 'aggregate.md')
  assert os.path.exists(tmp_path / 'agg' / 'reward_vs_flops.png')


def test_agentic_flops_to_reach():
  from opd_jax.experiments import agentic_tool as at
  h = [{'flops': 0.0, 'heldout/reward': 0.2}, {'flops': 5.0, 'heldout/reward': 0.95},
       {'flops': 9.0, 'heldout/reward': 0.85}]
  assert at.flops_to_reach(h, 0.9) == 5.0 and at.flops_to_reach(h, 0.99) is None
