"""The run builder: the AOT check compiles the trainer's own update, config checks run before
any weights load, and a resumed run refuses a config that changes the objective or shapes."""

import json

import jax
import pytest

from opd_jax.training import builder
from opd_jax import sharding as shd
from opd_jax.train import ConfigError, load_data, run
from test_train import _runlocal_recipes, load_config, with_overrides

RECIPES = [r for r in _runlocal_recipes() if r != 'compute_efficiency']


@pytest.mark.parametrize('name', RECIPES)
def test_aot_and_trainer_compile_the_same_update(name):
  """build_run with weights (the trainer) and without (opd_jax.tools.aot) lower the update to the
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


def test_full_vocab_option_checks_name_the_field():
  def check(name, **kw):
    builder.validate(with_overrides(load_config(name, 'runlocal'), **kw))
  # a remote teacher returns only its own top-k: the exact options are refused, naming it
  for option in ('reverse_kl_exact', 'forward_kl_exact', 'jsd_exact',
                 'reverse_kl_student_topk'):
    with pytest.raises(ConfigError, match=rf"config.loss.full_vocab='{option}' needs an "
                                          r'in-process teacher.*config.teachers.teacher is '
                                          'remote'):
      check('opd_remote_teacher', loss__full_vocab=option)
    check('opd_single_teacher', loss__full_vocab=option)    # in process: fine
  check('opd_remote_teacher', loss__full_vocab='reverse_kl')  # top-k: fine remotely
  with pytest.raises(ConfigError, match=r"config.loss.full_vocab='rkl'; known: forward_kl, "
                                        'reverse_kl, jsd, forward_kl_exact'):
    check('opd_single_teacher', loss__full_vocab='rkl')
  with pytest.raises(ConfigError, match='config.loss.vocab_chunk_size=0'):
    check('opd_single_teacher', loss__full_vocab='jsd_exact', loss__vocab_chunk_size=0)
  with pytest.raises(ConfigError, match='config.loss.full_vocab_top_k=0'):
    check('opd_single_teacher', loss__full_vocab='reverse_kl_student_topk',
          loss__full_vocab_top_k=0)
  check('opd_single_teacher', loss__full_vocab='reverse_kl_exact', loss__full_vocab_top_k=0)
  # under rollout truncation the student is the truncated policy: KL(teacher || it) is
  # infinite, so the forward KL (and JSD at beta = 0, its limit) are refused, naming the field
  for option, beta in (('forward_kl', 0.5), ('forward_kl_exact', 0.5), ('jsd', 0.0),
                       ('jsd_exact', 0.0)):
    for trunc in (dict(rollout__top_k=5), dict(rollout__top_p=0.9)):
      with pytest.raises(ConfigError, match=rf"config.loss.full_vocab='{option}'.*infinite"):
        check('opd_single_teacher', loss__full_vocab=option, loss__jsd_beta=beta, **trunc)
    check('opd_single_teacher', loss__full_vocab=option, loss__jsd_beta=beta)
  for option in ('reverse_kl', 'jsd', 'reverse_kl_exact', 'jsd_exact',
                 'reverse_kl_student_topk'):
    check('opd_single_teacher', loss__full_vocab=option, rollout__top_k=5, rollout__top_p=0.9)


def test_aot_and_trainer_compile_the_same_exact_full_vocab_update():
  """The exact option's update (teacher hidden states and output projection in the batch)
  lowers identically with weights and from architectures alone (what opd_jax.tools.aot compiles)."""
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                          loss__full_vocab='reverse_kl_exact')
  mesh = shd.make_mesh(dict(config.mesh))
  real = builder.build_run(config, mesh, tokenizer=load_data(config).tokenizer)
  abstract = builder.build_run(config, mesh, abstract=True)
  assert real.teachers[0].with_hidden and real.teachers[0].top_k == 0
  assert real.teacher_unembed.shape == abstract.teacher_unembed.shape
  rows = builder.batch_rows(config) // int(config.batch.mini_batches)
  batch = builder.update_batch_spec(config, mesh, rows, 64)
  assert batch.teacher_hidden.shape == (rows, 64, real.teachers[0].cfg.hidden_size)
  assert batch.teacher_unembed.sharding == real.teacher_unembed.sharding
  texts = [r.update_fn.lower(r.abstract_state(), batch).as_text() for r in (real, abstract)]
  assert texts[0] == texts[1]


def test_a_gopd_reference_with_another_vocabulary_stops_before_any_weights_load(
    tmp_path, monkeypatch):
  """Like a teacher, the G-OPD reference scores the student's token ids, so its tokenizer
  must match; the check runs before the student's (or any) weights load."""
  from opd_jax.data import VocabMismatchError
  from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
  other = make_tiny_checkpoint(str(tmp_path / 'ref'), tokenizer=build_char_tokenizer(
      chars='0123456789+-=#abcdefghijklmnopqrstuvwxyz \n'))
  loaded = []
  monkeypatch.setattr(builder, 'load_pretrained', lambda *a, **kw: loaded.append(a) or 1 / 0)
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), gopd__enabled=True,
                          gopd__reference=other)
  with pytest.raises(VocabMismatchError, match=r'config\.gopd\.reference.*token id \d+'):
    run(config, str(tmp_path / 'run'))
  assert not loaded
