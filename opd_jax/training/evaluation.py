"""Held-out evaluation: accuracy and pass@k under verifiable rewards, reverse KL to the
teachers on the student's own samples, and a few decoded samples for TensorBoard.

Legend (docs/design.md §7): Q eval prompts, G samples per prompt (pass@k), N new tokens.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import jax
import numpy as np

from opd_jax import rewards as rewards_lib
from opd_jax import sharding as shd
from opd_jax.data import Record, record_dict
from opd_jax.rollout.decode import SamplingParams
from opd_jax.rollout.engine import decode_responses, rollout_arrays


@dataclasses.dataclass
class EvalSettings:
  batch_size: int = 64
  max_new_tokens: int = 256
  stop_ids: tuple[int, ...] = ()
  temperature: float = 1.0          # for pass@k and reverse-KL samples (greedy for accuracy)
  top_k: int = 0                    # reverse-KL samples: the rollout's truncation, so that the
  top_p: float = 1.0                # KL is that of the policy being trained (design §3.2)
  pass_k_temperature: float | None = None  # pass@k samples only (None: temperature)
  pass_k: tuple[int, ...] = ()      # e.g. (1, 4): n = max(k) samples per prompt
  reverse_kl: bool = True
  num_text_samples: int = 4


def _chunks(seq, n):
  for i in range(0, len(seq), n):
    yield seq[i:i + n]


def _global_tags(local_tags, rows_per_process: int, tag_vocab: Sequence[str]) -> list[str]:
  """The tags of a global batch whose rows are each process's rows (padded) in turn."""
  if jax.process_count() == 1:
    return list(local_tags)
  index = {t: i for i, t in enumerate(tag_vocab)}
  codes = [index[t] for t in local_tags] + [0] * (rows_per_process - len(local_tags))
  gathered = shd.allgather_host(np.asarray(codes, np.int32)).reshape(-1)
  return [tag_vocab[c] for c in gathered]


def evaluate(*, step: int, key, student_params, sampler, encoder, tokenizer,
             records: Sequence[Record], settings: EvalSettings, tag_to_reward=None,
             default_reward=None, teachers=(), kl_fn=None, writer=None,
             tag_vocab: Sequence[str] = ()) -> dict[str, float]:
  """Runs the evaluation on this process's `records`; returns global metrics.

  `kl_fn(tokens, attn, loss_mask, s_b, tags) -> (kl_row_sums [J, B], counts [J, B])` scores
  student samples with the teachers (the trainer passes its own routed scoring). On several
  processes every process passes the same number of records, and `tag_vocab` lists every
  tag of the whole evaluation set (tags travel between processes as indices into it).
  """
  metrics: dict[str, float] = {}
  if not records:
    return metrics
  tags = [r.tag for r in records]
  prompts = encoder.encode_batch(records)
  keep = [i for i, p in enumerate(prompts) if p is not None]
  records = [records[i] for i in keep]
  prompts = [prompts[i] for i in keep]
  tags = [tags[i] for i in keep]
  greedy = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0,
                          stop_ids=settings.stop_ids)
  texts: list[str] = []
  lengths: list[float] = []
  for idx in _chunks(list(range(len(records))), settings.batch_size):
    out = sampler(student_params, [prompts[i] for i in idx], jax.random.fold_in(key, idx[0]),
                  greedy)
    texts += decode_responses(tokenizer, out.host_rows(out.tokens), out.host_rows(out.mask))
    lengths += out.host_rows(out.mask).sum(-1).astype(np.float32).tolist()
  all_len = shd.allgather_rows(np.asarray(lengths, np.float32))
  len_tags = np.asarray(_global_tags(tags, len(tags), tag_vocab))
  metrics['eval/response_len'] = float(all_len.mean())  # greedy response tokens
  for t in sorted(set(len_tags.tolist())):
    metrics[f'eval/response_len/{t}'] = float(all_len[len_tags == t].mean())

  if tag_to_reward or default_reward:
    rew = rewards_lib.compute_rewards(texts, [record_dict(r) for r in records],
                                      dict(tag_to_reward or {}), default=default_reward)
    all_rew = shd.allgather_rows(np.asarray(rew, np.float32))
    all_tags = np.asarray(_global_tags(tags, len(tags), tag_vocab))
    metrics['eval/accuracy'] = float(all_rew.mean())
    for t in sorted(set(all_tags.tolist())):
      metrics[f'eval/accuracy/{t}'] = float(all_rew[all_tags == t].mean())

    if settings.pass_k:
      n = max(settings.pass_k)
      temp = (settings.temperature if settings.pass_k_temperature is None
              else settings.pass_k_temperature)
      sp = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=temp,
                          stop_ids=settings.stop_ids)
      per_prompt = np.zeros((len(records), n), np.float32)
      for s in range(n):
        texts_s = []
        for idx in _chunks(list(range(len(records))), settings.batch_size):
          out = sampler(student_params, [prompts[i] for i in idx],
                        jax.random.fold_in(jax.random.fold_in(key, 1 + s), idx[0]), sp)
          texts_s += decode_responses(tokenizer, out.host_rows(out.tokens),
                                      out.host_rows(out.mask))
        per_prompt[:, s] = rewards_lib.compute_rewards(
            texts_s, [record_dict(r) for r in records], dict(tag_to_reward or {}),
            default=default_reward)
      per_prompt = shd.allgather_rows(per_prompt)
      for k in settings.pass_k:
        for name, v in rewards_lib.pass_at_k_by_tag(list(all_tags), per_prompt >= 1.0,
                                                     k).items():
          metrics[name] = float(v)

  if settings.reverse_kl and teachers and kl_fn is not None:
    sp = SamplingParams(max_new_tokens=settings.max_new_tokens,
                        temperature=settings.temperature, top_k=settings.top_k,
                        top_p=settings.top_p, stop_ids=settings.stop_ids)
    sums = defaultdict(float)
    counts = defaultdict(float)
    for idx in _chunks(list(range(len(records))), settings.batch_size):
      out = sampler(student_params, [prompts[i] for i in idx],
                    jax.random.fold_in(jax.random.fold_in(key, 10**6), idx[0]), sp)
      tokens, attn, lmask, s_b = rollout_arrays(out)
      rows_per_process = tokens.shape[0] // jax.process_count()
      kw = {}
      if any(getattr(t, 'counts_own_tokens', False) for t in teachers):
        # a cross-tokenizer teacher renders the records in its own chat template
        if jax.process_count() > 1:
          raise NotImplementedError('held-out reverse KL of a cross-tokenizer teacher on '
                                    'several processes (set eval.reverse_kl=False)')
        kw['records'] = [records[i] for i in idx]
        kw['records'] += kw['records'][:1] * (tokens.shape[0] - len(idx))
      kl_sum, cnt = kl_fn(tokens, attn, lmask, s_b,
                          _global_tags([tags[i] for i in idx], rows_per_process, tag_vocab),
                          **kw)
      for j, t in enumerate(teachers):
        sums[t.name] += float(kl_sum[j].sum())
        counts[t.name] += float(cnt[j].sum())
    # kl_fn already returns global sums (every process scored the same global batches)
    tot_s = np.asarray([sums[t.name] for t in teachers])
    tot_c = np.asarray([counts[t.name] for t in teachers])
    for j, t in enumerate(teachers):
      if tot_c[j]:
        metrics[f'eval/reverse_kl/{t.name}'] = float(tot_s[j] / tot_c[j])
    if tot_c.sum():
      metrics['eval/reverse_kl'] = float(tot_s.sum() / tot_c.sum())

  if writer is not None:
    lines = []
    for r, text in list(zip(records, texts))[:settings.num_text_samples]:
      prompt = r.messages[-1]['content']
      lines.append(f'**{r.id}** ({r.tag}) `{prompt!r}` → `{text!r}`'
                   f' (ground truth `{r.ground_truth!r}`)')
    writer.text(step, 'eval/samples', '\n\n'.join(lines))
  return metrics
