"""The run builder: the AOT check compiles the trainer's own update, config checks run before
any weights load, and a resumed run refuses a config that changes the objective or shapes."""

import json

import jax
import pytest

from opd_jax import builder
from opd_jax import sharding as shd
from opd_jax.train import ConfigError, load_data, run
from test_train import _runlocal_recipes, load_config, with_overrides

RECIPES = [r for r in _runlocal_recipes() if r != 'compute_efficiency']


@pytest.mark.parametrize('name', RECIPES)
def test_aot_and_trainer_compile_the_same_update(name):
  """build_run with weights (the trainer) and without (opd_jax.aot) lower the update to the
  same program for the same batch: same graph, shardings and shapes, byte for byte."""
  config = load_config(name, 'runlocal')
  mesh = shd.make_mesh(dict(config.mesh))
  real = builder.build_run(config, mesh, tokenizer=load_data(config).tokenizer)
  abstract = builder.build_run(config, mesh, abstract=True)
  rows = builder.batch_rows(config) // int(config.batch.mini_batches)
  batch = builder.update_batch_spec(config, mesh, rows, 64)
  texts = [r.update_fn.lower(r.abstract_state(), batch).as_text() for r in (real, abstract)]
  assert texts[0] == texts[1]
  assert real.stop_ids == abstract.stop_ids and real.rollout_sp == abstract.rollout_sp
  assert [t.name for t in real.teachers] == [t.name for t in abstract.teachers]
  # the trainer's state really has the shardings the AOT check assumes
  state = real.init_state()
  assert jax.tree.map(lambda x: x.sharding, state) == real.state_shardings


def test_config_errors_come_before_weights(tmp_path, monkeypatch):
  def no_load(*a, **kw):
    raise AssertionError('weights loaded before the config was checked')
  monkeypatch.setattr(builder, 'load_pretrained', no_load)
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                          rollout__prompts_per_step=3)
  with pytest.raises(ConfigError, match='not divisible'):
    run(config, str(tmp_path / 'a'))
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), mode='sft',
                          sft__source='nowhere')
  with pytest.raises(ConfigError, match="config.sft.source='nowhere'"):
    run(config, str(tmp_path / 'b'))


def test_resume_refuses_a_changed_objective_and_continues_a_longer_run(tmp_path):
  base = dict(total_steps=2, eval__num_prompts=0, export__hf_dir='')
  first = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), **base),
              str(tmp_path))
  assert first['step'] == 2
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert saved['total_steps'] == 2 and saved['student']['model'].startswith('tiny:')
  changed = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                           rollout__max_new_tokens=saved['rollout']['max_new_tokens'] + 8,
                           **base)
  with pytest.raises(ConfigError, match=r'config.rollout.max_new_tokens \(\d+ -> \d+\)'):
    run(changed, str(tmp_path))
  longer = run(with_overrides(load_config('opd_single_teacher', 'runlocal'),
                              **dict(base, total_steps=3)), str(tmp_path))
  assert longer['step'] == 3 and [s for s, _ in longer['history']['loss']] == [1, 2, 3]
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['total_steps'] == 3
