"""The jitted sampler: logprob consistency with scoring, greedy parity with transformers,
sampling statistics, per-request keys, truncation, stop tokens, bucketing and sharded
determinism. (Continuous batching: tests/rollout/test_continuous.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.models import load_pretrained
from opd_jax.buckets import batch_bucket, bucket
from opd_jax.rollout.decode import SamplingParams
from opd_jax.rollout.sampler import Sampler
from opd_jax.teachers.scoring import make_score_fn

PROMPTS = [[5, 17, 3, 99, 42, 8, 1], [77, 12], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 2], [64]]


@pytest.fixture(scope='module')
def qwen3(hf_checkpoints):
  model = load_pretrained(hf_checkpoints['qwen3'])
  graphdef, params = nnx.split(model)
  return model, graphdef, params, Sampler(graphdef, pad_id=0)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_sampler_logprobs_equal_scoring(qwen3, temperature):
  _, graphdef, params, sampler = qwen3
  out = sampler(params, PROMPTS, jax.random.key(0),
                SamplingParams(max_new_tokens=20, temperature=temperature))
  ids, mask = out.sequences()
  scored = make_score_fn(graphdef, temperature=temperature)(params, ids, mask)['logprobs']
  p = out.prompt_ids.shape[1]
  resp = np.asarray(out.mask).astype(bool)
  diff = np.abs(np.asarray(scored)[:, p:] - np.asarray(out.logprobs))[resp].max()
  assert resp.sum() == 4 * 20 and diff <= 1e-4, diff


def test_greedy_matches_transformers_generate(qwen3, hf_checkpoints):
  import torch
  import transformers
  _, _, params, sampler = qwen3
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoints['qwen3']).eval()
  out = sampler(params, PROMPTS, jax.random.key(0),
                SamplingParams(max_new_tokens=24, temperature=0.0))
  ours = np.asarray(out.tokens)
  for i, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                        min_new_tokens=24, pad_token_id=0)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(ours[i], ref, err_msg=f'prompt {i}')


def test_first_token_distribution_matches_softmax(qwen3):
  """4,096 draws of the first token; each token's frequency must lie within 5 standard
  errors (+0.002) of its softmax probability, and the total variation below 0.06."""
  model, _, params, sampler = qwen3
  n = 4096
  prompt = PROMPTS[0]
  out = sampler(params, [prompt] * n, jax.random.key(1), SamplingParams(max_new_tokens=1))
  first = np.asarray(out.tokens)[:, 0]
  probs = _softmax(np.asarray(model(jnp.asarray([prompt])))[0, -1].astype(np.float64))
  freq = np.bincount(first, minlength=probs.size) / n
  tol = 5 * np.sqrt(probs * (1 - probs) / n) + 2e-3
  assert np.all(np.abs(freq - probs) <= tol), np.abs(freq - probs).max()
  assert 0.5 * np.abs(freq - probs).sum() < 0.06
  # and the reported logprob is the softmax's
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log(probs[first]), atol=1e-4)


def test_draws_use_per_request_keys(qwen3):
  """Row r's first token is argmax(logits + Gumbel(fold_in(fold_in(key, r), 0))), so a row's
  sample does not depend on the other rows (the continuous sampler relies on this)."""
  model, _, params, sampler = qwen3
  key = jax.random.key(9)
  sp = SamplingParams(max_new_tokens=6)
  out = sampler(params, PROMPTS, key, sp)
  for r, prompt in enumerate(PROMPTS):
    logits = np.asarray(model(jnp.asarray([prompt])))[0, -1]
    g = np.asarray(jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, r), 0),
                                     logits.shape))
    assert int(out.tokens[r, 0]) == int(np.argmax(logits + g)), r
  other = sampler(params, [PROMPTS[0], [3, 4, 5], PROMPTS[2], [8] * 9], key, sp)
  for r in (0, 2):
    np.testing.assert_array_equal(np.asarray(other.tokens)[r], np.asarray(out.tokens)[r])
    np.testing.assert_allclose(np.asarray(other.logprobs)[r], np.asarray(out.logprobs)[r],
                               atol=1e-5)


def test_top_k_and_top_p_truncation(qwen3):
  model, _, params, sampler = qwen3
  prompt = PROMPTS[1]
  logits = np.asarray(model(jnp.asarray([prompt])))[0, -1].astype(np.float64)
  order = np.argsort(-logits)
  out = sampler(params, [prompt] * 1024, jax.random.key(2),
                SamplingParams(max_new_tokens=1, top_k=5))
  first = np.asarray(out.tokens)[:, 0]
  assert set(first) <= set(order[:5])
  renorm = _softmax(logits[order[:5]])
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0],
                             np.log(renorm[[list(order[:5]).index(t) for t in first]]), atol=1e-4)

  probs = _softmax(logits)
  nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
  out = sampler(params, [prompt] * 1024, jax.random.key(3),
                SamplingParams(max_new_tokens=1, top_p=0.5))
  first = np.asarray(out.tokens)[:, 0]
  assert set(first) <= set(nucleus)
  kept = probs[nucleus] / probs[nucleus].sum()
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0],
                             np.log(kept[[list(nucleus).index(t) for t in first]]), atol=1e-4)


def test_stop_tokens_end_rows_independently(qwen3):
  _, _, params, sampler = qwen3
  greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
  free = np.asarray(sampler(params, PROMPTS, jax.random.key(0), greedy).tokens)
  stop = int(free[0, 3])  # row 0 emits this at step 3 (maybe earlier; use its first time)
  out = sampler(params, PROMPTS, jax.random.key(0),
                SamplingParams(max_new_tokens=16, temperature=0.0, stop_ids=(stop, 10**6)))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for i in range(len(PROMPTS)):
    hits = np.nonzero(free[i] == stop)[0]
    end = hits[0] + 1 if len(hits) else 16
    np.testing.assert_array_equal(mask[i], np.arange(16) < end)
    np.testing.assert_array_equal(tokens[i, :end], free[i, :end])
    assert np.all(tokens[i, end:] == 0)  # pad after the stop, outside the mask
    assert np.all(np.asarray(out.logprobs)[i, end:] == 0)
  ends = [int(m.sum()) for m in mask]
  assert len(set(ends)) > 1, ends  # rows really stopped at different steps


def test_loop_exits_early_when_every_row_stopped(qwen3):
  _, _, params, sampler = qwen3
  prompt = PROMPTS[2]
  first = np.asarray(sampler(params, [prompt], jax.random.key(0),
                             SamplingParams(max_new_tokens=2, temperature=0.0)).tokens)[0]
  out = sampler(params, [prompt, prompt], jax.random.key(0),
                SamplingParams(max_new_tokens=64, temperature=0.0, stop_ids=(int(first[1]),)))
  assert int(out.decode_steps) <= 2 and np.asarray(out.mask).sum() == 2 * 2


def test_prompt_and_batch_bucketing_reuse_compilations(hf_checkpoints):
  model = load_pretrained(hf_checkpoints['qwen2'])
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, prompt_buckets=(16, 32))
  sp = SamplingParams(max_new_tokens=4)
  for n, b in [(5, 3), (9, 4), (16, 2), (13, 3)]:  # all in prompt bucket 16, batch bucket 4/2
    out = sampler(params, [[7] * n] * b, jax.random.key(n), sp)
    assert out.tokens.shape == (b, 4)
  assert sampler.compiled_variants() == 2  # (4, 16) and (2, 16)
  sampler(params, [[7] * 20] * 4, jax.random.key(0), sp)
  assert sampler.compiled_variants() == 3
  with pytest.raises(ValueError, match='exceeds the largest bucket 32'):
    sampler(params, [[7] * 40], jax.random.key(0), sp)
  assert bucket(17, (16, 32)) == 32 and batch_bucket(3) == 4 and batch_bucket(3, 8) == 8


def test_bad_sampling_input(qwen3):
  _, _, params, sampler = qwen3
  with pytest.raises(ValueError, match='empty'):
    sampler(params, [[1, 2], []], jax.random.key(0), SamplingParams(max_new_tokens=2))
  with pytest.raises(ValueError, match='top_p'):
    SamplingParams(max_new_tokens=2, top_p=0.0)


def test_sharded_sampling_equals_single_device(hf_checkpoints):
  path = hf_checkpoints['llama']
  prompts = PROMPTS * 2  # 8 rows: one per data shard
  sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, stop_ids=(3,))
  graphdef, params = nnx.split(load_pretrained(path))
  ref = Sampler(graphdef)(params, prompts, jax.random.key(7), sp)

  mesh = shd.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  graphdef, params = nnx.split(load_pretrained(path, mesh=mesh))
  out = Sampler(graphdef, mesh=mesh)(params, prompts, jax.random.key(7), sp)
  assert out.tokens.sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)


def test_per_layer_cache_prefill_then_decode_equals_uncached_logits(qwen3):
  """The sampler's cache path: a prefill into per-layer cache arrays (layers scanned), then
  single-token steps (layers unrolled) give the logits of one uncached forward pass; a
  stacked-layer call on a per-layer cache past the prefill is refused."""
  from opd_jax.models import init_cache
  model = qwen3[0]
  ids = jnp.asarray(np.random.RandomState(5).randint(3, 100, (2, 9)), jnp.int32)
  want = np.asarray(model(ids))
  p, s = 6, 9
  cache = init_cache(model.cfg, 2, s)
  assert len(cache['k']) == model.cfg.num_layers and cache['k'][0].shape == (
      2, model.cfg.num_kv_heads, s, model.cfg.head_dim)
  kv_mask = jnp.ones((2, s), jnp.int32)
  h, cache = model.hidden(ids[:, :p], cache=cache, kv_mask_BxS=kv_mask, start=0)
  got = [np.asarray(model.logits(h))]
  layers = model.split_layers(fuse=True)
  for t in range(p, s):
    h, cache = model.hidden(ids[:, t:t + 1], cache=cache, kv_mask_BxS=kv_mask, start=t,
                            unrolled=layers)
    got.append(np.asarray(model.logits(h)))
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5)
  with pytest.raises(ValueError, match='only for a prefill'):
    model.hidden(ids[:, :1], cache=cache, kv_mask_BxS=kv_mask, start=3)
