"""opd_jax.tools.check_teacher: the pre-flight report on the runlocal recipes (the CLI, the fp32 /
bf16 train-inference gap against the update's own metric, a teacher with another tokenizer,
and a real teacher server compared with a local copy that agrees and with one that does
not)."""

import os
import re
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.training import builder
from opd_jax.tools import check_teacher
from opd_jax import sharding as shd
from opd_jax.training import update as update_lib
from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint, resolve_model
from opd_jax.train import load_data
from test_remote import ServerProcess
from test_train import load_config, with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs._local import TINY_TEACHER  # noqa: E402

SHORT = dict(rollout__max_new_tokens=12)


def _check(config, **kw):
  lines = []
  warnings = check_teacher.check(config, out=lines.append, **kw)
  return '\n'.join(lines), warnings


def _gap_means(text):
  """{dtype: mean} of the student gap lines."""
  return {m[0]: float(m[1]) for m in re.findall(
      r'^  (float32|bfloat16) compute \(teacher .*?\): mean (\S+)', text, re.M)}


@pytest.mark.e2e
def test_cli_runlocal_reports_every_section():
  # A config override through the flags, --num-prompts, and --strict's exit status 0.
  proc = subprocess.run(
      [sys.executable, '-m', 'opd_jax.tools.check_teacher', '--config',
       'configs/opd_single_teacher.py:runlocal', '--num-prompts', '8',
       '--config.rollout.max_new_tokens=12', '--strict'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  out = proc.stdout
  assert proc.returncode == 0, out + proc.stderr[-3000:]
  for section in ('== tokenizers ==', '== chat templates', '== OPD signal', '8 rollouts',
                  '== student train-inference gap', '== 0 warning(s) =='):
    assert section in out, out
  assert "teacher 'teacher':" in out and ': OK' in out
  assert "tag 'math'" in out and '    | <|im_start|>user' in out
  gaps = _gap_means(out)
  assert set(gaps) == {'float32', 'bfloat16'}, out
  assert gaps['float32'] < 1e-4 and 'WARNING' not in out


def test_gap_is_the_updates_metric():
  # The report's s is the update's: its mean |s - s_b| equals the trainer's logged
  # is/sampler_logprob_gap (update._loss_terms) on the same bf16 rollout, and the fp32 gap
  # is far below the warning threshold.
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'), **SHORT)
  mesh = shd.make_mesh(dict(config.mesh))
  data = load_data(config)
  r = builder.build_run(config, mesh, tokenizer=data.tokenizer)
  prompts = data.encoder.encode_batch(data.prompts.next_batch(8))
  key = jax.random.key(0)
  for dtype, bound in (('float32', 1e-4), ('bfloat16', None)):
    tokens, attn, lmask, s_b, s = check_teacher.rollout_and_s(r, config, dtype, prompts, key)
    m = np.asarray(lmask, np.float64)
    mine = float(np.sum(np.abs(np.asarray(s) - np.asarray(s_b)) * m) / m.sum())
    c = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                       student__compute_dtype=dtype, **SHORT)
    batch = update_lib.UpdateBatch(tokens, attn, lmask, behaviour_logprobs=s_b,
                                   advantages=jnp.zeros_like(s_b))
    with jax.set_mesh(mesh):
      stats = jax.jit(lambda p, b: update_lib._loss_terms(p, r.graphdef, b,
                                                          builder.loss_spec(c))[1])(r.params,
                                                                                    batch)
    logged = float(stats['is/sampler_logprob_gap'].result())
    np.testing.assert_allclose(mine, logged, rtol=1e-4, atol=1e-9)
    if bound:
      assert mine < bound
  assert mine > 0  # bf16 compute: a real, measurable gap


def test_teacher_with_another_tokenizer_is_reported(tmp_path):
  chars = string.ascii_letters + string.digits + string.punctuation + ' \n'  # other ids
  path = make_tiny_checkpoint(str(tmp_path / 'other_tok'),
                              tokenizer=build_char_tokenizer(chars=chars))
  config = with_overrides(load_config('opd_single_teacher', 'runlocal'),
                          teachers__teacher__model=path, **SHORT)
  text, warnings = _check(config, num_prompts=8)
  assert len(warnings) == 1 and 'tokenizer MISMATCH' in warnings[0], text
  assert "at token id 5: student has '0', teacher 'teacher' has 'a'" in warnings[0]
  assert 'WARNING: teacher' in text and '== chat templates' in text
  assert 'no teacher with a matching tokenizer' in text  # the run could not score


@pytest.fixture(scope='module')
def server():
  s = ServerProcess(TINY_TEACHER, '--max-batch-size', '16', '--batch-wait-ms', '5', devices=1)
  yield s
  s.kill()


def test_remote_teacher_against_local_copies(server, tmp_path):
  config = with_overrides(load_config('opd_remote_teacher', 'runlocal'),
                          teachers__teacher__remote_url=server.url, **SHORT)
  # The served checkpoint itself: agreement to float precision, repeatable, no warning.
  text, warnings = _check(config, num_prompts=8,
                          local_copies={'teacher': resolve_model(TINY_TEACHER)})
  assert not warnings, text
  assert f'server {server.url}' in text and "== teacher 'teacher' (remote) ==" in text
  agree = float(re.search(r'\|t - t_local\| .*?: mean (\S+)', text).group(1))
  repeat = float(re.search(r'repeat-request .*?max (\S+)', text).group(1))
  # The server batches requests dynamically, so a repeat may pad differently: ulp-level.
  assert agree < 1e-4 and repeat < 1e-5, text
  # Same vocabulary, other weights: the scores disagree and the command warns.
  other = make_tiny_checkpoint(str(tmp_path / 'other'), hidden_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, seed=7)
  text, warnings = _check(config, num_prompts=8, local_copies={'teacher': other})
  assert len(warnings) == 1 and warnings[0].startswith(f'|t - t_local| ({other})'), text
  assert 'of the OPD signal' in warnings[0]


def test_cross_tokenizer_teacher_reports_its_alignment():
  # The runlocal recipe's char-level student and BPE teacher: the tokenizer line says
  # "another tokenizer" without warning, the alignment fractions of the sample add up to
  # 100%, and a same-tokenizer copy (the char-level tiny teacher) gives the agreement lines.
  config = with_overrides(load_config('opd_cross_tokenizer', 'runlocal'), **SHORT)
  text, _ = _check(config, num_prompts=8, local_copies={'teacher': resolve_model(TINY_TEACHER)})
  assert 'another tokenizer, aligned by text' in text and 'MISMATCH' not in text, text
  m = re.search(r"alignment to the student's tokens.*\n  (\d+) student tokens of 8 responses: "
                r'one_to_one (\S+)%, split (\S+)%, merged (\S+)%; the teacher read (\d+) '
                r"tokens for the student's (\d+)", text)
  assert m, text
  assert sum(float(m[i]) for i in (2, 3, 4)) == pytest.approx(100, abs=0.2)
  # every response token of the OPD-signal line is classified (random samples here: mostly
  # one to one; a special token written inside a response is split into teacher tokens)
  assert re.search(rf"teacher 'teacher': \S+ over {m[1]} tokens", text), text
  assert int(m[5]) != int(m[6])
  assert re.search(r'\|t~ - t_same\| \(.*\), all tokens: mean \S+', text), text
  assert re.search(r'\|sum t~ - sum t_same\| per response: mean \S+', text), text
