"""Continuous batching (`Sampler(..., slots=R)`, opd_jax/rollout/continuous.py): the same draws as
the static sampler for the same per-request keys, stop handling, refill order, one response
per request, cache compaction, and sharded slots equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.models import load_pretrained
from opd_jax.rollout.decode import DecodeState, SamplingParams
from opd_jax.rollout.sampler import Sampler

STOP = 5
N = 16
# 13 prompts of 1..15 tokens: more requests than slots, different prompt lengths.
PROMPTS = [list(np.random.RandomState(i).randint(6, 120, 1 + (7 * i) % 15)) for i in range(13)]


def stop_bias(p_stop):
  """logits_fn giving the stop token probability p_stop at every step (before tempering)."""
  log_odds = float(np.log(p_stop / (1 - p_stop)))

  def fn(logits_BxV):
    others = jax.nn.logsumexp(logits_BxV.at[:, STOP].set(-jnp.inf), axis=-1)
    return logits_BxV.at[:, STOP].set(others + log_odds)
  return fn


@pytest.fixture(scope='module')
def qwen3(hf_checkpoints):
  graphdef, params = nnx.split(load_pretrained(hf_checkpoints['qwen3']))
  bias = stop_bias(0.1)
  static = Sampler(graphdef, pad_id=0, logits_fn=bias)
  # slack 3: the write slot runs out of room often, so compaction is exercised.
  cont = Sampler(graphdef, pad_id=0, logits_fn=bias, slots=4, refill_min=1, cache_slack=3)
  return graphdef, params, static, cont


def _arrays(out):
  return np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)


def _assert_same(a, b):
  ta, ma, la = _arrays(a)
  tb, mb, lb = _arrays(b)
  np.testing.assert_array_equal(ma, mb)
  np.testing.assert_array_equal(ta, tb)
  np.testing.assert_allclose(la, lb, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(a.prompt_ids), np.asarray(b.prompt_ids))
  np.testing.assert_array_equal(np.asarray(a.prompt_mask), np.asarray(b.prompt_mask))


@pytest.mark.parametrize('sp', [
    SamplingParams(max_new_tokens=N, stop_ids=(STOP,)),
    SamplingParams(max_new_tokens=N, temperature=0.7, top_k=20, top_p=0.9, stop_ids=(STOP,)),
], ids=['t1', 't0.7_topk_topp'])
def test_continuous_equals_static(qwen3, sp):
  _, params, static, cont = qwen3
  key = jax.random.key(11)
  ref = static(params, PROMPTS, key, sp)
  out = cont(params, PROMPTS, key, sp)
  _assert_same(ref, out)
  stats = cont.continuous.last_stats
  assert stats['slots'] == 4 and stats['refills'] > 3 and stats['compactions'] > 0, stats
  lengths = np.asarray(out.mask).sum(1)
  assert (lengths < N).any() and (lengths == N).any(), lengths  # early stops and budget runs
  # continuous decodes fewer row-steps than the static batch (13 rows x its longest)
  assert 4 * int(out.decode_steps) < len(PROMPTS) * int(ref.decode_steps)


def test_greedy_continuous_equals_static(qwen3):
  graphdef, params, _, _ = qwen3
  greedy = SamplingParams(max_new_tokens=N, temperature=0.0)
  static = Sampler(graphdef, pad_id=0)
  free = np.asarray(static(params, PROMPTS, jax.random.key(0), greedy).tokens)
  stop = int(np.bincount(free[:, :8].ravel()).argmax())  # a token many rows emit early
  sp = SamplingParams(max_new_tokens=N, temperature=0.0, stop_ids=(stop,))
  cont = Sampler(graphdef, pad_id=0, slots=4, refill_min=2)
  ref = static(params, PROMPTS, jax.random.key(0), sp)
  out = cont(params, PROMPTS, jax.random.key(5), sp)  # greedy: the key does not matter
  _assert_same(ref, out)
  assert len(set(np.asarray(out.mask).sum(1).tolist())) > 1


def test_stops_refill_order_and_one_response_per_request(qwen3):
  _, params, _, cont = qwen3
  sp = SamplingParams(max_new_tokens=N, stop_ids=(STOP,))
  out = cont(params, PROMPTS, jax.random.key(3), sp)
  tokens, mask, logps = _arrays(out)
  assert tokens.shape == (len(PROMPTS), N)
  for q in range(len(PROMPTS)):
    n = int(mask[q].sum())
    assert n >= 1 and np.all(mask[q, :n] == 1) and np.all(mask[q, n:] == 0)  # a prefix
    stops = np.nonzero(tokens[q, :n] == STOP)[0]
    if n < N:  # stopped early: at its first stop token, which is in the response
      assert stops.tolist() == [n - 1], (q, tokens[q])
    else:
      assert len(stops) <= 1 and (not len(stops) or stops[0] == N - 1)
    assert np.all(tokens[q, n:] == 0) and np.all(logps[q, n:] == 0)
    assert np.all(logps[q, :n] < 0)
  placed = cont.continuous.last_stats['placements']
  reqs = [q for _, _, q in placed]
  assert reqs == list(range(len(PROMPTS)))  # each request placed once, in order (FIFO)
  assert [s for r, s, _ in placed if r == 0] == [0, 1, 2, 3]  # the first R fill the slots
  # a slot is refilled only after its request finished: the slot's requests in order
  for s in range(4):
    mine = [q for _, slot, q in placed if slot == s]
    assert mine == sorted(mine)


def test_draws_do_not_depend_on_neighbours_or_slots(qwen3):
  """A request's sample is a function of (call key, its index, its prompt): changing the
  other prompts, or the slot count, changes nothing for it."""
  graphdef, params, _, cont = qwen3
  sp = SamplingParams(max_new_tokens=N, stop_ids=(STOP,))
  key = jax.random.key(4)
  out = cont(params, PROMPTS, key, sp)
  other = [p if i % 3 == 0 else [7] * (1 + i) for i, p in enumerate(PROMPTS)]
  cont6 = Sampler(graphdef, pad_id=0, logits_fn=stop_bias(0.1), slots=6, refill_min=2)
  out2 = cont6(params, other, key, sp)
  a, b = _arrays(out), _arrays(out2)
  keep = np.arange(len(PROMPTS)) % 3 == 0
  np.testing.assert_array_equal(a[0][keep], b[0][keep])
  np.testing.assert_allclose(a[2][keep], b[2][keep], atol=1e-5, rtol=0)


def test_few_prompts_use_static_path_and_state_is_a_pytree(qwen3):
  _, params, static, cont = qwen3
  sp = SamplingParams(max_new_tokens=4, stop_ids=(STOP,))
  cont.continuous.last_stats = {}
  _assert_same(static(params, PROMPTS[:3], jax.random.key(1), sp),
               cont(params, PROMPTS[:3], jax.random.key(1), sp))
  assert cont.continuous.last_stats == {}  # 3 prompts <= 4 slots: the static path ran
  st = DecodeState(jnp.int32(0), {'k': [], 'v': []}, *([jnp.zeros(2)] * 5))
  assert len(jax.tree.leaves(st)) == 6
  with pytest.raises(ValueError, match='slots'):
    Sampler(qwen3[0], slots=-1)


def test_sharded_slots_equal_single_device(hf_checkpoints):
  path = hf_checkpoints['llama']
  prompts = (PROMPTS + PROMPTS)[:16]
  sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, stop_ids=(STOP,))
  bias = stop_bias(0.15)
  graphdef, params = nnx.split(load_pretrained(path))
  ref = Sampler(graphdef, logits_fn=bias)(params, prompts, jax.random.key(7), sp)

  mesh = shd.make_mesh({'data': 2, 'fsdp': 4})
  graphdef, params = nnx.split(load_pretrained(path, mesh=mesh))
  sampler = Sampler(graphdef, mesh=mesh, logits_fn=bias, slots=8, refill_min=2)
  out = sampler(params, prompts, jax.random.key(7), sp)
  assert sampler.continuous.last_stats['refills'] > 1  # 16 requests through 8 slots
  assert out.tokens.sharding.spec[0] == ('data', 'fsdp')
  _assert_same(ref, out)
