"""Mixed RL + OPD (ROLL's use_opd, slime with a reward): GRPO advantages from verifiable
math rewards plus the teacher's per-token reverse-KL term, A = A_grpo - 0.5 * KL_teacher.

  python -m opd_jax.train --config configs/opd_mixed_grpo.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B --config.teachers.teacher.model=/ckpt/Qwen3-8B \
      --config.data.train.math=/data/math_train.jsonl --config.data.eval.math=/data/math_eval.jsonl

8 samples per prompt form a GRPO group (rewards normalised within the group), PPO clip
0.2 / 0.28 (clip-higher), 4 optimizer steps per rollout batch. Sized for a v5e-16 slice like
opd_single_teacher. The plain RL baseline is the same recipe without the teacher:
  --config.rl.use_opd=False
(the teacher then only reports eval/reverse_kl). Expect reward/mean to rise faster than
the RL baseline early on, with reverse KL falling as with pure OPD.

  python -m opd_jax.train --config configs/opd_mixed_grpo.py:runlocal --workdir /tmp/mix
"""

from opd_jax.config_lib import base_config, lock, teacher


def get_config(arg=None):
  c = base_config()
  c.total_steps = 300
  c.eval_every = 25
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = '/ckpt/Qwen3-1.7B'
  c.student.compute_dtype = 'bfloat16'
  c.teachers.teacher = teacher('/ckpt/Qwen3-8B', kl_coef=0.5, tags=[], dtype='bfloat16')
  c.data.train = dict(math='/data/math_train.jsonl')
  c.data.eval = dict(math='/data/math_eval.jsonl')
  c.data.template = 'qwen3_no_think'
  c.data.max_prompt_len = 1024
  c.rollout.prompts_per_step = 32
  c.rollout.n_samples = 8
  c.rollout.max_new_tokens = 4096
  c.rl.estimator = 'grpo'
  c.rl.tag_to_reward = dict(math='math')
  c.loss.clip_eps = 0.2
  c.loss.clip_eps_high = 0.28
  c.loss.aggregation = 'token-mean'
  c.batch.mini_batches = 4
  c.batch.micro_batches = 4
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10

  if arg == 'runlocal':
    from configs import _local
    c.data.train = dict(math=_local.sample('math_train'))
    c.data.eval = dict(math=_local.sample('math_eval'))
    _local.shrink(c)
    c.rollout.prompts_per_step = 8
    c.rollout.n_samples = 2
    c.batch.mini_batches = 2
    c.batch.micro_batches = 1
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
