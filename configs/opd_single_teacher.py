"""On-policy distillation from one teacher: Qwen3-1.7B student <- Qwen3-8B teacher, math.

  python -m opd_jax.train --config configs/opd_single_teacher.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B --config.teachers.teacher.model=/ckpt/Qwen3-8B \
      --config.data.train.math=/data/math_train.jsonl --config.data.eval.math=/data/math_eval.jsonl

Sized for a TPU v5e-16 slice (16 chips x 16 GiB HBM), mesh fsdp=16 (see launch/):
  student 1.7B: fp32 params + AdamW moments + grads = 16 B/param = 27 GiB -> 1.7 GiB/chip;
  teacher 8B in bf16 = 15 GiB -> 0.95 GiB/chip; the rest is activations and KV cache
  (64 prompts x 4 samples x (1k prompt + 4k response) tokens, bf16 compute, remat).
  `python -m opd_jax.tools.aot --config configs/opd_single_teacher.py --topology v5e-16` (XLA:TPU
  through libtpu, no TPU needed) puts the step's peak at 15.11 GiB per chip, in the rollout,
  whose bf16 KV cache alone is 8.75 GiB/chip; launch/README.md has the table.
Pure OPD (tinker / ROLL is_pure_opd): A = -kl_coef * (s_b - t), importance-sampled policy
loss, one optimizer step per rollout batch. Expect the reverse KL to the teacher to fall
steadily over the first ~100 steps and held-out accuracy to approach the teacher's.

  python -m opd_jax.train --config configs/opd_single_teacher.py:runlocal --workdir /tmp/opd

runs the same loop for 2 steps on CPU with tiny random models and data/samples/.
"""

from opd_jax.config_lib import base_config, lock, teacher


def get_config(arg=None):
  c = base_config()
  c.total_steps = 200
  c.log_every = 1
  c.eval_every = 25
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = '/ckpt/Qwen3-1.7B'
  c.student.compute_dtype = 'bfloat16'
  c.teachers.teacher = teacher('/ckpt/Qwen3-8B', kl_coef=1.0, tags=[], dtype='bfloat16')
  c.data.train = dict(math='/data/math_train.jsonl')
  c.data.eval = dict(math='/data/math_eval.jsonl')
  c.data.template = 'qwen3_no_think'
  c.data.max_prompt_len = 1024
  c.rollout.prompts_per_step = 64
  c.rollout.n_samples = 4
  c.rollout.max_new_tokens = 4096
  c.rollout.temperature = 1.0
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
    c.data.template = 'default'
    _local.shrink(c)
    c.rollout.n_samples = 2
    c.batch.micro_batches = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
