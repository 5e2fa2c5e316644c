"""The scoring wire protocol, once for the client (`remote.RemoteTeacher`) and the server
(`server`): the requests and responses of SGLang's `/generate` and vLLM's `/v1/completions`
used to score given token ids. Pure Python and numpy; no HTTP, no JAX.

  'sglang'  POST /generate {"input_ids": [ids] | [[ids], ...], "sampling_params":
            {"max_new_tokens": 0, "temperature": T}, "return_logprob": true,
            "logprob_start_len": S, "top_logprobs_num": K}
            -> {"text": "", "output_ids": [], "meta_info": {"input_token_logprobs":
            [[logprob, token_id, null], ...], "input_top_logprobs": [...], ...}}, a list of
            those for a batch input. Entry i is position S + i; position 0 has no context, so
            its logprob (and its top list) is null, as in SGLang. K = 0 omits
            input_top_logprobs.
  'vllm'    POST /v1/completions {"prompt": [ids] | [[ids], ...], "max_tokens": 0|1,
            "prompt_logprobs": K} -> choices[i].prompt_logprobs = [null, {"<id>": {"logprob",
            "rank", "decoded_token"}}, ...] (the actual token and the top K). vLLM's prompt
            logprobs are untempered, so this protocol scores at temperature 1.

Client side: `request` (path and body) and `parse_response` (one answer -> per-position
arrays). Server side: `parse_generate` / `parse_completions` (a body -> what to score, or
`BadRequest` naming the field) and `generate_response` / `completions_response`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

PROTOCOLS = ('sglang', 'vllm')
PATHS = {'sglang': '/generate', 'vllm': '/v1/completions'}


class BadRequest(ValueError):
  """A client error: HTTP 400 with this message."""


class MalformedAnswer(ValueError):
  """A server's answer that does not follow the protocol (the message says where)."""


# ------------------------------------------------------------------------------ client
def request(protocol: str, ids: list[int], *, temperature: float, top_k: int,
            model_id: str | None = None) -> tuple[str, dict]:
  """(path, body) of the request that scores `ids` (with the top `top_k` per position)."""
  if protocol == 'sglang':
    body = dict(input_ids=ids, return_logprob=True, logprob_start_len=0,
                sampling_params=dict(max_new_tokens=0, temperature=temperature))
    if top_k:
      body['top_logprobs_num'] = top_k
    return PATHS['sglang'], body
  body = dict(prompt=ids, max_tokens=1, prompt_logprobs=top_k, temperature=1.0)
  if model_id:
    body['model'] = model_id
  return PATHS['vllm'], body


def parse_response(protocol: str, ids: list[int], ans, *, top_k: int, where: str) -> dict:
  """{'logprobs' [n], 'top_logprobs' [n, K], 'top_ids' [n, K]} from one answer to `request`;
  MalformedAnswer (its message starting with `where`) otherwise."""
  n, k = len(ids), top_k
  lp = np.zeros((n,), np.float32)
  top_lp, top_ids = np.zeros((n, k), np.float32), np.zeros((n, k), np.int32)
  try:
    if protocol == 'sglang':
      meta = (ans[0] if isinstance(ans, list) else ans)['meta_info']
      entries, tops = meta['input_token_logprobs'], meta.get('input_top_logprobs')
      if len(entries) != n:
        raise MalformedAnswer(f'{where}: {len(entries)} input_token_logprobs for {n} tokens')
      for t, (logprob, tid, *_) in enumerate(entries):
        if tid != ids[t]:
          raise MalformedAnswer(f'{where}: token id {tid} at position {t}, sent {ids[t]}')
        lp[t] = 0.0 if logprob is None else logprob
        if k and t and tops and tops[t]:
          row = sorted(tops[t], key=lambda e: -e[0])[:k]
          top_lp[t, :len(row)] = [e[0] for e in row]
          top_ids[t, :len(row)] = [e[1] for e in row]
    else:
      entries = ans['choices'][0]['prompt_logprobs']
      if len(entries) != n:
        raise MalformedAnswer(f'{where}: {len(entries)} prompt_logprobs for {n} tokens')
      for t, entry in enumerate(entries):
        if t == 0 or entry is None:
          continue
        lp[t] = entry[str(ids[t])]['logprob']
        if k:
          row = sorted((v['rank'], int(tid), v['logprob']) for tid, v in entry.items()
                       if v.get('rank') is not None and v['rank'] <= k)[:k]
          top_lp[t, :len(row)] = [e[2] for e in row]
          top_ids[t, :len(row)] = [e[1] for e in row]
  except MalformedAnswer:
    raise
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise MalformedAnswer(f'{where} ({type(e).__name__}: {e}) for protocol '
                          f'{protocol!r}: {str(ans)[:300]}') from None
  return {'logprobs': lp, 'top_logprobs': top_lp, 'top_ids': top_ids}


# ------------------------------------------------------------------------------ server
Sequences = Callable[[object, str], tuple[list[np.ndarray], bool]]


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  """What a request asks to score: the sequences (validated by the server's `sequences`),
  whether they came as a batch, the temperature, the first position reported and top K."""
  seqs: list[np.ndarray]
  batched: bool
  temperature: float
  start: int
  top_k: int


def field(body: dict, name: str, kind, default, where: str):
  """body[name] of type `kind` (an int is accepted as a float), `default` when absent or
  null; BadRequest naming `where.name` otherwise."""
  value = body.get(name, default)
  if value is None:
    return default
  if kind is float and type(value) is int:
    value = float(value)
  if type(value) is not kind:
    raise BadRequest(f'{where}.{name}: expected {kind.__name__}, got {value!r}')
  return value


def parse_generate(body: dict, sequences: Sequences) -> ScoreRequest:
  """SGLang's /generate, scoring only; `sequences(value, where)` validates the token ids."""
  if 'input_ids' not in body:
    raise BadRequest('missing field input_ids (this server scores token ids; text is not '
                     'accepted)')
  seqs, batched = sequences(body['input_ids'], 'input_ids')
  sp = body.get('sampling_params') or {}
  if not isinstance(sp, dict):
    raise BadRequest(f'sampling_params: expected an object, got {sp!r}')
  if field(sp, 'max_new_tokens', int, 0, 'sampling_params') != 0:
    raise BadRequest('sampling_params.max_new_tokens must be 0: this server only scores')
  temperature = field(sp, 'temperature', float, 1.0, 'sampling_params')
  if temperature < 0:
    raise BadRequest(f'sampling_params.temperature={temperature} must be >= 0')
  if not field(body, 'return_logprob', bool, False, 'request'):
    raise BadRequest('return_logprob must be true: this server only returns logprobs')
  if body.get('stream'):
    raise BadRequest('stream is not supported')
  start = field(body, 'logprob_start_len', int, 0, 'request')
  start = 0 if start == -1 else start  # SGLang's "unset"
  top_k = field(body, 'top_logprobs_num', int, 0, 'request')
  for i, s in enumerate(seqs):
    if not 0 <= start < len(s):
      raise BadRequest(f'logprob_start_len={start} must be in [0, {len(s)}) for input {i}')
  return ScoreRequest(seqs, batched, temperature, start, top_k)


def generate_response(req: ScoreRequest, results: Sequence[dict]):
  """The /generate answer (one object, or a list for a batch input) from the scores."""
  seqs, start, top_k = req.seqs, req.start, req.top_k
  outs = []
  for s, r in zip(seqs, results):
    lp = r['logprobs'].tolist()
    meta = dict(prompt_tokens=len(s), completion_tokens=0, cached_tokens=0,
                finish_reason=dict(type='length', length=0), output_token_logprobs=[],
                input_token_logprobs=[[None if t == 0 else lp[t], int(s[t]), None]
                                      for t in range(start, len(s))])
    if top_k:
      tl, ti = r['top_logprobs'].tolist(), r['top_ids'].tolist()
      meta['input_top_logprobs'] = [
          None if t == 0 else [[a, b, None] for a, b in zip(tl[t], ti[t])]
          for t in range(start, len(s))]
      meta['output_top_logprobs'] = []
    outs.append(dict(text='', output_ids=[], meta_info=meta))
  return outs if req.batched else outs[0]


def parse_completions(body: dict, sequences: Sequences) -> ScoreRequest:
  """vLLM's /v1/completions with prompt_logprobs, scoring only (temperature 1)."""
  if 'prompt' not in body:
    raise BadRequest('missing field prompt (token ids)')
  seqs, batched = sequences(body['prompt'], 'prompt')
  if field(body, 'max_tokens', int, 1, 'request') not in (0, 1):
    raise BadRequest('max_tokens must be 0 or 1: this server only scores the prompt')
  if body.get('prompt_logprobs') is None:
    raise BadRequest('prompt_logprobs must be set (0 for the actual tokens only, or K)')
  top_k = field(body, 'prompt_logprobs', int, 0, 'request')
  if body.get('stream'):
    raise BadRequest('stream is not supported')
  return ScoreRequest(seqs, batched, 1.0, 0, top_k)


def completions_response(req: ScoreRequest, results: Sequence[dict], model: str) -> dict:
  """The /v1/completions answer from the scores."""
  seqs, top_k = req.seqs, req.top_k
  choices = []
  for i, (s, r) in enumerate(zip(seqs, results)):
    lp = r['logprobs'].tolist()
    plp = [None]
    for t in range(1, len(s)):
      entry = {}
      if top_k:
        for rank, (a, b) in enumerate(zip(r['top_logprobs'][t].tolist(),
                                          r['top_ids'][t].tolist()), 1):
          entry[str(b)] = dict(logprob=a, rank=rank, decoded_token=None)
      # The actual token's rank is known only when it is in the top K (vLLM's Logprob.rank
      # is optional).
      entry.setdefault(str(int(s[t])), dict(logprob=lp[t], rank=None, decoded_token=None))
      plp.append(entry)
    choices.append(dict(index=i, text='', logprobs=None, finish_reason='length',
                        stop_reason=None, prompt_logprobs=plp, prompt_token_ids=s.tolist()))
  n = sum(len(s) for s in seqs)
  return dict(id=f'cmpl-{time.time_ns():x}', object='text_completion', created=int(time.time()),
              model=model, choices=choices,
              usage=dict(prompt_tokens=n, completion_tokens=0, total_tokens=n))
