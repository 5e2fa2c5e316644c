"""Cross-tokenizer teachers (docs/design.md §12): the alignment rule on a hand-built pair of
tokenizers against a hand-computed expectation, a char-level student with a byte-level BPE
teacher trained here by the `tokenizers` library, the reduction to today's OPD with identical
tokenizers (same advantages exactly), routing among same- and cross-tokenizer teachers, and
the config checks."""

import numpy as np
import pytest

import jax.numpy as jnp

from opd_jax import sharding as shd
from opd_jax.data import PromptEncoder, Record, VocabMismatchError
from opd_jax.models import tiny
from opd_jax.objectives import advantages as token_adv
from opd_jax.teachers import align
from opd_jax.teachers.cross import CrossTokenizerTeacher, ScoreContext
from opd_jax.teachers.local import (LocalTeacher, TeacherSpec, route_matrix, score_teachers,
                                    submit_teachers)
from opd_jax.teachers.scoring import make_score_fn

BPE_TEACHER = 'tiny:llama:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=5,bpe=300'
CHAR_TEACHER = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=6'


def _hand_bpe(merges):
  """A BPE over the letters a-h with the given merges (no pre-tokenizer, fused decoding)."""
  from tokenizers import Tokenizer, decoders, models
  from transformers import PreTrainedTokenizerFast
  vocab = {c: i for i, c in enumerate('abcdefgh')}
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
  tok.decoder = decoders.Fuse()
  return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_rule_on_a_hand_built_pair_with_known_splits_and_merges():
  # 'abcdefgh': student  a | b | cd | e | f | gh      (ends 1 2 4 5 6 8)
  #             teacher  ab | c | de | f | g | h      (ends 2 3 5 6 7 8)
  student, teacher = _hand_bpe([('c', 'd'), ('g', 'h')]), _hand_bpe([('a', 'b'), ('d', 'e')])
  s_ids = student('abcdefgh')['input_ids']
  assert student.convert_ids_to_tokens(s_ids) == ['a', 'b', 'cd', 'e', 'f', 'gh']
  a = align.align_response(student, teacher, s_ids)
  assert teacher.convert_ids_to_tokens(a.teacher_ids) == ['ab', 'c', 'de', 'f', 'g', 'h']
  np.testing.assert_array_equal(a.student_ends, [1, 2, 4, 5, 6, 8])
  np.testing.assert_array_equal(a.teacher_ends, [2, 3, 5, 6, 7, 8])
  t = np.asarray([-0.5, -1.25, -2.0, -0.125, -3.0, -0.75], np.float32)
  # By hand: each teacher token goes to the student token in which it ends.
  #   ab (ends at 2) -> b;  c (3) -> cd;  de (5) -> e;  f (6) -> f;  g (7), h (8) -> gh
  expected = np.zeros(6, np.float32)
  for j, i in enumerate([1, 2, 3, 4, 5, 5]):
    expected[i] += t[j]
  np.testing.assert_array_equal(a.aligned(t), expected)
  assert a.aligned(t).sum() == pytest.approx(t.sum())  # the response's total is kept
  # a: merged into ab; b: ab starts before it; cd: de crosses its end; e: inside de;
  # f: one to one; gh: split into g + h (exact)
  assert [align.KINDS[k] for k in a.kinds()] == ['merged', 'merged', 'merged', 'merged',
                                                  'one_to_one', 'split']
  assert align.alignment_counts([a]) == {'one_to_one': 1, 'split': 1, 'merged': 4}
  # A final stop token maps one to one to the teacher's end of turn.
  b = align.align_response(student, teacher, s_ids + [0], stop_ids=[0], teacher_stop_id=7)
  assert b.teacher_ids[-1] == 7 and b.stop
  np.testing.assert_array_equal(b.aligned(np.append(t, -0.25)), np.append(expected, -0.25))


def test_offsets_of_tokens_that_end_inside_a_character():
  # Byte-level BPE: 'é' is two bytes; a token holding only its first byte decodes to U+FFFD
  # and ends where the previous one did (the token completing the character carries it).
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok)
  ids = fast('aé', add_special_tokens=False)['input_ids']
  assert len(ids) == 3
  np.testing.assert_array_equal(align.end_offsets(fast, ids, 'aé'), [1, 1, 2])


@pytest.fixture(scope='module')
def char_tok():
  return tiny.build_char_tokenizer()


@pytest.fixture(scope='module')
def bpe_teacher_path():
  return tiny.resolve_model(BPE_TEACHER)  # the BPE is trained here, by `tokenizers`


@pytest.fixture(scope='module')
def bpe_tok(bpe_teacher_path):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(bpe_teacher_path)


@pytest.fixture(scope='module')
def mesh():
  return shd.make_mesh({'fsdp': 2, 'data': 4})


RESPONSES = ['123 + 456 = 579.', 'The answer is 42', 'hello world', 'What is 7?', '9']
RECORDS = [Record(id=str(i), tag=tag, messages=[{'role': 'user', 'content': f'What is {i}+{i}?'}])
           for i, tag in enumerate(['math', 'general', 'math', 'general', 'math', 'general',
                                    'math', 'math'])]


def _student_batch(tok, n_new=24):
  """A batch laid out as the sampler's: prompts (the char tokenizer's chat template) left-
  padded to P, responses from column P, right-padded; rows 0, 2, 4 end with the stop token."""
  enc = PromptEncoder(tok, max_prompt_len=256)
  prompts = [enc.encode(r) for r in RECORDS]
  p = max(len(x) for x in prompts)
  b = len(RECORDS)
  tokens = np.zeros((b, p + n_new), np.int32)
  attn = np.zeros_like(tokens)
  for i, pr in enumerate(prompts):
    resp = tok(RESPONSES[i % len(RESPONSES)], add_special_tokens=False)['input_ids']
    if i % 2 == 0:
      resp = resp + [tok.eos_token_id]
    tokens[i, p - len(pr):p] = pr
    tokens[i, p:p + len(resp)] = resp
    attn[i, p - len(pr):p + len(resp)] = 1
  lmask = np.zeros(tokens.shape, np.float32)
  lmask[:, p:] = attn[:, p:]
  return tokens, attn, lmask


def test_char_student_bpe_teacher_scores_aligned_text(char_tok, bpe_tok, bpe_teacher_path, mesh):
  assert len(bpe_tok) == 300 and bpe_tok.eos_token == '<|eot_id|>'
  with pytest.raises(VocabMismatchError):
    from opd_jax.data import check_tokenizers_match
    check_tokenizers_match(char_tok, bpe_tok)
  inner = LocalTeacher(TeacherSpec('bpe', model=bpe_teacher_path), student_mesh=mesh)
  teacher = CrossTokenizerTeacher(inner, student_tokenizer=char_tok, teacher_tokenizer=bpe_tok,
                                  stop_ids=[char_tok.eos_token_id])
  tokens, attn, lmask = _student_batch(char_tok)
  rows = np.asarray([0, 1, 2, 5])
  out = teacher.score(jnp.asarray(tokens), jnp.asarray(attn), rows,
                      context=ScoreContext(RECORDS, lmask))
  got = np.asarray(out['logprobs'])
  score = make_score_fn(inner.graphdef)
  for r in range(len(RECORDS)):
    if r not in rows:
      assert np.all(got[r] == 0)
      continue
    # Independent reference: the teacher's own chat template and tokenization, scored as
    # one unpadded sequence, then attributed by a plain loop over character end offsets.
    text = RESPONSES[r % len(RESPONSES)]
    prompt = bpe_tok.apply_chat_template(RECORDS[r].messages, add_generation_prompt=True,
                                         tokenize=False)
    assert prompt.startswith('<|begin_of_text|><|start_header_id|>user')
    p_ids = bpe_tok(prompt, add_special_tokens=False)['input_ids']
    t_ids = bpe_tok(text, add_special_tokens=False)['input_ids']
    stop = r % 2 == 0
    seq = p_ids + t_ids + ([bpe_tok.eos_token_id] if stop else [])
    lp = np.asarray(score(inner.params, jnp.asarray([seq]), jnp.ones((1, len(seq)),
                                                                     jnp.int32))['logprobs'])[0]
    t_lp = lp[len(p_ids):]
    t_end, ends = 0, []
    for tid in t_ids:
      t_end += len(bpe_tok.decode([tid]))
      ends.append(t_end)
    expected = np.zeros(len(text) + stop, np.float32)
    for j, e in enumerate(ends):
      expected[e - 1] += t_lp[j]  # char student: token k covers character k
    if stop:
      expected[-1] = t_lp[-1]
    pos = np.nonzero(lmask[r])[0]
    np.testing.assert_allclose(got[r, pos], expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.delete(got[r], pos) == 0)
  # the teacher's own token count: its prompt + response tokens
  assert teacher.last_seq_lens[0] > 0 and teacher.last_seq_lens[3] == 0
  assert sum(teacher.alignment.values()) == int(lmask[rows].sum())


@pytest.fixture(scope='module')
def char_teacher(mesh):
  spec = TeacherSpec('same', model=tiny.resolve_model(CHAR_TEACHER))
  return LocalTeacher(spec, student_mesh=mesh)


@pytest.mark.parametrize('rows', [np.arange(8), np.asarray([1, 3, 4])], ids=['all', 'some'])
def test_identical_tokenizers_give_todays_advantages_exactly(char_tok, char_teacher, mesh,
                                                              rows):
  # The alignment path itself (forced: make_teacher would skip it for a same tokenizer).
  cross = CrossTokenizerTeacher(char_teacher, student_tokenizer=char_tok,
                                teacher_tokenizer=char_tok, stop_ids=[char_tok.eos_token_id])
  tokens, attn, lmask = _student_batch(char_tok)
  dev_tokens, dev_attn, dev_lmask = shd.shard_batch((tokens, attn, lmask), mesh)
  route = np.zeros((8, 1), np.float32)
  route[rows] = 1
  t_today, _ = score_teachers([char_teacher], dev_tokens, dev_attn, route,
                              out_sharding=dev_tokens.sharding)
  t_cross, _ = score_teachers([cross], dev_tokens, dev_attn, route,
                              out_sharding=dev_tokens.sharding,
                              context=ScoreContext(RECORDS, dev_lmask))
  rng = np.random.RandomState(0)
  s_b = jnp.asarray(rng.normal(-2, 1, tokens.shape).astype(np.float32)) * dev_lmask
  coef, route_d = jnp.asarray([0.7], jnp.float32), jnp.asarray(route)
  a_today = token_adv.advantages(s_b, t_today, None, coef, route_d, dev_lmask, None, mode='opd')
  a_cross = token_adv.advantages(s_b, t_cross, None, coef, route_d, dev_lmask, None, mode='opd')
  for x, y in zip(a_today, a_cross):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert cross.alignment == {'one_to_one': int(lmask[rows].sum()), 'split': 0, 'merged': 0}
  # and the teacher's own token count is the student's
  np.testing.assert_array_equal(cross.last_seq_lens[rows], attn[rows].sum(-1))


def test_routing_mixes_same_and_cross_tokenizer_teachers(char_tok, bpe_tok, bpe_teacher_path,
                                                         char_teacher, mesh):
  inner = LocalTeacher(TeacherSpec('bpe', model=bpe_teacher_path, tags=('general',)),
                       student_mesh=mesh)
  cross = CrossTokenizerTeacher(inner, student_tokenizer=char_tok, teacher_tokenizer=bpe_tok,
                                stop_ids=[char_tok.eos_token_id])
  same = LocalTeacher(TeacherSpec('same', model=char_teacher.spec.model, tags=('math',)),
                      student_mesh=mesh, parts=(char_teacher.graphdef, char_teacher.params,
                                                char_teacher.cfg))
  teachers = [same, cross]
  tags = [r.tag for r in RECORDS]
  route = route_matrix(tags, [t.spec for t in teachers])
  tokens, attn, lmask = _student_batch(char_tok)
  dev_tokens, dev_attn, dev_lmask = shd.shard_batch((tokens, attn, lmask), mesh)
  t, extras = score_teachers(teachers, dev_tokens, dev_attn, route, host_mask_BxT=attn,
                             out_sharding=dev_tokens.sharding,
                             context=ScoreContext(RECORDS, dev_lmask))
  t = np.asarray(t)
  math_rows, gen_rows = np.nonzero(route[:, 0])[0], np.nonzero(route[:, 1])[0]
  # each teacher alone on its rows gives the same values; the other rows are 0
  alone_same = np.asarray(same.score(dev_tokens, dev_attn, math_rows)['logprobs'])
  alone_cross = np.asarray(cross.score(dev_tokens, dev_attn, gen_rows,
                                       context=ScoreContext(RECORDS, lmask))['logprobs'])
  np.testing.assert_array_equal(t[0], alone_same)
  np.testing.assert_array_equal(t[1], alone_cross)
  assert np.all(t[0, gen_rows] == 0) and np.all(t[1, math_rows] == 0)
  # (a char inside a BPE token gets 0: the token's logprob lands on its last char)
  assert np.all((t[1, gen_rows] * lmask[gen_rows]).sum(-1) < 0)
  # tokens scored: the student's tokens for one, the teacher's own for the other
  assert same.tokens_scored == int(attn[math_rows].sum())
  assert cross.tokens_scored == int(cross.last_seq_lens[gen_rows].sum())
  assert cross.tokens_scored != int(attn[gen_rows].sum())
  # the advantage of a routed row comes from its teacher only
  s_b = jnp.asarray(-np.ones(tokens.shape, np.float32)) * dev_lmask
  adv, _, _ = token_adv.advantages(s_b, jnp.asarray(t), None, jnp.asarray([1.0, 1.0]),
                                   jnp.asarray(route), dev_lmask, None, mode='opd')
  adv = np.asarray(adv)
  np.testing.assert_allclose(adv[gen_rows], (-(-1 - t[1]) * lmask)[gen_rows], atol=1e-6)
  np.testing.assert_allclose(adv[math_rows], (-(-1 - t[0]) * lmask)[math_rows], atol=1e-6)


def test_a_cross_teacher_without_records_is_an_error(char_tok, char_teacher):
  cross = CrossTokenizerTeacher(char_teacher, student_tokenizer=char_tok,
                                teacher_tokenizer=char_tok)
  tokens, attn, _ = _student_batch(char_tok)
  with pytest.raises(ValueError, match='needs the records'):
    cross.score(tokens, attn, np.arange(2))


def test_config_opt_in_and_refusals(char_tok, bpe_teacher_path, mesh):
  from opd_jax.training import builder
  from opd_jax.training.checks import ConfigError, validate
  from test_train import load_config, with_overrides
  # Without the opt-in, today's error stays.
  spec = TeacherSpec('t', model=bpe_teacher_path)
  with pytest.raises(VocabMismatchError, match="teacher 't'"):
    builder.make_teacher(spec, student_mesh=mesh, student_tokenizer=char_tok)
  t = builder.make_teacher(TeacherSpec('t', model=bpe_teacher_path, cross_tokenizer=True),
                           student_mesh=mesh, student_tokenizer=char_tok,
                           stop_ids=[char_tok.eos_token_id])
  assert isinstance(t, CrossTokenizerTeacher) and t.teacher_stop_id == t.teacher_tokenizer.eos_token_id
  # With the student's own tokenizer and template the opt-in changes nothing.
  same = builder.make_teacher(TeacherSpec('t', model=tiny.resolve_model(CHAR_TEACHER),
                                          cross_tokenizer=True),
                              student_mesh=mesh, student_tokenizer=char_tok)
  assert isinstance(same, LocalTeacher)
  def cfg():
    return load_config('opd_cross_tokenizer', 'runlocal')
  validate(cfg())
  with pytest.raises(ConfigError, match=r'config.loss.full_vocab=.reverse_kl.*'
                                        r'teachers.teacher.cross_tokenizer'):
    validate(with_overrides(cfg(), loss__full_vocab='reverse_kl'))
  with pytest.raises(ConfigError, match='config.loss.full_vocab=.reverse_kl_exact'):
    validate(with_overrides(cfg(), loss__full_vocab='reverse_kl_exact'))
  with pytest.raises(ConfigError, match='agent.tag_to_env'):
    validate(with_overrides(cfg(), agent__tag_to_env={'math': 'tool'}))
  with pytest.raises(ConfigError, match='teachers.teacher.tokenizer'):
    validate(with_overrides(cfg(), teachers__teacher__model=None,
                            teachers__teacher__remote_url='http://127.0.0.1:1'))


def test_served_cross_tokenizer_teacher_matches_in_process(char_tok, bpe_tok, bpe_teacher_path,
                                                           mesh):
  """The client aligns: a served BPE teacher (loopback) gives the in-process cross-tokenizer
  teacher's aligned logprobs; the server's tokenizer is checked against the teacher's."""
  from opd_jax.training import builder
  from test_remote import ServerProcess
  server = ServerProcess(bpe_teacher_path, '--max-batch-size', '8', devices=1)
  try:
    spec = TeacherSpec('bpe', remote_url=server.url, cross_tokenizer=True,
                       tokenizer=bpe_teacher_path)
    remote = builder.make_teacher(spec, student_mesh=mesh, student_tokenizer=char_tok,
                                  stop_ids=[char_tok.eos_token_id])
    local = builder.make_teacher(TeacherSpec('bpe', model=bpe_teacher_path,
                                             cross_tokenizer=True),
                                 student_mesh=mesh, student_tokenizer=char_tok,
                                 stop_ids=[char_tok.eos_token_id])
    assert isinstance(remote, CrossTokenizerTeacher) and isinstance(local, CrossTokenizerTeacher)
    tokens, attn, lmask = _student_batch(char_tok)
    rows = np.asarray([0, 3, 4, 7])
    ctx = ScoreContext(RECORDS, lmask)
    got = np.asarray(remote.score(tokens, attn, rows, context=ctx)['logprobs'])
    want = np.asarray(local.score(tokens, attn, rows, context=ctx)['logprobs'])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.any(got != 0)
    np.testing.assert_array_equal(remote.last_seq_lens, local.last_seq_lens)
    # a `tokenizer` that is not the served one is refused (fingerprint check)
    with pytest.raises(VocabMismatchError):
      builder.make_teacher(TeacherSpec('bpe', remote_url=server.url, cross_tokenizer=True,
                                       tokenizer=tiny.resolve_model(CHAR_TEACHER)),
                           student_mesh=mesh, student_tokenizer=char_tok)
    remote.inner.close()
  finally:
    server.kill()


def test_scoring_flops_count_the_teachers_own_tokens(char_tok, bpe_tok, bpe_teacher_path, mesh):
  import types
  from opd_jax import train
  from opd_jax.training import flops as compute
  inner = LocalTeacher(TeacherSpec('bpe', model=bpe_teacher_path), student_mesh=mesh)
  cross = CrossTokenizerTeacher(inner, student_tokenizer=char_tok, teacher_tokenizer=bpe_tok,
                                stop_ids=[char_tok.eos_token_id])
  tokens, attn, lmask = _student_batch(char_tok)
  route = np.zeros((8, 1), np.float32)
  route[[0, 1, 5]] = 1
  pending = submit_teachers([cross], tokens, attn, route, context=ScoreContext(RECORDS, lmask))
  loop = types.SimpleNamespace(run=types.SimpleNamespace(teachers=[cross], reference=None),
                               flops=compute.FlopCounter())
  cross.last_seq_lens = None  # the counts come with the batch's handle, not the teacher's
  train._count_scoring_flops(loop, route, attn.sum(-1), pending)  # last call (pipelined)
  own = pending.own_lens['bpe'][[0, 1, 5]]
  assert loop.flops.totals['scoring/bpe'] == compute.score_flops(inner.cfg, own)
  assert compute.score_flops(inner.cfg, own) != compute.score_flops(inner.cfg,
                                                                    attn.sum(-1)[[0, 1, 5]])
  assert cross.tokens_scored == int(own.sum())


def test_a_workdir_from_before_the_field_resumes(tmp_path):
  import json
  from opd_jax.training.checks import ConfigError, check_resume
  from test_train import load_config, with_overrides
  config = load_config('opd_single_teacher', 'runlocal')
  check_resume(config, str(tmp_path), resuming=False)
  path = tmp_path / 'config.json'
  old = json.loads(path.read_text())
  for t in old['teachers'].values():  # as written before cross_tokenizer existed
    del t['cross_tokenizer'], t['tokenizer']
  path.write_text(json.dumps(old))
  check_resume(config, str(tmp_path), resuming=True)  # the defaults: same run
  path.write_text(json.dumps(old))
  with pytest.raises(ConfigError, match='teachers.teacher.cross_tokenizer'):
    check_resume(with_overrides(load_config('opd_single_teacher', 'runlocal'),
                                teachers__teacher__cross_tokenizer=True),
                 str(tmp_path), resuming=True)


def test_byte_level_offsets_match_prefix_decoding_on_multibyte_text():
  # The linear byte-level path against the definition (decode every prefix), on text with
  # 2-, 3- and 4-byte characters that a BPE trained here cuts mid-character.
  import random
  rng = random.Random(0)
  alphabet = 'abcé中文🙂 12+=\nxyzñ'
  tok = tiny.build_bpe_tokenizer(400, corpus=[''.join(rng.choice(alphabet[:12]) for _ in range(40))
                                               for _ in range(300)])
  mid_char = 0
  for _ in range(40):
    text = ''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
    ids = tok(text, add_special_tokens=False)['input_ids']
    if rng.random() < 0.3:  # a special token inside the text
      ids, text = ids + [tok.eos_token_id], text + tok.eos_token
    by_prefix = np.maximum.accumulate([align._common_prefix_len(align.decode(tok, ids[:k + 1]),
                                                                text) for k in range(len(ids))])
    fast = align._byte_level_ends(tok, ids, text)
    assert fast is not None
    np.testing.assert_array_equal(fast, by_prefix)
    np.testing.assert_array_equal(align.end_offsets(tok, ids, text), by_prefix)
    mid_char += any('\ufffd' in align.decode(tok, [i]) for i in ids)
  assert mid_char > 10
  assert align._byte_level_ends(tiny.build_char_tokenizer(), [5, 6], 'ab') is None
