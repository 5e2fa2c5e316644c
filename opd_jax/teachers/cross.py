"""A teacher with another tokenizer (`TeacherSpec.cross_tokenizer`), behind the same
`Teacher` interface: its `score` returns per-*student*-token logprobs already aligned, so
the advantage code and the update do not change (docs/design.md §12).

Per routed row: the student's response tokens (its loss-mask positions) are decoded to text;
the record's messages are rendered in the *teacher's* chat template (the same template name,
the teacher tokenizer's template) and the response text re-tokenized by the teacher
(`align.align_response`; a final student stop token becomes the teacher's end-of-turn
token). The teacher rows are laid out like the student's (left-padded prompt, response from
one column on) and scored by the wrapped teacher, in process (`LocalTeacher`) or served
(`RemoteTeacher`, which posts the teacher's ids), and the teacher's per-token logprobs are
mapped to student tokens by `align`'s rule. Prompt positions get 0 (the advantage reads the
response positions only).

Host work: decoding and re-tokenizing every routed row, and a device -> host -> device round
trip of the teacher's logprobs; so, unlike `LocalTeacher.score`, this call blocks.
"""

from __future__ import annotations

import logging

import numpy as np

from opd_jax import sharding as shd
from opd_jax.buckets import DEFAULT_PROMPT_BUCKETS, bucket
from opd_jax.data.templates import PromptEncoder
from opd_jax.teachers import align

log = logging.getLogger(__name__)


class ScoreContext:
  """What a cross-tokenizer teacher needs besides the student's token ids: each row's record
  (its `messages` and `tag`, for the teacher's chat template) and the loss mask [B, T] (the
  student's response positions)."""

  def __init__(self, records, loss_mask_BxT):
    self.records = list(records)
    self.loss_mask = loss_mask_BxT


class CrossTokenizerTeacher:
  """Wraps a teacher (`inner`, scoring the teacher's own token ids) for a student with
  another tokenizer. `template` / `tag_to_template`: the chat template names (data.template),
  rendered with the teacher tokenizer's chat template. `stop_ids`: the student's end-of-turn
  ids (mapped to `teacher_tokenizer.eos_token_id`).

  `last_seq_lens` [B] holds the teacher's own real tokens per row of the last `score` call
  (0 on unrouted rows), which the FLOP and token counts use; `alignment` the last call's
  student-token counts by kind (align.KINDS), `last_kinds` [B, T] each response position's
  kind (an index into align.KINDS; -1 elsewhere)."""

  counts_own_tokens = True

  def __init__(self, inner, *, student_tokenizer, teacher_tokenizer, stop_ids=(),
               template: str = 'default', tag_to_template=None):
    if int(getattr(inner, 'top_k', 0)):
      raise ValueError(f'teacher {inner.name!r}: a cross-tokenizer teacher has no top-k '
                       '(its vocabulary is not the student\'s)')
    self.inner = inner
    self.spec, self.name, self.cfg = inner.spec, inner.name, inner.cfg
    self.mesh = getattr(inner, 'mesh', None)
    self.top_k = 0
    self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
    self.stop_ids = tuple(int(s) for s in stop_ids)
    eos = teacher_tokenizer.eos_token_id
    self.teacher_stop_id = None if eos is None else int(eos)
    self.pad_id = int(teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id
                      is not None else (eos or 0))
    self.encoder = PromptEncoder(teacher_tokenizer, template=template,
                                 tag_to_template=tag_to_template, max_prompt_len=10**9)
    self.tokens_scored = 0
    self.last_seq_lens = self.last_kinds = None
    self.alignment = dict.fromkeys(align.KINDS, 0)

  @property
  def rows_forwarded(self):
    return self.inner.rows_forwarded

  def teacher_batch(self, tokens, lmask, rows, records):
    """(teacher ids [B, T'], mask [B, T'], response column P', alignments {row: RowAlignment},
    student response positions {row: [n]}) on the host. Rows not in `rows` are empty.

    The layout follows the student's: prompts left-padded to end at column P' - 1, responses
    from P', with P' and the response width the student's unless a teacher row needs more
    (then rounded up to a power of two, so few shapes compile)."""
    b, t = tokens.shape
    lm = lmask.astype(bool)
    cols = np.nonzero(lm.any(0))[0]
    p_s = int(cols[0]) if len(cols) else t
    prompts, aligns, positions = {}, {}, {}
    for r in rows:
      r = int(r)
      pos = np.nonzero(lm[r])[0]
      if len(pos) and not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
        raise ValueError(f'teacher {self.name!r}: row {r} has a response that is not '
                         'contiguous (multi-turn episodes are not supported with '
                         'cross_tokenizer)')
      positions[r] = pos
      aligns[r] = align.align_response(self.student_tokenizer, self.teacher_tokenizer,
                                       tokens[r, pos], stop_ids=self.stop_ids,
                                       teacher_stop_id=self.teacher_stop_id)
      prompts[r] = self.encoder.encode(records[r])
    longest_p = max((len(p) for p in prompts.values()), default=0)
    longest_n = max((len(a.teacher_ids) for a in aligns.values()), default=0)
    p_t = p_s if longest_p <= p_s else bucket(longest_p, DEFAULT_PROMPT_BUCKETS)
    n_s = t - p_s
    n_t = n_s if longest_n <= n_s else 1 << max(0, (longest_n - 1).bit_length())
    ids = np.full((b, p_t + n_t), self.pad_id, np.int32)
    mask = np.zeros((b, p_t + n_t), np.int32)
    for r in prompts:
      p, resp = prompts[r], aligns[r].teacher_ids
      ids[r, p_t - len(p):p_t] = p
      mask[r, p_t - len(p):p_t] = 1
      ids[r, p_t:p_t + len(resp)] = resp
      mask[r, p_t:p_t + len(resp)] = 1
    return ids, mask, p_t, aligns, positions

  def score(self, tokens_BxT, mask_BxT, rows: np.ndarray, *, out_sharding=None,
            context: ScoreContext | None = None):
    """As `Teacher.score`, aligned to the student's tokens: {'logprobs' [B, T]} on the
    response positions of `rows` (0 elsewhere), or None when `rows` is empty. Needs
    `context` (the rows' records and the loss mask). Blocks."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
      return None
    import jax
    if jax.process_count() > 1:
      raise NotImplementedError(f'teacher {self.name!r}: cross_tokenizer runs on one process '
                                'only (the teacher rows are built on the host)')
    if context is None:
      raise ValueError(f'teacher {self.name!r} (cross_tokenizer) needs the records of the '
                       'rows it scores (score_teachers(..., context=ScoreContext(...)))')
    tokens, lmask = shd.to_host(tokens_BxT), shd.to_host(context.loss_mask)
    b, t = tokens.shape
    if len(context.records) != b:
      raise ValueError(f'teacher {self.name!r}: {len(context.records)} records for a batch '
                       f'of {b} rows')
    ids, mask, p_t, aligns, positions = self.teacher_batch(tokens, lmask, rows,
                                                           context.records)
    out = self.inner.score(ids, mask, rows)
    lp = shd.to_host(out['logprobs'])
    result = np.zeros((b, t), np.float32)
    kinds = np.full((b, t), -1, np.int8)
    for r, a in aligns.items():
      m = len(a.teacher_ids)
      if len(positions[r]):
        result[r, positions[r]] = a.aligned(lp[r, p_t:p_t + m])
        kinds[r, positions[r]] = a.kinds()
    counts = np.bincount(kinds[kinds >= 0], minlength=len(align.KINDS))
    self.last_seq_lens = mask.sum(-1).astype(np.int64)
    self.last_kinds = kinds
    self.alignment = dict(zip(align.KINDS, (int(c) for c in counts)))
    return self._place({'logprobs': result}, out_sharding)

  def _place(self, out: dict, out_sharding):
    import jax
    import jax.numpy as jnp
    mesh = out_sharding.mesh if out_sharding is not None else self.mesh
    if mesh is None:
      return jax.tree.map(jnp.asarray, out)
    return {k: jax.device_put(v, shd.rows_sharding(mesh, v.shape[0], v.ndim))
            for k, v in out.items()}
