"""On-policy distillation from a teacher with another tokenizer: Qwen3-1.7B student <-
Llama-3.1-8B-Instruct teacher, math (docs/design.md §12).

  python -m opd_jax.train --config configs/opd_cross_tokenizer.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B \
      --config.teachers.teacher.model=/ckpt/Llama-3.1-8B-Instruct \
      --config.data.train.math=/data/math_train.jsonl --config.data.eval.math=/data/math_eval.jsonl

`cross_tokenizer=True` lets the teacher's tokenizer differ from the student's (without it the
run stops with VocabMismatchError). Each sampled response is decoded to text, rendered after
the record's prompt in the teacher's own chat template, re-tokenized by the teacher and
scored; the teacher's per-token logprobs are attributed to the student token in which each
teacher token ends (summed), so the advantage A = -kl_coef * (s_b - t~) is per student token
as in configs/opd_single_teacher.py. Exact where the token boundaries coincide; across a
teacher token that spans several student tokens, its whole logprob lands on the last of
them (the response's total is exact). No full-vocabulary / top-k term (loss.full_vocab is a
ConfigError with this teacher). Sized like opd_single_teacher (v5e-16, mesh fsdp=16); the
host re-tokenizes every row, which is cheap next to the teacher's forward.

  python -m opd_jax.train --config configs/opd_cross_tokenizer.py:runlocal --workdir /tmp/xtok

runs 2 steps on CPU: a char-level tiny student and a tiny Llama teacher whose byte-level BPE
(384 tokens, Llama-3-style chat template) is trained on first use by the `tokenizers`
library (`tiny:...,bpe=384`, opd_jax/models/tiny.py; no hub).
"""

from opd_jax.config_lib import base_config, lock, teacher

TINY_BPE_TEACHER = 'tiny:llama:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=1,bpe=384'


def get_config(arg=None):
  c = base_config()
  c.total_steps = 200
  c.log_every = 1
  c.eval_every = 25
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = '/ckpt/Qwen3-1.7B'
  c.student.compute_dtype = 'bfloat16'
  c.teachers.teacher = teacher('/ckpt/Llama-3.1-8B-Instruct', kl_coef=1.0, tags=[],
                               dtype='bfloat16', cross_tokenizer=True)
  c.data.train = dict(math='/data/math_train.jsonl')
  c.data.eval = dict(math='/data/math_eval.jsonl')
  c.data.template = 'default'
  c.data.max_prompt_len = 1024
  c.rollout.prompts_per_step = 64
  c.rollout.n_samples = 4
  c.rollout.max_new_tokens = 4096
  c.rl.tag_to_reward = dict(math='math')  # for eval accuracy; the training signal is OPD only
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.batch.micro_batches = 8
  c.eval.num_prompts = 500
  c.eval.batch_size = 128
  c.checkpoint.every = 25

  if arg == 'runlocal':
    from configs import _local
    c.data.train = dict(math=_local.sample('math_train'))
    c.data.eval = dict(math=_local.sample('math_eval'))
    _local.shrink(c)
    c.teachers.teacher.model = TINY_BPE_TEACHER
    c.rollout.n_samples = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
