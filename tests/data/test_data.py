"""Data pipeline: JSONL validation (errors name file:line:field), chat templates per tag,
prompt budgets, domain interleaving with exact resume, host slices, tokenizer checks."""

import json
import string

import numpy as np
import pytest

from opd_jax import data
from opd_jax.data import DataError, PromptEncoder, PromptSampler, Record


def _write(path, lines):
  path.write_text(''.join((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines))
  return str(path)


@pytest.fixture(scope='module')
def tok():
  from opd_jax.models.tiny import build_char_tokenizer
  return build_char_tokenizer()


def _records(domain, n, tag=None):
  return [Record(id=f'{domain}-{i}', tag=tag or domain,
                 messages=[{'role': 'user', 'content': f'{domain} question {i}'}])
          for i in range(n)]


# ---------------------------------------------------------------------------------- JSONL
def test_read_jsonl_prompt_messages_and_json_string_messages(tmp_path):
  chat = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  path = _write(tmp_path / 'a.jsonl', [
      {'id': 'p1', 'prompt': 'What is 2+2?', 'tag': 'math', 'ground_truth': '4',
       'source': 'gsm8k', 'difficulty': 3},
      '',  # blank lines are skipped
      {'id': 7, 'messages': chat, 'tag': 'chat'},
      {'id': 'm2', 'messages': json.dumps(chat), 'tag': 'code',
       'test_cases': json.dumps([{'input': '1', 'output': '2'}])},
  ])
  recs = data.read_jsonl(path)
  assert [r.id for r in recs] == ['p1', '7', 'm2']
  assert recs[0].messages == [{'role': 'user', 'content': 'What is 2+2?'}]
  assert (recs[0].ground_truth, recs[0].source, recs[0].extra) == ('4', 'gsm8k',
                                                                   {'difficulty': 3})
  assert recs[1].messages == chat and recs[2].messages == chat
  assert recs[2].test_cases == [{'input': '1', 'output': '2'}]
  assert recs[2].where == f'{path}:4'


GOOD = {'id': 'x', 'prompt': 'hello', 'tag': 't'}


@pytest.mark.parametrize('line, field, what', [
    ('{"id": "x", "prompt": "hi", ', None, 'malformed JSON'),
    ('[1, 2]', None, 'expected a JSON object'),
    ({'prompt': 'hi', 'tag': 't'}, 'id', 'missing'),
    ({'id': 1.5, 'prompt': 'hi', 'tag': 't'}, 'id', 'non-empty string or an integer'),
    ({'id': 'x', 'tag': 't'}, 'prompt', 'neither'),
    ({'id': 'x', 'prompt': 'hi', 'messages': [], 'tag': 't'}, 'prompt', 'both'),
    ({'id': 'x', 'prompt': 3, 'tag': 't'}, 'prompt', 'non-empty string'),
    ({'id': 'x', 'messages': {'role': 'user'}, 'tag': 't'}, 'messages', 'non-empty list'),
    ({'id': 'x', 'messages': '[{"role": ', 'tag': 't'}, 'messages', 'not valid JSON'),
    ({'id': 'x', 'messages': ['hi'], 'tag': 't'}, 'messages[0]', 'expected an object'),
    ({'id': 'x', 'messages': [{'role': 'user'}], 'tag': 't'}, 'messages[0].content',
     'missing'),
    ({'id': 'x', 'messages': [{'role': 'user', 'content': 5}], 'tag': 't'},
     'messages[0].content', 'expected a string, got int'),
    ({'id': 'x', 'prompt': 'hi'}, 'tag', 'missing'),
    ({'id': 'x', 'prompt': 'hi', 'tag': ['a']}, 'tag', 'non-empty string'),
    ({'id': 'x', 'prompt': 'hi', 'tag': 't', 'test_cases': 3}, 'test_cases',
     'list or an object'),
    ({'id': 'x', 'prompt': 'hi', 'tag': 't', 'source': 1}, 'source', 'expected a string'),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, line, field, what):
  path = _write(tmp_path / 'bad.jsonl', [dict(GOOD, id='ok'), '', line])
  with pytest.raises(DataError) as e:
    data.read_jsonl(path)
  msg = str(e.value)
  assert msg.startswith(f'{path}:3: '), msg
  if field is not None:
    assert f"field '{field}'" in msg, msg
  assert what in msg, msg


def test_default_tag_duplicates_and_empty_files(tmp_path):
  path = _write(tmp_path / 'a.jsonl', [{'id': 'x', 'prompt': 'hi'}])
  assert data.read_jsonl(path, default_tag='general')[0].tag == 'general'
  dup = _write(tmp_path / 'dup.jsonl', [GOOD, dict(GOOD, id='y'), GOOD])
  with pytest.raises(DataError, match=rf"dup.jsonl:3: field 'id': duplicate id 'x' "
                                      r'\(first at line 1\)'):
    data.read_jsonl(dup)
  empty = _write(tmp_path / 'empty.jsonl', ['', '  '])
  with pytest.raises(DataError, match='empty.jsonl: no records'):
    data.read_jsonl(empty)
  (tmp_path / 'latin1.jsonl').write_bytes(b'{"id": "\xe9"}\n')
  with pytest.raises(DataError, match='latin1.jsonl:1: not valid UTF-8'):
    data.read_jsonl(str(tmp_path / 'latin1.jsonl'))


def test_load_domains_groups_files_and_rejects_ids_duplicated_across_them(tmp_path):
  a = _write(tmp_path / 'math-0.jsonl', [dict(GOOD, id='a'), dict(GOOD, id='b')])
  b = _write(tmp_path / 'math-1.jsonl', [dict(GOOD, id='c')])
  c = _write(tmp_path / 'code.jsonl', [dict(GOOD, id='a')])  # same id, other domain: fine
  domains = data.load_domains({'math': str(tmp_path / 'math-*.jsonl'), 'code': c})
  assert {k: [r.id for r in v] for k, v in domains.items()} == {
      'math': ['a', 'b', 'c'], 'code': ['a']}
  assert data.load_domains({'math': [a, b]})['math'][2].where == f'{b}:1'
  with pytest.raises(DataError, match=rf"code.jsonl:1: field 'id': duplicate id 'a' in "
                                      rf"domain 'mixed' \(first at .*math-0.jsonl:1\)"):
    data.load_domains({'mixed': [a, c]})
  with pytest.raises(DataError, match='matches no files'):
    data.load_domains({'math': str(tmp_path / 'nope-*.jsonl')})


# -------------------------------------------------------------------------- templates
def test_templates_per_tag_with_fallback(tok):
  enc = PromptEncoder(tok, template='default', max_prompt_len=200,
                      tag_to_template={'math': 'qwen3_think', 'code': 'qwen3_no_think'})
  msgs = [{'role': 'user', 'content': 'Add 1 and 2.'}]
  ids = {tag: enc.encode(Record(id=tag, tag=tag, messages=msgs))
         for tag in ('math', 'code', 'chat')}
  text = {tag: tok.decode(v, skip_special_tokens=False) for tag, v in ids.items()}
  head = '<|im_start|>user\nAdd 1 and 2.<|im_end|>\n<|im_start|>assistant\n'
  assert text['math'] == head and text['chat'] == head  # thinking on: the model opens it
  assert text['code'] == head + '<think>\n\n</think>\n\n'
  assert ids['math'] != ids['code']
  assert ids['code'][-6:] == tok.convert_tokens_to_ids(['<think>', '\n', '\n', '</think>',
                                                        '\n', '\n'])
  # Special tokens come from the template text exactly once (none added by the tokenizer).
  assert ids['chat'][0] == tok.convert_tokens_to_ids('<|im_start|>')
  assert enc.encode_batch([Record(id='1', tag='code', messages=msgs)]) == [ids['code']]


def test_raw_template_and_unknown_template_names(tok):
  enc = PromptEncoder(tok, template='raw', max_prompt_len=50)
  rec = Record(id='r', tag='t', messages=[{'role': 'user', 'content': 'Q: 1+1=?'}])
  assert enc.encode(rec) == tok('Q: 1+1=?')['input_ids']
  mixed = PromptEncoder(tok, tag_to_template={'base': 'raw'}, max_prompt_len=50)
  base = Record(id='b', tag='base', messages=rec.messages)
  out = mixed.encode_batch([rec, base, rec])  # two tokenizer calls, original order kept
  assert out[1] == enc.encode(rec) and out[0] == out[2] != out[1]
  assert out[0] == PromptEncoder(tok, max_prompt_len=50).encode(rec)
  two = Record(id='r2', tag='t', messages=rec.messages * 2)
  with pytest.raises(DataError, match="template 'raw' takes a single message"):
    enc.encode(two)
  with pytest.raises(ValueError, match=r"tag_to_template\['code'\]: unknown chat template "
                                       r"'qwen9'; known: default, qwen3_think"):
    PromptEncoder(tok, tag_to_template={'code': 'qwen9'}, max_prompt_len=10)
  with pytest.raises(ValueError, match="on_too_long"):
    PromptEncoder(tok, max_prompt_len=10, on_too_long='truncate')


def test_too_long_prompts_error_or_are_skipped_and_counted(tmp_path, tok):
  path = _write(tmp_path / 'p.jsonl', [
      {'id': 'short', 'prompt': 'hi', 'tag': 'math'},
      {'id': 'long', 'prompt': 'x' * 100, 'tag': 'math'},
      {'id': 'long2', 'prompt': 'y' * 100, 'tag': 'code'},
  ])
  recs = data.read_jsonl(path)
  n_short = len(PromptEncoder(tok, max_prompt_len=10**6).encode(recs[0]))
  strict = PromptEncoder(tok, max_prompt_len=n_short)
  assert len(strict.encode(recs[0])) == n_short
  with pytest.raises(DataError) as e:
    strict.encode(recs[1])
  msg = str(e.value)
  assert msg.startswith(f'{path}:2: ') and "'long'" in msg and f'{n_short + 100 - 2} tokens' \
      in msg and f'max_prompt_len={n_short}' in msg, msg
  lenient = PromptEncoder(tok, max_prompt_len=n_short, on_too_long='skip')
  out = lenient.encode_batch(recs)
  assert out[0] is not None and out[1:] == [None, None]
  assert dict(lenient.skipped) == {'math': 1, 'code': 1}
  assert lenient.drop_too_long(recs) == recs[:1]  # at load time: every batch stays full
  assert dict(lenient.skipped) == {'math': 2, 'code': 2}


def test_pad_prompts():
  ids, mask = data.pad_prompts([[5, 6, 7], [8]], pad_id=0)
  np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  assert ids.dtype == mask.dtype == np.int32
  ids, mask = data.pad_prompts([[5, 6], [8]], pad_id=9, length=4, side='right')
  np.testing.assert_array_equal(ids, [[5, 6, 9, 9], [8, 9, 9, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 0, 0, 0]])
  with pytest.raises(ValueError, match='does not fit length=1'):
    data.pad_prompts([[1, 2]], pad_id=0, length=1)


# ----------------------------------------------------------------------- interleaving
def test_interleave_frequencies_match_probabilities():
  domains = {'math': _records('math', 7), 'code': _records('code', 5),
             'chat': _records('chat', 11)}
  probs = {'math': 0.6, 'code': 0.3, 'chat': 0.1}
  sampler = PromptSampler(domains, interleave={k: 10 * v for k, v in probs.items()}, seed=3)
  assert sampler.probabilities == pytest.approx(probs)
  draws = [r.tag for _ in range(200) for r in sampler.next_batch(64)]
  n = len(draws)
  for name, p in probs.items():
    # Binomial frequency: 5 standard deviations (the seed is fixed, so this never flakes).
    assert abs(draws.count(name) / n - p) < 5 * np.sqrt(p * (1 - p) / n), name
  # Missing interleave: proportional to domain size.
  sizes = PromptSampler(domains, interleave=None, seed=0).probabilities
  assert sizes == pytest.approx({'math': 7 / 23, 'code': 5 / 23, 'chat': 11 / 23})


def test_each_epoch_is_a_fresh_permutation_of_the_domain():
  sampler = PromptSampler({'a': _records('a', 6)}, seed=0)
  epochs = [[r.id for r in sampler.next_batch(6)] for _ in range(3)]
  for e in epochs:
    assert sorted(e) == sorted(r.id for r in _records('a', 6))
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
  assert sampler.state()['domains']['a'] | {'fingerprint': 0} == {
      'epoch': 2, 'cursor': 6, 'size': 6, 'fingerprint': 0}


@pytest.mark.parametrize('interleave, match', [
    ({'math': 1, 'nope': 1}, r"unknown domains \['nope'\]"),
    ({'math': 1}, r"no weight for domains \['code'\]"),
    ({'math': -1, 'code': 2}, 'non-negative'),
    ({'math': 0, 'code': 0}, 'not all zero'),
])
def test_bad_interleave(interleave, match):
  with pytest.raises(ValueError, match=match):
    PromptSampler({'math': _records('m', 2), 'code': _records('c', 2)},
                  interleave=interleave, seed=0)


def test_resume_continues_with_exactly_the_same_batches():
  def make():
    return PromptSampler({'math': _records('math', 5), 'code': _records('code', 3)},
                         interleave={'math': 0.7, 'code': 0.3}, seed=11)
  ids = lambda batches: [[r.id for r in b] for b in batches]
  uninterrupted = make()
  first = [uninterrupted.next_batch(4) for _ in range(5)]
  state = json.loads(json.dumps(uninterrupted.state()))  # as saved in a checkpoint
  rest = [uninterrupted.next_batch(4) for _ in range(10)]  # crosses several epochs
  resumed = make()
  resumed.restore(state)
  assert ids(resumed.next_batch(4) for _ in range(10)) == ids(rest)
  assert ids(first) != ids(rest[:5])
  changed = PromptSampler({'math': _records('math', 6), 'code': _records('code', 3)},
                          interleave={'math': 0.7, 'code': 0.3}, seed=11)
  with pytest.raises(ValueError, match="domain 'math': its records changed"):
    changed.restore(state)


def test_host_slices_concatenate_to_the_global_batch():
  domains = {'math': _records('math', 9), 'code': _records('code', 4)}
  hosts = [PromptSampler(domains, seed=5) for _ in range(2)]  # one per process
  for _ in range(3):
    batches = [h.next_batch(6) for h in hosts]
    assert batches[0] == batches[1]  # every host draws the same global batch
    slices = [data.host_slice(batches[p], p, 2) for p in range(2)]
    assert len(slices[0]) == 3 and slices[0] + slices[1] == batches[0]
  with pytest.raises(ValueError, match='6 rows does not divide over 4 processes'):
    data.host_slice(batches[0], 0, 4)
  with pytest.raises(ValueError, match=r'process_index 2 is not in \[0, 2\)'):
    data.host_slice(batches[0], 2, 2)


# ------------------------------------------------------------------------- tokenizers
def test_tokenizer_mismatch_names_the_first_differing_token():
  from opd_jax.models.tiny import DEFAULT_CHARS, SPECIAL_TOKENS, build_char_tokenizer
  student = build_char_tokenizer()
  data.check_tokenizers_match(student, build_char_tokenizer())  # identical: fine
  swapped = string.ascii_letters + string.digits + string.punctuation + ' \n'
  with pytest.raises(data.VocabMismatchError) as e:
    data.check_tokenizers_match(student, build_char_tokenizer(swapped), teacher_name='math')
  first = len(SPECIAL_TOKENS)  # special tokens agree; the first character differs
  assert f'token id {first}: student has {DEFAULT_CHARS[0]!r}, math has ' \
         f'{swapped[0]!r}' in str(e.value), str(e.value)
  longer = build_char_tokenizer(vocab_size=len(student) + 3)
  with pytest.raises(data.VocabMismatchError,
                     match=rf"token id {len(student)} \('<\|extra_0\|>'\) exists only in the "
                           'teacher tokenizer, which is longer'):
    data.check_tokenizers_match(student, longer)
