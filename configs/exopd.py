"""ExOPD: G-OPD (Learning beyond Teacher, arXiv 2602.12125) with reward extrapolation.

  A = λ (t - r) - (s_b - r),   λ = config.gopd.reward_scale = 1.25

with r the logprob under a frozen reference model: the student's initial weights by default
(config.gopd.reference='student_init'), or the teacher's pre-RL base model for "reward
correction" (--config.gopd.reference=/ckpt/Qwen3-8B-Base). λ = 1 is exactly pure OPD.

  python -m opd_jax.train --config configs/exopd.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B --config.teachers.teacher.model=/ckpt/Qwen3-8B \
      --config.data.train.math=/data/math_train.jsonl --config.data.eval.math=/data/math_eval.jsonl

Sized like opd_single_teacher (v5e-16) plus one more frozen 1.7B model (the reference).

  python -m opd_jax.train --config configs/exopd.py:runlocal --workdir /tmp/exopd
"""

from opd_jax.config_lib import base_config, lock, teacher


def get_config(arg=None):
  c = base_config()
  c.total_steps = 200
  c.eval_every = 25
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = '/ckpt/Qwen3-1.7B'
  c.student.compute_dtype = 'bfloat16'
  c.teachers.teacher = teacher('/ckpt/Qwen3-8B', kl_coef=1.0, tags=[], dtype='bfloat16')
  c.gopd.enabled = True
  c.gopd.reward_scale = 1.25
  c.gopd.reference = 'student_init'
  c.data.train = dict(math='/data/math_train.jsonl')
  c.data.eval = dict(math='/data/math_eval.jsonl')
  c.data.template = 'qwen3_no_think'
  c.data.max_prompt_len = 1024
  c.rollout.prompts_per_step = 64
  c.rollout.n_samples = 4
  c.rollout.max_new_tokens = 4096
  c.rl.tag_to_reward = dict(math='math')
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.batch.micro_batches = 8

  if arg == 'runlocal':
    from configs import _local
    c.data.train = dict(math=_local.sample('math_train'))
    c.data.eval = dict(math=_local.sample('math_eval'))
    _local.shrink(c)
    c.rollout.n_samples = 2
    c.batch.micro_batches = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
