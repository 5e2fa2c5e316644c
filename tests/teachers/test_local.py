"""Multi-teacher routing by tag: each teacher scores only its rows, token counts per
teacher, zero signal for unrouted records, teachers on disjoint devices, the start-up
vocabulary check, and G-OPD with λ = 1 reproducing pure OPD inside the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.objectives import advantages as token_adv
from opd_jax.training import batches as steps
from opd_jax.models import tiny
from opd_jax.models import load_pretrained
from opd_jax.buckets import batch_bucket
from opd_jax.teachers.scoring import make_score_fn
from opd_jax.teachers.local import LocalTeacher, TeacherSpec, route_matrix, score_teachers
from test_train import load_config, with_overrides

TAGS = ['math', 'code', 'general', 'math', 'poetry', 'code', 'math', 'general']
SPECS = [TeacherSpec('math', model='tiny:qwen3:hidden_size=32,num_layers=1,seed=21',
                     kl_coef=1.0, tags=('math',), devices='0:1'),
         TeacherSpec('code', model='tiny:qwen3:hidden_size=32,num_layers=1,seed=22',
                     kl_coef=0.5, tags=('code',), devices='4:8'),
         TeacherSpec('general', model='tiny:llama:hidden_size=32,num_layers=1,seed=23',
                     kl_coef=0.2, tags=())]


def _batch():
  rng = np.random.RandomState(0)
  tokens = rng.randint(5, 100, (8, 20)).astype(np.int32)
  mask = np.ones_like(tokens)
  for i in range(8):
    mask[i, :rng.randint(0, 5)] = 0                 # left padding
    mask[i, 12 + rng.randint(0, 8):] = 0            # response of varying length
  lmask = np.zeros_like(mask, dtype=np.float32)
  lmask[:, 10:] = mask[:, 10:]
  return tokens, mask, lmask


@pytest.fixture(scope='module')
def teachers():
  mesh = shd.make_mesh({'fsdp': 2, 'data': 4})
  out = []
  for spec in SPECS:
    spec = TeacherSpec(**{**spec.__dict__, 'model': tiny.resolve_model(spec.model)})
    out.append(LocalTeacher(spec, student_mesh=mesh))
  return mesh, out


def test_route_matrix():
  r = route_matrix(TAGS, SPECS)
  np.testing.assert_array_equal(r[:, 0], [t == 'math' for t in TAGS])
  np.testing.assert_array_equal(r[:, 1], [t == 'code' for t in TAGS])
  np.testing.assert_array_equal(r[:, 2], 1.0)


def test_each_teacher_scores_only_its_rows(teachers):
  mesh, ts = teachers
  tokens, mask, lmask = _batch()
  route = route_matrix(TAGS, SPECS)
  dev_tokens, dev_mask = shd.shard_batch((tokens, mask), mesh)
  t, _ = score_teachers(ts, dev_tokens, dev_mask, route, host_mask_BxT=mask,
                        out_sharding=dev_tokens.sharding)
  t = np.asarray(t)
  for j, teacher in enumerate(ts):
    rows = np.nonzero(route[:, j])[0]
    # counted tokens are exactly the routed rows' real tokens
    assert teacher.tokens_scored == int(mask[rows].sum())
    # forwards: the routed rows, padded up to a batch bucket that the teacher's data axes
    # divide (on one device: 3 math rows -> 4 forwarded, not the batch's 8)
    mult = shd.batch_size_multiple(teacher.mesh)
    assert teacher.rows_forwarded == (8 if len(rows) == 8 else batch_bucket(len(rows), mult))
    ref = make_score_fn(teacher.graphdef)(teacher.params, jnp.asarray(tokens[rows]),
                                          jnp.asarray(mask[rows]))['logprobs']
    np.testing.assert_allclose(t[j, rows], np.asarray(ref), atol=1e-5)
    others = np.setdiff1d(np.arange(8), rows)
    assert np.all(t[j, others] == 0)
  assert ts[0].rows_forwarded == 4 and ts[1].rows_forwarded == 4
  # the code teacher lives on devices 4..7 only
  assert {d.id for d in ts[1].mesh.devices.flat} == {4, 5, 6, 7}
  assert {d.id for d in ts[1].params['embed_tokens']['weight'].value.sharding.device_set} \
      <= {4, 5, 6, 7}


def test_advantage_routing_and_unrouted_records(teachers):
  mesh, ts = teachers
  tokens, mask, lmask = _batch()
  route = route_matrix(TAGS, SPECS[:2])  # drop the general teacher: 'general'/'poetry' unrouted
  dev = shd.shard_batch((tokens, mask), mesh)
  t, _ = score_teachers(ts[:2], *dev, route, host_mask_BxT=mask, out_sharding=dev[0].sharding)
  s_b = jnp.asarray(np.random.RandomState(1).randn(8, 20).astype(np.float32) - 2) * lmask
  coef = jnp.asarray([1.0, 0.5])
  adv, kl_sum, kl_cnt = token_adv.advantages(s_b, t, None, coef, jnp.asarray(route),
                                         jnp.asarray(lmask), None, mode='opd')
  adv, t, s_b = np.asarray(adv), np.asarray(t), np.asarray(s_b)
  for i, tag in enumerate(TAGS):
    if tag == 'math':
      expected = -1.0 * (s_b[i] - t[0, i]) * lmask[i]
    elif tag == 'code':
      expected = -0.5 * (s_b[i] - t[1, i]) * lmask[i]
    else:                                   # routed to no teacher: no signal at all
      expected = np.zeros(20)
    np.testing.assert_allclose(adv[i], expected, atol=1e-6, err_msg=f'row {i} ({tag})')
  kl_cnt = np.asarray(kl_cnt)
  assert kl_cnt[0].sum() == lmask[[i for i, x in enumerate(TAGS) if x == 'math']].sum()
  assert kl_cnt[:, [2, 4, 7]].sum() == 0
  metrics = steps.kl_metrics(np.asarray(kl_sum), kl_cnt, TAGS, ['math', 'code'])
  assert 'opd/reverse_kl/tag/math' in metrics and 'opd/reverse_kl/tag/poetry' not in metrics


def test_multi_teacher_trainer_counts_tokens_per_teacher(tmp_path):
  from opd_jax.train import run
  config = with_overrides(load_config('opd_multi_teacher', 'runlocal'), total_steps=1,
                          eval__num_prompts=0, teachers__math__devices='4:8')
  result = run(config, str(tmp_path))
  counts = result['tokens_scored']
  # general (tags=[]) sees every row, so it scores strictly more tokens than either specialist
  assert counts['general'] > counts['math'] > 0 and counts['general'] > counts['code'] > 0


def test_vocabulary_mismatch_names_the_first_differing_token(tmp_path):
  from opd_jax.data import VocabMismatchError
  from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
  from opd_jax.train import run
  other = make_tiny_checkpoint(str(tmp_path / 'teacher'), tokenizer=build_char_tokenizer(
      chars='0123456789+-=#abcdefghijklmnopqrstuvwxyz \n'))
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                          teachers__teacher__model=other)
  with pytest.raises(VocabMismatchError, match=r'token id \d+'):
    run(config, str(tmp_path / 'run'))


def test_gopd_with_lambda_one_is_pure_opd(tmp_path):
  from opd_jax.train import run
  common = dict(total_steps=2, eval__num_prompts=0, checkpoint__every=0)
  opd = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), **common),
            str(tmp_path / 'opd'))
  gopd = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), gopd__enabled=True,
                            gopd__reward_scale=1.0, **common), str(tmp_path / 'gopd'))
  for key in ('loss', 'opd/reverse_kl', 'grad_norm'):
    assert opd['history'][key] == gopd['history'][key], key
  ex = run(with_overrides(load_config('opd_single_teacher', 'runlocal'), gopd__enabled=True,
                          gopd__reward_scale=2.0, **common), str(tmp_path / 'exopd'))
  assert ex['history']['loss'][0] != opd['history']['loss'][0]   # λ > 1 changes the signal
  assert ex['history']['opd/reverse_kl'][0] == opd['history']['opd/reverse_kl'][0]
