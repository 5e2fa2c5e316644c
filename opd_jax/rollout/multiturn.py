"""Multi-turn (agentic) rollouts: the student acts in an environment over several turns, and
each turn continues from the KV cache of the turns before it.

Legend (docs/design.md §7): B rows (episodes), P prompt slots, n tokens per turn (the turn
budget), O observation slots (bucketed), S cache slots, N episode slots after the prompt
(`agent.max_episode_tokens`), V vocabulary.

An episode (docs/design.md §10):
  1. `env.reset(record)` gives the first user message; the prompt is the record's chat with
     that message, rendered by the tag's chat template, prefilled once.
  2. A turn: the jitted `_turn` while-loop decodes every live row until it emits a stop id
     (the rollout's stop ids: EOS, `rollout.stop_tokens`) or reaches its budget
     min(n, tokens left in the episode). Nothing runs in Python per token.
  3. On the host, each live row's turn is decoded and given to `env.step`; the observation
     is wrapped as the next user message of the chat template (`ObservationFormat`),
     tokenized, and `_observe` prefills only those tokens into the cache, after what is
     there already. Then the next turn.
  4. An episode ends when the environment says so, after `agent.max_turns` turns, when the
     next observation and one more token would not fit `agent.max_episode_tokens`, or when
     the environment raises (a `ToolError` is counted as a tool error, anything else as an
     environment error); its error is recorded and the other rows go on.

Cache layout. All rows write at one shared pointer g (as in opd_jax/rollout/continuous.py): a turn
writes step i at slot g + i for every row, an observation block (left-padded to O) at
[g, g + O). A row that is idle (its turn ended, or its episode did) has `kv_mask` 0 at those
slots, so it attends exactly to its own tokens; positions count each row's real tokens, so
RoPE phases, hence logits, are those of the compact sequence a re-prefill would see
(tests/rollout/test_multiturn.py checks <= 1e-5). S = P + max_turns * n + (max_turns - 1) * O_max.

The training arrays are compact: [B, P + N] with the left-padded prompt, then each row's
student and observation tokens right-padded to N. `loss_mask` (and the behaviour logprobs
s_b) cover the student's tokens only; `attention_mask` covers every real token, so teachers,
the reference and the update see the whole interleaved sequence, and everything the loss and
the KL metrics read is selected by the loss mask.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import envs as envs_lib
from opd_jax import sharding as shd
from opd_jax.buckets import DEFAULT_PROMPT_BUCKETS, batch_bucket, bucket, left_pad
from opd_jax.rollout.decode import (AbstractCall, SamplingParams, abstract_key,
                                    abstract_prefill_outputs, decode_layers, decode_step, prefill,
                                    row_keys, stop_hit)

log = logging.getLogger(__name__)

OBS_BUCKETS = tuple(2**i for i in range(3, 16))  # observation blocks: 8 ... 32768 slots


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Budgets:
  """Per-episode budgets: turns, tokens per student turn, student + observation tokens after
  the prompt (the context budget is prompt + max_episode_tokens), tokens per observation."""
  max_turns: int = 4
  max_tokens_per_turn: int = 64
  max_episode_tokens: int = 256
  max_obs_tokens: int = 64

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f'config.agent.{f.name}={v!r}: must be an integer >= 1')
    if self.max_tokens_per_turn > self.max_episode_tokens:
      raise ValueError(f'config.agent.max_tokens_per_turn={self.max_tokens_per_turn} exceeds '
                       f'config.agent.max_episode_tokens={self.max_episode_tokens}')


# ------------------------------------------------------------------- observation format
class ObservationFormat:
  """How an observation enters the token stream: as the next user message of the chat
  template, i.e. `pre + observation + post` where for ChatML pre = '\\n<|im_start|>user\\n' and
  post = '<|im_end|>\\n<|im_start|>assistant\\n' (found by rendering a two-turn chat with
  markers). With the 'raw' template (None kwargs) pre = post = '\\n'."""

  _U, _A, _O = 'USERMARKER', 'ASSISTANTMARKER', 'OBSERVATIONMARKER'

  def __init__(self, tokenizer, template_kwargs: dict | None):
    if template_kwargs is None:
      pre, post = '\n', '\n'
    else:
      msgs = [{'role': 'user', 'content': self._U}, {'role': 'assistant', 'content': self._A},
              {'role': 'user', 'content': self._O}]
      full = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                           **template_kwargs)
      i = full.index(self._A) + len(self._A)
      eos = tokenizer.eos_token or ''
      if eos and full[i:].startswith(eos):
        i += len(eos)
      j = full.index(self._O)
      pre, post = full[i:j], full[j + len(self._O):]
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)['input_ids']) if s else []
    self.pre_ids, self.post_ids = enc(pre), enc(post)
    self.pre, self.post = pre, post
    self._enc = enc

  def ids(self, observation: str, limit: int, close_ids: Sequence[int] = ()) -> tuple[list, bool]:
    """(token ids, truncated) of one observation: `close_ids` (the stop token, when the
    turn ended without one), pre, the observation cut to fit `limit` ids in all, post."""
    fixed = len(close_ids) + len(self.pre_ids) + len(self.post_ids)
    body = self._enc(observation)
    room = max(0, limit - fixed)
    return list(close_ids) + self.pre_ids + body[:room] + self.post_ids, len(body) > room


# -------------------------------------------------------------------------- jitted parts
def _turn(graphdef, params, cache, kv_mask_BxS, logits_BxV, pos_B, done_B, limit_B, g, key, *,
          sp: SamplingParams, pad_id: int, logits_fn=None):
  """One student turn for every live row: decode from cache slot g until each row emits a
  stop id or reaches limit_B tokens. Returns (tokens, mask, logps [B, n], steps run, cache,
  kv_mask, positions)."""
  model = nnx.merge(graphdef, params)
  layers = decode_layers(model)
  b = done_B.shape[0]
  n = sp.max_new_tokens
  request_B = jnp.arange(b, dtype=jnp.int32)

  def cond(st):
    return (st['i'] < n) & ~jnp.all(st['done'])

  def body(st):
    # every row writes its turn step i at cache slot g + i, a slot its kv mask opens if live
    i = st['i']
    kv = jax.lax.dynamic_update_slice(st['kv'], (~st['done'])[:, None].astype(st['kv'].dtype),
                                      (0, g + i))
    token, logp, live, logits, cache = decode_step(
        model, layers, st['logits'], st['cache'], row_keys(key, request_B, jnp.broadcast_to(
            i, (b,))), st['done'], st['pos'], kv, g + i, sp=sp, pad_id=pad_id,
        logits_fn=logits_fn)
    at = (0, i)
    return {
        'i': i + 1, 'cache': cache, 'kv': kv, 'logits': logits,
        'pos': st['pos'] + live.astype(jnp.int32),
        'done': st['done'] | (live & (stop_hit(token, sp) | (i + 1 >= limit_B))),
        'tokens': jax.lax.dynamic_update_slice(st['tokens'], token[:, None], at),
        'mask': jax.lax.dynamic_update_slice(st['mask'], live[:, None].astype(jnp.int32), at),
        'logps': jax.lax.dynamic_update_slice(st['logps'], logp[:, None], at)}

  init = {'i': jnp.int32(0), 'cache': cache, 'kv': kv_mask_BxS, 'logits': logits_BxV,
          'pos': pos_B, 'done': done_B | (limit_B < 1),
          'tokens': jnp.full((b, n), pad_id, jnp.int32), 'mask': jnp.zeros((b, n), jnp.int32),
          'logps': jnp.zeros((b, n), jnp.float32)}
  out = jax.lax.while_loop(cond, body, init)
  return (out['tokens'], out['mask'], out['logps'], out['i'], out['cache'], out['kv'],
          out['pos'])


def _observe(graphdef, params, cache, kv_mask_BxS, logits_BxV, pos_B, ids_BxO, mask_BxO, g):
  """Prefills each row's observation (left-padded to O) at cache slots [g, g + O), attending
  to the whole cache so far. Returns (cache, kv_mask, the next turn's first logits, pos)."""
  model = nnx.merge(graphdef, params)
  layers = decode_layers(model)
  mask = mask_BxO.astype(kv_mask_BxS.dtype)
  kv = jax.lax.dynamic_update_slice(kv_mask_BxS, mask, (0, g))
  positions = pos_B[:, None] + jnp.maximum(jnp.cumsum(mask_BxO, axis=-1) - 1, 0)
  hidden, cache = model.hidden(ids_BxO, positions_BxT=positions, cache=cache, kv_mask_BxS=kv,
                               start=g, unrolled=layers)
  has = mask_BxO.sum(-1) > 0
  logits = jnp.where(has[:, None], model.logits(hidden[:, -1:])[:, 0], logits_BxV)
  return cache, kv, logits, pos_B + mask_BxO.sum(-1).astype(pos_B.dtype)


# ----------------------------------------------------------------------------- episodes
@dataclasses.dataclass
class Episodes:
  """A batch of finished episodes (host numpy arrays; rows = the records given).

  prompt_ids / prompt_mask [B, P] left-padded; tokens / attn / student_mask / logprobs
  [B, N]: each row's student and observation tokens in order, right-padded, with 1 on real
  tokens, 1 on student tokens, and the behaviour logprob of each student token (0
  elsewhere). Per row: turns, reward (the sum of the environment's step rewards; rows
  without an environment: 0), has_env, end (why it ended: 'env', 'max_turns', 'context',
  'tool_error', 'env_error', 'single_turn'), error (the message, or None), turn_texts (the
  decoded student turns), obs_truncated (observations cut to agent.max_obs_tokens)."""
  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  tokens: np.ndarray
  attn: np.ndarray
  student_mask: np.ndarray
  logprobs: np.ndarray
  turns: np.ndarray
  reward: np.ndarray
  has_env: np.ndarray
  end: list
  error: list
  turn_texts: list
  obs_truncated: np.ndarray
  decode_steps: int = 0

  @property
  def student_tokens(self) -> np.ndarray:
    return self.student_mask.sum(-1)

  @property
  def env_tokens(self) -> np.ndarray:
    return self.attn.sum(-1) - self.student_mask.sum(-1)

  @property
  def env_mask(self) -> np.ndarray:
    """[B, P + N]: 1 on observation tokens (in the context, outside the loss)."""
    return np.concatenate([np.zeros_like(self.prompt_mask),
                           self.attn * (1 - self.student_mask)], 1)

  def host_arrays(self):
    """(tokens, attention_mask, loss_mask, behaviour_logprobs) [B, P + N] numpy."""
    return (np.concatenate([self.prompt_ids, self.tokens], 1),
            np.concatenate([self.prompt_mask, self.attn], 1),
            np.concatenate([np.zeros_like(self.prompt_mask), self.student_mask], 1),
            np.concatenate([np.zeros(self.prompt_mask.shape, np.float32), self.logprobs], 1))

  def arrays(self, mesh=None, rows: int | None = None):
    """host_arrays() on the devices, batch-sharded over `mesh`'s data axes; `rows` pads the
    batch with rows of one pad token outside the loss (a multiple of the data axes)."""
    out = self.host_arrays()
    b = out[0].shape[0]
    if rows is not None and rows > b:
      pad = [np.zeros((rows - b,) + x.shape[1:], x.dtype) for x in out]
      pad[1][:, 0] = 1  # one real (pad) token, so no row is empty
      out = tuple(np.concatenate([x, y]) for x, y in zip(out, pad))
    if mesh is None:
      return tuple(jnp.asarray(x) for x in out)
    return tuple(shd.shard_batch(x, mesh) for x in out)

  def final_texts(self) -> list[str]:
    return [t[-1] if t else '' for t in self.turn_texts]

  def metrics(self, tags: Sequence[str], prefix: str = 'agent') -> dict[str, float]:
    """Per-episode means (turns, student / env tokens, reward of env episodes per tag) and
    counts (tool / environment errors, observations cut)."""
    tags = np.asarray(list(tags))
    env = self.has_env.astype(bool)
    out = {f'{prefix}/turns': float(self.turns.mean()),
           f'{prefix}/student_tokens': float(self.student_tokens.mean()),
           f'{prefix}/env_tokens': float(self.env_tokens.mean()),
           f'{prefix}/tool_errors': float(sum(e == 'tool_error' for e in self.end)),
           f'{prefix}/env_errors': float(sum(e == 'env_error' for e in self.end)),
           f'{prefix}/context_full': float(sum(e == 'context' for e in self.end)),
           f'{prefix}/obs_truncated': float(self.obs_truncated.sum())}
    if env.any():
      out[f'{prefix}/episode_reward'] = float(self.reward[env].mean())
      for t in sorted(set(tags[env].tolist())):
        out[f'{prefix}/episode_reward/{t}'] = float(self.reward[env & (tags == t)].mean())
        out[f'{prefix}/turns/{t}'] = float(self.turns[env & (tags == t)].mean())
    return out


def _env_call(fn, *args):
  """(result, None) or (None, (kind, message)) of an environment call."""
  try:
    return fn(*args), None
  except envs_lib.ToolError as e:
    return None, ('tool_error', f'ToolError: {e}')
  except Exception as e:  # noqa: BLE001 - any environment failure ends only its episode
    return None, ('env_error', f'{type(e).__name__}: {e}')


class MultiTurnSampler:
  """Runs batches of episodes with the student (see the module docstring).

  Usage:
    mt = MultiTurnSampler(graphdef, tokenizer=tok, encoder=encoder, stop_ids=(eos,),
                          tag_to_env={'tool': 'tool'}, budgets=Budgets(max_turns=4))
    episodes = mt(params, records, key, temperature=1.0)
  Rows whose tag has no environment are one-turn episodes with the turn budget.
  `logits_fn` (benchmarks and tests only, never training) transforms each decode step's
  logits [B, V] before the policy, as in `Sampler`.
  """

  def __init__(self, graphdef, *, tokenizer, encoder, stop_ids: Sequence[int],
               tag_to_env: Mapping[str, str], budgets: Budgets = Budgets(),
               env_kwargs: Mapping[str, Mapping[str, Any]] | None = None, mesh=None,
               pad_id: int | None = None, cache_dtype=None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, max_workers: int = 16,
               logits_fn=None, layout: shd.RolloutLayout | None = None):
    # `mesh`: the caller's; `layout` (optional): where the turns decode, as in Sampler.
    self.graphdef, self.mesh, self.layout = graphdef, mesh, layout
    self.run_mesh = layout.mesh if layout is not None else mesh
    self.tokenizer, self.encoder = tokenizer, encoder
    self.stop_ids = tuple(int(i) for i in stop_ids)
    if not self.stop_ids:
      raise ValueError('multi-turn rollouts need a turn-stop token (stop_ids is empty)')
    self.tag_to_env = dict(tag_to_env)
    self.env_kwargs = {k: dict(v) for k, v in (env_kwargs or {}).items()}
    for name in [*self.tag_to_env.values(), *self.env_kwargs]:
      envs_lib.get_env(name)
    self.budgets = budgets
    if tokenizer is None and pad_id is None:
      raise ValueError('MultiTurnSampler without a tokenizer (abstract_calls only) needs pad_id')
    self.pad_id = int(tokenizer.pad_token_id or 0) if pad_id is None else int(pad_id)
    self.cache_dtype = cache_dtype
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self.max_workers = max_workers
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    self.close_id = int(eos if eos is not None else self.stop_ids[0])
    self._formats: dict[str, ObservationFormat] = {}
    g = graphdef
    self._prefill = jax.jit(functools.partial(prefill, g),
                            static_argnames=('max_new_tokens', 'cache_dtype'))
    self._turn = jax.jit(functools.partial(_turn, g, logits_fn=logits_fn),
                         static_argnames=('sp', 'pad_id'), donate_argnums=(1, 2))
    self._observe = jax.jit(functools.partial(_observe, g), donate_argnums=(1, 2))
    self.obs_max = bucket(budgets.max_obs_tokens, OBS_BUCKETS)
    self.last_stats: dict = {}

  def handles(self, tag: str) -> bool:
    return tag in self.tag_to_env

  def split(self, records):
    """(records without an environment, records with one)."""
    return ([r for r in records if not self.handles(r.tag)],
            [r for r in records if self.handles(r.tag)])

  def cache_len(self, p: int) -> int:
    bd = self.budgets
    return p + bd.max_turns * bd.max_tokens_per_turn + (bd.max_turns - 1) * self.obs_max

  def _format(self, tag: str) -> ObservationFormat:
    from opd_jax.data import TEMPLATES
    name = self.encoder.template_for(tag)
    if name not in self._formats:
      self._formats[name] = ObservationFormat(self.tokenizer, TEMPLATES[name])
      fmt = self._formats[name]
      fixed = 1 + len(fmt.pre_ids) + len(fmt.post_ids)
      if fixed >= self.budgets.max_obs_tokens:
        raise ValueError(f'config.agent.max_obs_tokens={self.budgets.max_obs_tokens} leaves no '
                         f'room for an observation: template {name!r} wraps each one in '
                         f'{fixed} tokens')
    return self._formats[name]

  def _put(self, x):
    return jnp.asarray(x) if self.run_mesh is None else shd.shard_batch(x, self.run_mesh)

  def abstract_calls(self, params, rows: int, prompt_len: int, *, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0):
    """The jitted calls a batch of `rows` episodes with prompts of `prompt_len` slots makes,
    on abstract inputs (decode.AbstractCall; `params` on the layout the turns decode with):
    the prompt's prefill into the episode's cache (`cache_len` slots), one student turn and
    one observation block of the largest bucket (`obs_max` slots); every later turn and
    observation has these shapes. The driver sends back each call's abstract outputs."""
    bd = self.budgets
    sp = SamplingParams(max_new_tokens=bd.max_tokens_per_turn, temperature=temperature,
                        top_k=top_k, top_p=top_p, stop_ids=self.stop_ids)
    mesh = self.run_mesh
    mult = 1 if mesh is None else shd.batch_size_multiple(mesh)
    bb, p = batch_bucket(rows, mult), prompt_len
    s = self.cache_len(p)
    sds = lambda shape, dtype, n: jax.ShapeDtypeStruct(shape, dtype, sharding=(
        shd.batch_sharding(mesh, n) if mesh is not None else None))
    shapes = f'B={bb} P={p} S={s} turn={bd.max_tokens_per_turn} O={self.obs_max}'
    ids = sds((bb, p), jnp.int32, 2)
    out = yield AbstractCall('prefill', self._prefill, (params, ids, ids), dict(
        max_new_tokens=s - p, cache_dtype=self.cache_dtype), shapes)
    cache, logits = out if out is not None else abstract_prefill_outputs(
        self.graphdef, params, bb, p, s, self.cache_dtype, mesh)
    kv, pos = sds((bb, s), jnp.int32, 2), sds((bb,), jnp.int32, 1)
    g = jax.ShapeDtypeStruct((), jnp.int32, sharding=(
        shd.replicated(mesh) if mesh is not None else None))
    out = yield AbstractCall('turn', self._turn, (
        params, cache, kv, logits, pos, sds((bb,), jnp.bool_, 1), sds((bb,), jnp.int32, 1), g,
        abstract_key(mesh)), dict(sp=sp, pad_id=self.pad_id), shapes)
    if out is not None:
      cache, kv, pos = out[4], out[5], out[6]
    obs = sds((bb, self.obs_max), jnp.int32, 2)
    yield AbstractCall('observe', self._observe, (params, cache, kv, logits, pos, obs, obs, g),
                       {}, shapes)

  def __call__(self, params, records, key, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> Episodes:
    from opd_jax.data import DataError
    from opd_jax.data import record_dict
    if self.tokenizer is None or self.encoder is None:
      raise ValueError('MultiTurnSampler without a tokenizer and an encoder only lists its '
                       'abstract calls (the AOT check); give both to run episodes')
    bd = self.budgets
    b = len(records)
    if b == 0:
      raise ValueError('no records to run episodes for')
    sp = SamplingParams(max_new_tokens=bd.max_tokens_per_turn, temperature=temperature,
                        top_k=top_k, top_p=top_p, stop_ids=self.stop_ids)
    # ------------------------------------------------------------ reset, prompts, prefill
    envs: list[Any] = [None] * b
    end: list[str | None] = [None] * b
    error: list[str | None] = [None] * b
    first = list(records)
    for i, r in enumerate(records):
      if not self.handles(r.tag):
        continue
      name = self.tag_to_env[r.tag]
      env, err = _env_call(lambda: envs_lib.make_env(name, **self.env_kwargs.get(name, {})))
      obs = None
      if err is None:
        envs[i] = env
        obs, err = _env_call(env.reset, record_dict(r))
      if err is not None:
        end[i], error[i] = err
        envs[i] = None
      elif obs is not None:
        first[i] = dataclasses.replace(r, messages=list(r.messages[:-1]) + [
            {'role': 'user', 'content': str(obs)}])
    prompts = self.encoder.encode_batch(first)
    for r, p in zip(first, prompts):
      if p is None:
        raise DataError(f"{r.where}: field 'prompt': record {r.id!r}'s first observation is "
                        f'over data.max_prompt_len={self.encoder.max_prompt_len}')
    p = bucket(max(len(x) for x in prompts), self.prompt_buckets)
    ids, pmask = left_pad(prompts, p, self.pad_id)
    mult = 1 if self.run_mesh is None else shd.batch_size_multiple(self.run_mesh)
    bb = batch_bucket(b, mult)
    done = np.zeros((bb,), bool)
    done[:b] = [e is not None for e in end]
    if bb != b:  # padded rows: one pad token, finished from the start
      extra = np.zeros((bb - b, p), np.int32)
      extra[:, -1] = 1
      ids = np.concatenate([ids, np.full((bb - b, p), self.pad_id, np.int32)])
      pmask = np.concatenate([pmask, extra])
      done[b:] = True
    s = self.cache_len(p)
    seq = [[] for _ in range(b)]        # each row's tokens after the prompt
    stu = [[] for _ in range(b)]        # 1 on student tokens
    lps = [[] for _ in range(b)]        # behaviour logprobs (0 on observation tokens)
    turns = np.zeros((b,), np.int32)
    reward = np.zeros((b,), np.float64)
    texts: list[list[str]] = [[] for _ in range(b)]
    truncated = np.zeros((b,), np.int32)
    steps_total = 0
    pool = ThreadPoolExecutor(max(1, min(self.max_workers, b)))
    if self.layout is not None:  # parameters and key on the rollout layout's mesh
      params = self.layout.put(params)
      key = self.layout.put_key(key)
    ctx = jax.set_mesh(self.run_mesh) if self.run_mesh is not None else _null()
    try:
      with ctx:
        cache, logits = self._prefill(params, self._put(ids), self._put(pmask),
                                      max_new_tokens=s - p, cache_dtype=self.cache_dtype)
        kv = self._put(np.concatenate([pmask, np.zeros((bb, s - p), np.int32)], 1))
        pos = self._put(pmask.sum(-1).astype(np.int32))
        g = p
        for turn in range(bd.max_turns):
          live = [i for i in range(b) if not done[i]]
          if not live:
            break
          limit = np.zeros((bb,), np.int32)
          for i in live:
            limit[i] = min(bd.max_tokens_per_turn, bd.max_episode_tokens - len(seq[i]))
          tok, tmask, tlp, steps, cache, kv, pos = self._turn(
              params, cache, kv, logits, pos, self._put(done), self._put(limit), jnp.int32(g),
              jax.random.fold_in(key, turn), sp=sp, pad_id=self.pad_id)
          tok, tmask, tlp, steps = jax.device_get((tok, tmask, tlp, steps))
          g += int(steps)
          steps_total += int(steps)
          lens = np.asarray(tmask).sum(-1)
          turn_ids = [tok[i, :lens[i]].tolist() for i in live]
          turn_text = self.tokenizer.batch_decode(turn_ids, skip_special_tokens=True)
          for i, t_ids, text in zip(live, turn_ids, turn_text):
            seq[i] += t_ids
            stu[i] += [1] * len(t_ids)
            lps[i] += tlp[i, :len(t_ids)].tolist()
            turns[i] += 1
            texts[i].append(text)
          # ---------------------------------------------------- the environments answer
          stepping = [(i, text) for i, text in zip(live, turn_text) if envs[i] is not None]
          results = dict(zip([i for i, _ in stepping], pool.map(
              lambda it: _env_call(envs[it[0]].step, it[1]), stepping)))
          obs_rows: dict[int, list[int]] = {}
          for i, t_ids in zip(live, turn_ids):
            if envs[i] is None:
              done[i], end[i] = True, 'single_turn'
              continue
            res, err = results[i]
            if err is not None:
              done[i], (end[i], error[i]) = True, err
              continue
            obs, env_done, r = _check_step(res, self.tag_to_env[records[i].tag], records[i])
            reward[i] += r
            if env_done or obs is None:
              done[i], end[i] = True, 'env'
              continue
            if turn + 1 >= bd.max_turns:
              done[i], end[i] = True, 'max_turns'
              continue
            room = bd.max_episode_tokens - len(seq[i]) - 1  # one token for the next turn
            close = [] if t_ids and t_ids[-1] in self.stop_ids else [self.close_id]
            o_ids, cut = self._format(records[i].tag).ids(
                str(obs), min(bd.max_obs_tokens, room), close)
            if len(o_ids) > room:
              done[i], end[i] = True, 'context'
              continue
            truncated[i] += cut
            obs_rows[i] = o_ids
            seq[i] += o_ids
            stu[i] += [0] * len(o_ids)
            lps[i] += [0.0] * len(o_ids)
          if not obs_rows:
            continue
          o = bucket(max(len(x) for x in obs_rows.values()), OBS_BUCKETS)
          o_ids = np.full((bb, o), self.pad_id, np.int32)
          o_mask = np.zeros((bb, o), np.int32)
          for i, x in obs_rows.items():
            o_ids[i, o - len(x):], o_mask[i, o - len(x):] = x, 1
          cache, kv, logits, pos = self._observe(params, cache, kv, logits, pos,
                                                 self._put(o_ids), self._put(o_mask),
                                                 jnp.int32(g))
          g += o
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    for i in range(b):
      if reward[i] < 0 or reward[i] > 1 or not math.isfinite(reward[i]):
        raise ValueError(f'environment {self.tag_to_env[records[i].tag]!r} gave record '
                         f'{records[i].id!r} an episode reward of {reward[i]}; episode '
                         'rewards must lie in [0, 1]')
      if end[i] is None:
        end[i] = 'max_turns'
      if error[i] is not None:
        reward[i] = 0.0
    n = bd.max_episode_tokens
    tokens = np.full((b, n), self.pad_id, np.int32)
    attn = np.zeros((b, n), np.int32)
    smask = np.zeros((b, n), np.int32)
    logp = np.zeros((b, n), np.float32)
    for i in range(b):
      k = len(seq[i])
      tokens[i, :k], attn[i, :k], smask[i, :k], logp[i, :k] = seq[i], 1, stu[i], lps[i]
    self.last_stats = {'cache_len': s, 'final_pointer': g, 'decode_steps': steps_total}
    return Episodes(ids[:b], pmask[:b], tokens, attn, smask, logp, turns,
                    reward.astype(np.float32), np.asarray([self.handles(r.tag) for r in records]),
                    end, error, texts, truncated, decode_steps=steps_total)


def replay(mt: 'MultiTurnSampler', records, turns: Sequence[Sequence[str]], *,
           prompt_len: int | None = None) -> Episodes:
  """Episodes from scripted student turns (e.g. SFT on tool-using transcripts): each
  record's environment is reset and stepped with its scripted turns, and the tokens are laid
  out exactly as a rollout would (each turn + the stop token, then the wrapped observation),
  so an SFT batch on them trains the turns the sampler will produce. Behaviour logprobs are
  0. A transcript that ends early (the environment says done) drops its remaining turns; one
  over agent.max_episode_tokens is an error naming the record. `prompt_len` fixes P."""
  from opd_jax.data import record_dict
  bd = mt.budgets
  b = len(records)
  firsts, seqs, stus, n_turns, rewards, ends = [], [], [], [], [], []

  def one(i):
    r = records[i]
    env = envs_lib.make_env(mt.tag_to_env[r.tag], **mt.env_kwargs.get(mt.tag_to_env[r.tag], {}))
    obs = env.reset(record_dict(r))
    first = dataclasses.replace(r, messages=list(r.messages[:-1]) + [
        {'role': 'user', 'content': str(obs)}]) if obs is not None else r
    seq, stu, total, k, end = [], [], 0.0, 0, 'max_turns'
    for k, text in enumerate(turns[i], start=1):
      t_ids = list(mt.tokenizer(text, add_special_tokens=False)['input_ids']) + [mt.close_id]
      seq += t_ids
      stu += [1] * len(t_ids)
      obs, done, rew = env.step(text)
      total += float(rew)
      if done or obs is None:
        end = 'env'
        break
      if k < len(turns[i]):
        o_ids, _ = mt._format(r.tag).ids(str(obs), bd.max_obs_tokens)
        seq += o_ids
        stu += [0] * len(o_ids)
    if len(seq) > bd.max_episode_tokens:
      raise ValueError(f'record {r.id!r}: the transcript takes {len(seq)} tokens, over '
                       f'agent.max_episode_tokens={bd.max_episode_tokens}')
    return first, seq, stu, k, total, end

  with ThreadPoolExecutor(max(1, min(mt.max_workers, b))) as pool:
    for first, seq, stu, k, total, end in pool.map(one, range(b)):
      firsts.append(first), seqs.append(seq), stus.append(stu), n_turns.append(k)
      rewards.append(total), ends.append(end)
  prompts = mt.encoder.encode_batch(firsts)
  p = prompt_len or bucket(max(len(x) for x in prompts), mt.prompt_buckets)
  ids, pmask = left_pad(prompts, p, mt.pad_id)
  n = bd.max_episode_tokens
  tokens = np.full((b, n), mt.pad_id, np.int32)
  attn, smask = np.zeros((b, n), np.int32), np.zeros((b, n), np.int32)
  for i in range(b):
    k = len(seqs[i])
    tokens[i, :k], attn[i, :k], smask[i, :k] = seqs[i], 1, stus[i]
  return Episodes(ids, pmask, tokens, attn, smask, np.zeros((b, n), np.float32),
                  np.asarray(n_turns, np.int32), np.asarray(rewards, np.float32),
                  np.ones((b,), bool), ends, [None] * b, [[t for t in x] for x in turns],
                  np.zeros((b,), np.int32))


def _check_step(res, env_name, record):
  if not (isinstance(res, tuple) and len(res) == 3):
    raise ValueError(f'environment {env_name!r}: step() must return (observation | None, done, '
                     f'reward), got {res!r:.200} (record {record.id!r})')
  obs, done, r = res
  r = float(r)
  if not math.isfinite(r):
    raise ValueError(f'environment {env_name!r} returned reward {r} for record {record.id!r}')
  return obs, bool(done), r


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def evaluate(mt: MultiTurnSampler, *, key, params, records, batch_size: int, temperature: float,
             top_k: int = 0, top_p: float = 1.0, kl_fn=None, teachers=(),
             base: dict | None = None, n_single: int = 0) -> dict[str, float]:
  """Held-out episodes: greedy ones give `eval/accuracy/<tag>` (the mean episode reward) and
  `eval/agent/...` turn statistics; with `kl_fn`, episodes sampled at the rollout's policy
  give `eval/agent/reverse_kl[/teacher]` on student tokens. `base` holds the single-turn
  evaluation of `n_single` other records: `eval/accuracy` becomes the mean over both."""
  out = dict(base or {})
  if not records:
    return out
  eps, tags = [], []
  for lo in range(0, len(records), batch_size):
    chunk = records[lo:lo + batch_size]
    eps.append(mt(params, chunk, jax.random.fold_in(key, lo), temperature=0.0))
    tags += [r.tag for r in chunk]
  reward = np.concatenate([e.reward for e in eps])
  tags_a = np.asarray(tags)
  for t in sorted(set(tags)):
    out[f'eval/accuracy/{t}'] = float(reward[tags_a == t].mean())
  acc_single = out.get('eval/accuracy')
  out['eval/accuracy'] = float((reward.sum() + (acc_single or 0.0) * n_single) /
                               (len(reward) + (n_single if acc_single is not None else 0)))
  merged = {}
  for e, lo in zip(eps, range(0, len(records), batch_size)):
    for k, v in e.metrics(tags[lo:lo + batch_size], prefix='eval/agent').items():
      merged.setdefault(k, []).append((v, len(e.turns)))
  for k, vs in merged.items():
    tot = sum(w for _, w in vs)
    out[k] = (float(sum(v * w for v, w in vs) / tot) if not k.endswith(('errors', 'full',
              'truncated')) else float(sum(v for v, _ in vs)))
  if kl_fn is not None and teachers:
    sums = np.zeros(len(teachers))
    counts = np.zeros(len(teachers))
    for lo in range(0, len(records), batch_size):
      chunk = records[lo:lo + batch_size]
      ep = mt(params, chunk, jax.random.fold_in(jax.random.fold_in(key, 10**6), lo),
              temperature=temperature, top_k=top_k, top_p=top_p)
      mult = 1 if mt.mesh is None else shd.batch_size_multiple(mt.mesh)
      rows = batch_bucket(len(chunk), mult)
      tokens, attn, lmask, s_b = ep.arrays(mt.mesh, rows=rows)
      tags_c = [r.tag for r in chunk]
      kl_sum, cnt = kl_fn(tokens, attn, lmask, s_b, tags_c + tags_c[:1] * (rows - len(chunk)))
      sums += np.asarray(kl_sum).sum(-1)
      counts += np.asarray(cnt).sum(-1)
    for j, t in enumerate(teachers):
      if counts[j]:
        out[f'eval/agent/reverse_kl/{t.name}'] = float(sums[j] / counts[j])
    if counts.sum():
      out['eval/agent/reverse_kl'] = float(sums.sum() / counts.sum())
  return out


__all__ = ['Budgets', 'Episodes', 'MultiTurnSampler', 'ObservationFormat', 'evaluate',
           'replay']
