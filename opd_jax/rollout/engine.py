"""The rollout-engine protocol: what the trainer's OPD step calls, whichever engine samples.

An engine takes the student's parameters (in the compute dtype), this process's records and a
key, and returns one `RolloutBatch`: [B, T] tokens, attention, loss mask and behaviour
logprobs on the caller's mesh, the response texts, per-row environment rewards and the
rollout's analytic FLOPs. Two engines implement it:

- `SingleTurnEngine`: one response per prompt, by the static `Sampler` (or its continuous
  batcher, `Sampler(..., slots=R)`); no environment, so `env_rewards` is NaN on every row.
- `EpisodeEngine`: multi-turn episodes by `MultiTurnSampler` (docs/design.md §10); rows
  whose tag has an environment carry its episode reward, the others are one-turn episodes.

Every engine also lists its jitted calls on abstract inputs (`abstract_calls`), the calls the
AOT check compiles (opd_jax/tools/aot.py): a generator of `AbstractCall`s; the driver sends
back each compiled call's abstract outputs (or None when it did not compile), from which the
next call's inputs are made.

Legend (docs/design.md §7): B rows, P prompt slots, N response slots, T = P + N.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import sharding as shd
from opd_jax.rollout.decode import AbstractCall, SamplingParams
from opd_jax.rollout.sampler import Rollout

FlopsFn = Callable[[np.ndarray, np.ndarray], int]  # (prompt lens [b], later tokens [b]) -> FLOPs


AbstractCalls = Iterator[AbstractCall]  # the driver .send()s each call's abstract outputs


@dataclasses.dataclass
class RolloutBatch:
  """One batch of on-policy samples, whichever engine made it.

  tokens / attention_mask / loss_mask / behaviour_logprobs [B, T] on the caller's mesh
  (loss mask 1 on the student's sampled tokens; behaviour logprobs 0 elsewhere). The host
  fields cover this process's rows: `env_rewards` [b] is an environment's reward, NaN on rows
  without an environment (their reward, if any, comes from the verifiable rewards of
  `texts`); `texts` (the final response of each row) is decoded on first use. `flops`: the
  analytic FLOPs of sampling the batch; `metrics`: the engine's own."""
  tokens: jax.Array
  attention_mask: jax.Array
  loss_mask: jax.Array
  behaviour_logprobs: jax.Array
  env_rewards: np.ndarray
  flops: int
  metrics: dict
  texts_fn: Callable[[], list[str]] = dataclasses.field(repr=False, default=list)
  _texts: list[str] | None = dataclasses.field(default=None, repr=False)

  @property
  def texts(self) -> list[str]:
    if self._texts is None:
      self._texts = list(self.texts_fn())
    return self._texts


class RolloutEngine(Protocol):
  """What the trainer's OPD step calls (see the module docstring)."""

  def __call__(self, params, records: Sequence, key) -> RolloutBatch: ...

  def abstract_calls(self, params, rows: int, prompt_len: int) -> AbstractCalls: ...


@jax.jit
def rollout_arrays(rollout: Rollout):
  """(tokens, attention_mask, loss_mask, behaviour_logprobs) [B, T] from a rollout."""
  tokens, attn = rollout.sequences()
  zeros = jnp.zeros_like(rollout.prompt_mask)
  loss_mask = jnp.concatenate([zeros, rollout.mask], axis=1)
  s_b = jnp.concatenate([zeros.astype(jnp.float32), rollout.logprobs], axis=1)
  return tokens, attn, loss_mask, s_b


def decode_responses(tokenizer, tokens_BxN, mask_BxN) -> list[str]:
  """Response texts (special tokens such as the stop token removed) of host arrays."""
  tokens, mask = np.asarray(tokens_BxN), np.asarray(mask_BxN).astype(bool)
  return tokenizer.batch_decode([t[m].tolist() for t, m in zip(tokens, mask)],
                                skip_special_tokens=True)


def rollout_token_counts(rollout: Rollout) -> tuple[np.ndarray, np.ndarray]:
  """(prompt tokens, response tokens) [b] of a rollout's real rows, on the host (rows padded
  up to a batch bucket sample nothing and are left out)."""
  prompt = shd.to_host(jnp.sum(rollout.prompt_mask, -1))
  response = shd.to_host(jnp.sum(rollout.mask, -1))
  real = response > 0
  return prompt[real], response[real]


class SingleTurnEngine:
  """One response per record from `sampler` with `sp`; `encoder` makes the prompts,
  `tokenizer` decodes the responses, `flops_fn` counts the rollout's FLOPs."""

  def __init__(self, sampler, sp: SamplingParams, *, encoder=None, tokenizer=None,
               flops_fn: FlopsFn | None = None):
    self.sampler, self.sp = sampler, sp
    self.encoder, self.tokenizer, self.flops_fn = encoder, tokenizer, flops_fn

  def __call__(self, params, records, key) -> RolloutBatch:
    if self.encoder is None or self.tokenizer is None:
      raise ValueError('SingleTurnEngine without an encoder and a tokenizer only lists its '
                       'abstract calls (the AOT check); give both to sample')
    rollout = self.sampler(params, self.encoder.encode_batch(records), key, self.sp)
    tokens, attn, lmask, s_b = rollout_arrays(rollout)
    jax.block_until_ready(s_b)
    flops = self.flops_fn(*rollout_token_counts(rollout)) if self.flops_fn else 0
    return RolloutBatch(
        tokens, attn, lmask, s_b, env_rewards=np.full((len(records),), np.nan, np.float32),
        flops=flops, metrics={}, texts_fn=lambda: decode_responses(
            self.tokenizer, rollout.host_rows(rollout.tokens), rollout.host_rows(rollout.mask)))

  def abstract_calls(self, params, rows: int, prompt_len: int) -> AbstractCalls:
    return self.sampler.abstract_calls(params, rows, prompt_len, self.sp)


class EpisodeEngine:
  """Episodes from a `MultiTurnSampler` (docs/design.md §10), drawn at the rollout's
  temperature / top-k / top-p; `mesh` is where the batch's arrays go."""

  def __init__(self, agent, *, mesh=None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, flops_fn: FlopsFn | None = None):
    self.agent, self.mesh = agent, mesh
    self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
    self.flops_fn = flops_fn

  def __call__(self, params, records, key) -> RolloutBatch:
    episodes = self.agent(params, records, key, temperature=self.temperature,
                          top_k=self.top_k, top_p=self.top_p)
    tokens, attn, lmask, s_b = episodes.arrays(self.mesh)
    jax.block_until_ready(s_b)
    # the prompt's prefill, then every later token (student or observation) as one cached
    # step (observation prefills cost about the same per token)
    flops = (self.flops_fn(episodes.prompt_mask.sum(-1), episodes.attn.sum(-1))
             if self.flops_fn else 0)
    env_rewards = np.where(episodes.has_env, episodes.reward, np.nan).astype(np.float32)
    return RolloutBatch(tokens, attn, lmask, s_b, env_rewards=env_rewards, flops=flops,
                        metrics=episodes.metrics([r.tag for r in records]),
                        texts_fn=episodes.final_texts)

  def abstract_calls(self, params, rows: int, prompt_len: int) -> AbstractCalls:
    return self.agent.abstract_calls(params, rows, prompt_len, temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p)
