"""Multi-turn (agentic) rollouts (opd_jax/rollout/multiturn.py, opd_jax/envs/): continuing from the
KV cache equals re-prefilling the whole context, observation tokens never enter the loss or
the KL metrics, a failing tool or environment ends only its own episode, the environments
themselves, config errors, and the :runlocal recipe end to end."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import envs as envs_lib
from opd_jax.rollout import multiturn
from opd_jax.training import episodes
from opd_jax.objectives import advantages as token_adv
from opd_jax.training import batches as steps
from opd_jax.models import tiny
from opd_jax import sharding as shd
from opd_jax import data as data_lib
from opd_jax.training.builder import ConfigError
from opd_jax.models import load_pretrained
from opd_jax.teachers.local import (LocalTeacher, Ready, TeacherSpec, route_matrix,
                                    score_teachers)
from opd_jax.training.update import (LossSpec, UpdateBatch, make_optimizer, make_train_state,
                                     make_update_fn)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDENT = 'tiny:qwen3:hidden_size=32,num_layers=2,num_heads=2,num_kv_heads=1,seed=0'
TEACHER = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=1'


@pytest.fixture(scope='module')
def student():
  import transformers
  path = tiny.resolve_model(STUDENT)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  graphdef, params = nnx.split(load_pretrained(path))
  encoder = data_lib.PromptEncoder(tok, max_prompt_len=256)
  return graphdef, params, tok, encoder


def _bias(tok, strength=2.5):
  """Turns end early sometimes (the stop token) and often contain a digit (a guess)."""
  eos = tok.eos_token_id
  digits = jnp.asarray([tok.convert_tokens_to_ids(str(d)) for d in range(10)])

  def fn(logits_BxV):
    return logits_BxV.at[:, eos].add(strength).at[:, digits].add(strength)
  return fn


def _guess_records(n):
  return [data_lib.Record(id=f'g{i}', tag='guess', ground_truth=str(1 + i % 9),
                          messages=[{'role': 'user', 'content': 'Guess a digit.' + ' ok' * i}])
          for i in range(n)]


def _sampler(student, budgets, tag_to_env, **kw):
  graphdef, _, tok, encoder = student
  return multiturn.MultiTurnSampler(graphdef, tokenizer=tok, encoder=encoder,
                                    stop_ids=(tok.eos_token_id,), tag_to_env=tag_to_env,
                                    budgets=budgets, logits_fn=_bias(tok), **kw)


BUDGETS = multiturn.Budgets(max_turns=4, max_tokens_per_turn=6, max_episode_tokens=96,
                            max_obs_tokens=40)


@pytest.fixture(scope='module')
def guess_episodes(student):
  _, params, _, _ = student
  mt = _sampler(student, BUDGETS, {'guess': 'guess'})
  records = _guess_records(6)
  return mt, records, mt(params, records, jax.random.key(3), temperature=0.8)


def test_cache_continuation_equals_reprefill(student, guess_episodes):
  graphdef, params, tok, _ = student
  mt, records, ep = guess_episodes
  assert ep.turns.max() >= 3 and (ep.turns >= 2).all(), ep.turns
  lengths = set(ep.student_tokens.tolist())
  assert len(lengths) > 1  # rows' turns differ: the cache holds gaps the rows skip
  assert ep.env_tokens.min() > 0
  tokens, attn, lmask, s_b = ep.host_arrays()
  # Re-prefill: one uncached forward over each row's whole interleaved sequence.
  model = nnx.merge(graphdef, params)
  logits = _bias(tok)(model(jnp.asarray(tokens), jnp.asarray(attn)).reshape(
      -1, model.cfg.vocab_size)).reshape(tokens.shape + (-1,))
  logp = jax.nn.log_softmax(logits / 0.8, axis=-1)
  ref = np.asarray(jnp.take_along_axis(logp[:, :-1], jnp.asarray(tokens)[:, 1:, None], -1)[..., 0])
  m = lmask[:, 1:] > 0
  assert m.sum() == ep.student_tokens.sum()
  np.testing.assert_allclose(s_b[:, 1:][m], ref[m], atol=1e-5, rtol=0)
  assert (s_b[lmask == 0] == 0).all()  # behaviour logprobs only for student tokens
  # Observations come after every turn but the last, wrapped by the chat template.
  for i in range(len(records)):
    env_text = tok.decode(tokens[i][ep.env_mask[i] > 0])
    assert env_text.count('<|im_start|>user\n') == ep.turns[i] - 1, env_text
    assert env_text.count('<|im_start|>assistant\n') == ep.turns[i] - 1, env_text


def test_env_tokens_never_enter_loss_or_kl(student, guess_episodes):
  """A teacher that gives every observation token −inf: advantages, KL metrics and the
  update's loss are finite and the same as with the plain teacher."""
  graphdef, params, _, _ = student
  _, records, ep = guess_episodes
  env_mask = jnp.asarray(ep.env_mask > 0)
  assert int(env_mask.sum()) > 0
  spec = TeacherSpec(name='teacher', model=tiny.resolve_model(TEACHER))
  mesh = shd.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  plain = LocalTeacher(spec, student_mesh=mesh)

  class NegInfOnEnv:
    name, spec, cfg, top_k = 'teacher', plain.spec, plain.cfg, 0
    tokens_scored = rows_forwarded = 0

    def score(self, tokens, mask, rows, *, out_sharding=None):
      out = plain.score(tokens, mask, rows, out_sharding=out_sharding)
      return dict(out, logprobs=jnp.where(env_mask, -jnp.inf, out['logprobs']))

    def submit(self, tokens, mask, rows, *, out_sharding=None):
      return Ready(self.score(tokens, mask, rows, out_sharding=out_sharding))

  tokens, attn, lmask, s_b = ep.arrays(mesh)
  tags = [r.tag for r in records]
  route = route_matrix(tags, [spec])
  coef = jnp.ones((1,), jnp.float32)
  tx, schedule = make_optimizer(_optim(), 10)
  loss = LossSpec(kind='pg', temperature=0.8)
  update = make_update_fn(graphdef, tx, schedule, loss)
  results = []
  for teacher in (plain, NegInfOnEnv()):
    t, _ = score_teachers([teacher], tokens, attn, route, count=False,
                          out_sharding=tokens.sharding)
    adv, kl_sum, kl_cnt = token_adv.advantages(s_b, t, None, coef, jnp.asarray(route), lmask, None,
                                           mode='opd')
    kl = steps.kl_metrics(np.asarray(kl_sum), np.asarray(kl_cnt), tags, ['teacher'])
    k3 = token_adv.k3_sum(s_b, t, jnp.asarray(route), lmask)
    state = make_train_state(jax.tree.map(jnp.copy, params), tx)
    _, m = update(state, UpdateBatch(tokens, attn, lmask, behaviour_logprobs=s_b,
                                     advantages=adv))
    results.append((t, np.asarray(adv), kl, np.asarray(k3), float(m['loss']),
                    float(m['grad_norm']), float(np.asarray(kl_cnt).sum())))
  (t0, a0, kl0, k30, l0, g0, c0), (t1, a1, kl1, k31, l1, g1, c1) = results
  assert np.isneginf(np.asarray(t1)[0][np.asarray(env_mask)]).all()
  assert np.isfinite(a1).all() and np.isfinite(l1) and np.isfinite(g1)
  assert c1 == c0 == float(ep.student_tokens.sum())  # KL counts student tokens only
  np.testing.assert_array_equal(a1, a0)
  np.testing.assert_array_equal(k31, k30)
  assert kl1 == kl0 and np.isfinite(list(kl1.values())).all()
  assert l1 == l0 and g1 == g0


def _optim():
  from opd_jax.config_lib import base_config
  return base_config().optim


@envs_lib.register_env('test_scripted_tool')
class ScriptedTool(envs_lib.ENVS['tool']):
  """The tool environment, fed a scripted turn instead of what the student wrote."""

  def reset(self, record):
    self.script = list(record['script'])
    if record['id'] == 'bad_reset':
      raise KeyError('no such puzzle')
    return super().reset(record)

  def step(self, student_text):
    if self.script[0] == 'RAISE':
      raise RuntimeError('the environment broke')
    return super().step(self.script.pop(0))


def test_tool_error_or_env_exception_ends_only_that_episode(student):
  _, params, tok, _ = student
  scripts = {'ok': ['<calc>6*7</calc>', 'so <answer>42</answer>'],
             'tool_error': ['<calc>1/0</calc>', '<answer>0</answer>'],
             'env_error': ['<calc>2+2</calc>', 'RAISE'],
             'bad_reset': ['<answer>1</answer>'],
             'wrong': ['<python>print(6*6)</python>', '<answer>36</answer>']}
  records = [data_lib.Record(id=k, tag='tool', ground_truth='42', extra={'script': v},
                             messages=[{'role': 'user', 'content': 'What is 6*7?'}])
             for k, v in scripts.items()]
  records.append(_guess_records(1)[0])
  mt = _sampler(student, BUDGETS, {'tool': 'test_scripted_tool', 'guess': 'guess'})
  ep = mt(params, records, jax.random.key(0))
  by = {r.id: i for i, r in enumerate(records)}
  assert ep.end[by['ok']] == 'env' and ep.reward[by['ok']] == 1.0 and ep.turns[by['ok']] == 2
  assert ep.end[by['wrong']] == 'env' and ep.reward[by['wrong']] == 0.0
  assert ep.end[by['tool_error']] == 'tool_error' and ep.turns[by['tool_error']] == 1
  assert 'ZeroDivisionError' in ep.error[by['tool_error']]
  assert ep.end[by['env_error']] == 'env_error' and ep.turns[by['env_error']] == 2
  assert 'the environment broke' in ep.error[by['env_error']]
  assert ep.end[by['bad_reset']] == 'env_error' and ep.turns[by['bad_reset']] == 0
  assert ep.student_tokens[by['bad_reset']] == 0 and ep.attn[by['bad_reset']].sum() == 0
  assert ep.turns[by['g0']] >= 2  # the rest of the batch went on
  assert ep.error[by['ok']] is None and ep.error[by['g0']] is None
  # The tool's result is in the context (outside the loss); the metrics count the errors.
  ok = by['ok']
  env_text = tok.decode(ep.tokens[ok][(ep.attn[ok] > 0) & (ep.student_mask[ok] == 0)])
  assert '<result>42</result>' in env_text
  wrong_text = tok.decode(ep.tokens[by['wrong']][ep.attn[by['wrong']] > 0])
  assert '<result>36</result>' in wrong_text
  m = ep.metrics([r.tag for r in records])
  assert m['agent/tool_errors'] == 1 and m['agent/env_errors'] == 2
  assert m['agent/episode_reward/tool'] == pytest.approx(1 / 5)


def test_budgets_hold(guess_episodes):
  _, records, ep = guess_episodes
  b = BUDGETS
  assert ep.turns.max() <= b.max_turns and (ep.attn.sum(-1) <= b.max_episode_tokens).all()
  for i in range(len(records)):  # each run of student tokens is one turn, within its budget
    runs = np.split(ep.student_mask[i], np.nonzero(np.diff(ep.student_mask[i]))[0] + 1)
    turns = [len(r) for r in runs if r[0] == 1]
    assert len(turns) == ep.turns[i] and max(turns) <= b.max_tokens_per_turn
    envs = [len(r) for r in runs[:-1] if r[0] == 0]  # observations (not the right padding)
    assert all(n <= b.max_obs_tokens for n in envs)
  assert set(ep.end) <= {'env', 'max_turns', 'context'}


def test_environments():
  tool = envs_lib.make_env('tool', errors_end_episode=False)
  rec = {'id': 'r', 'ground_truth': '12', 'messages': [{'role': 'user', 'content': 'What?'}]}
  assert tool.reset(rec) == 'What?'
  assert tool.step('<calc>3*4</calc>') == ('<result>12</result>', False, 0.0)
  obs, done, r = tool.step('<python>import os; os.system("ls")</python>')
  assert obs.startswith('<error>') and not done  # the sandbox refuses; answered, not fatal
  assert tool.step('hmm') == ('no tool call or answer', False, 0.0)
  assert tool.step('<answer>12.0</answer>') == (None, True, 1.0)
  strict = envs_lib.make_env('tool')
  strict.reset(rec)
  with pytest.raises(envs_lib.ToolError, match='NameError'):
    strict.step('<calc>undefined_name</calc>')
  game = envs_lib.make_env('guess', max_guesses=3)
  game.reset({'id': 'g', 'ground_truth': '7', 'messages': [{'role': 'user', 'content': 'x'}]})
  assert [game.step(t)[0] for t in ('3', 'no idea', '9')] == ['higher', 'say a number', 'lower']
  assert game.step('8') == (None, True, 0.0)  # the third guess, wrong
  with pytest.raises(ValueError, match="integer 'ground_truth'"):
    envs_lib.make_env('guess').reset({'id': 'g', 'ground_truth': 'seven'})
  with pytest.raises(ValueError, match='unknown environment'):
    envs_lib.make_env('nope')
  assert isinstance(tool, envs_lib.Environment)


def _config(**agent):
  sys.path.insert(0, ROOT)
  try:
    from configs import opd_agentic
    c = opd_agentic.get_config('runlocal')
  finally:
    sys.path.remove(ROOT)
  c.unlock()
  for k, v in agent.items():
    c.agent[k] = v
  c.lock()
  return c


@pytest.mark.parametrize('agent,match', [
    (dict(tag_to_env={'tool': 'calculator'}), r"config.agent.tag_to_env\['tool'\]"),
    (dict(env_kwargs={'tool': {'speed': 3}}), 'config.agent.env_kwargs.tool'),
    (dict(max_turns=0), 'config.agent.max_turns'),
    (dict(max_tokens_per_turn=500), 'config.agent.max_tokens_per_turn'),
])
def test_config_errors_name_the_field(agent, match):
  with pytest.raises(ConfigError, match=match):
    episodes.validate_config(_config(**agent))


@pytest.mark.e2e
def test_runlocal_recipe_runs_two_steps_of_multi_turn_episodes(tmp_path):
  from opd_jax.train import run
  result = run(_config(), str(tmp_path))
  h = result['history']
  assert result['step'] == 2 and os.path.exists(tmp_path / 'checkpoints' / '2')
  assert all(v >= 2 for _, v in h['agent/turns']), h['agent/turns']
  for key in ('loss', 'opd/reverse_kl/teacher', 'agent/student_tokens', 'agent/env_tokens',
              'agent/episode_reward', 'agent/tool_errors'):
    assert key in h and all(np.isfinite(v) for _, v in h[key]), key
  assert all(v < 1e-4 for _, v in h['is/sampler_logprob_gap'])  # cache == update's forward
  assert 'eval/accuracy/tool' in result['final'] and 'eval/agent/turns' in result['final']


def test_replay_lays_out_transcripts_as_rollouts_do(student):
  """SFT transcripts (`multiturn.replay`): the real tool result between the turns, the
  stop token closing each student turn, the loss mask on the student turns only."""
  _, _, tok, _ = student
  mt = _sampler(student, BUDGETS, {'tool': 'tool'})
  records = [data_lib.Record(id=f'r{a}', tag='tool', ground_truth=str(a * 7),
                             messages=[{'role': 'user', 'content': f'{a}*7=?'}])
             for a in (6, 12)]
  ep = multiturn.replay(mt, records, [[f'<calc>{a}*7</calc>', f'<answer>{a * 7}</answer>']
                                      for a in (6, 12)])
  assert (ep.reward == 1).all() and (ep.turns == 2).all() and ep.end == ['env', 'env']
  for i, a in enumerate((6, 12)):
    student_text = tok.decode(ep.tokens[i][ep.student_mask[i] > 0])
    assert student_text == f'<calc>{a}*7</calc><|im_end|><answer>{a * 7}</answer><|im_end|>'
    env_text = tok.decode(ep.tokens[i][ep.env_mask[i][ep.prompt_mask.shape[1]:] > 0])
    assert env_text == f'\n<|im_start|>user\n<result>{a * 7}</result><|im_end|>\n' \
                       '<|im_start|>assistant\n'


# ------------------------------------------------------------------ the engine protocol
def test_episode_engine_returns_the_episodes_as_one_rollout_batch(student):
  """EpisodeEngine: the same episodes as the sampler called directly (same key), as [B, T]
  arrays, env rewards on rows with an environment and NaN elsewhere, final texts, FLOPs
  from the token counts."""
  from opd_jax.rollout.engine import EpisodeEngine
  _, params, _, _ = student
  mt = _sampler(student, BUDGETS, {'guess': 'guess'})
  plain = data_lib.Record(id='p0', tag='plain', ground_truth='1',
                          messages=[{'role': 'user', 'content': 'Say one digit.'}])
  records = _guess_records(3) + [plain]
  seen = []

  def flops_fn(prompt, later):
    seen.append((np.asarray(prompt).tolist(), np.asarray(later).tolist()))
    return 7
  engine = EpisodeEngine(mt, temperature=0.8, flops_fn=flops_fn)
  batch = engine(params, records, jax.random.key(3))
  ep = mt(params, records, jax.random.key(3), temperature=0.8)
  for got, want in zip((batch.tokens, batch.attention_mask, batch.loss_mask,
                        batch.behaviour_logprobs), ep.host_arrays()):
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(batch.env_rewards[:3], ep.reward[:3])
  assert np.isnan(batch.env_rewards[3])
  assert batch.texts == ep.final_texts()
  assert batch.flops == 7 and seen == [(ep.prompt_mask.sum(-1).tolist(),
                                        ep.attn.sum(-1).tolist())]
  assert batch.metrics == ep.metrics([r.tag for r in records])


def _drive(calls):
  """Compiles an engine's abstract calls in order, as the AOT check does; returns names."""
  names, out = [], None
  while True:
    try:
      call = calls.send(out)
    except StopIteration:
      return names
    compiled = call.fn.lower(*call.args, **call.kwargs).compile()
    names.append(call.name)
    out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                       compiled.out_info)


def test_every_engine_lists_its_jitted_calls_on_abstract_inputs(student):
  """abstract_calls of the static sampler, the continuous batcher and the episode engine
  compile on abstract inputs (what tools/aot.py compiles), each in its order."""
  from opd_jax.rollout.decode import SamplingParams
  from opd_jax.rollout.engine import EpisodeEngine, SingleTurnEngine
  from opd_jax.rollout.sampler import Sampler
  graphdef, params, tok, _ = student
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  sp = SamplingParams(max_new_tokens=8, stop_ids=(tok.eos_token_id,))
  static = SingleTurnEngine(Sampler(graphdef, pad_id=0), sp)
  assert _drive(static.abstract_calls(abstract, 4, 16)) == ['prefill', 'decode']
  cont = SingleTurnEngine(Sampler(graphdef, pad_id=0, slots=2), sp)
  assert _drive(cont.abstract_calls(abstract, 4, 16)) == ['refill', 'segment', 'compact']
  episodes_engine = EpisodeEngine(multiturn.MultiTurnSampler(
      graphdef, tokenizer=None, encoder=None, stop_ids=(tok.eos_token_id,),
      tag_to_env={'guess': 'guess'}, budgets=BUDGETS, pad_id=0))
  assert _drive(episodes_engine.abstract_calls(abstract, 4, 16)) == ['prefill', 'turn',
                                                                     'observe']
  with pytest.raises(ValueError, match='only lists its abstract calls'):
    static(params, _guess_records(1), jax.random.key(0))
