"""On-policy distillation into a LoRA student: Qwen3-1.7B + rank-32 adapters <- Qwen3-8B, math.

  python -m opd_jax.train --config configs/opd_lora.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B --config.teachers.teacher.model=/ckpt/Qwen3-8B \
      --config.data.train.math=/data/math_train.jsonl --config.data.eval.math=/data/math_eval.jsonl

opd_single_teacher with `config.student.lora` on (tinker's default for OPD; the Thinking
Machines LoRA write-up finds LoRA learns less and forgets less): adapters of rank 32 on all
seven projections of every layer (q/k/v/o/gate/up/down_proj), scale alpha / r = 1, trained
with AdamW at 10x the full fine-tuning recipe's learning rate (that write-up's rule of
thumb). Only the adapters (34.9M, 2% of the parameters) are trained and held in the
optimizer state; the base stays frozen in bfloat16 (the compute dtype), sharded as before.
The rollout samples from the merged weights W + (alpha / r) B A (docs/design.md §9). The
export writes the merged checkpoint to workdir/export/ and the PEFT adapter to
workdir/export/adapter/ (peft.PeftModel.from_pretrained(base, that directory)).

  python -m opd_jax.aot --config configs/opd_lora.py --topology v5e-16   # memory per chip
  python -m opd_jax.train --config configs/opd_lora.py:runlocal --workdir /tmp/opd_lora

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
  c.student.lora.rank = 32
  c.student.lora.alpha = 32.0
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
  c.optim.lr = 1e-5
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
    c.student.lora.rank = 4
    c.student.lora.alpha = 8.0
    c.rollout.n_samples = 2
    c.batch.micro_batches = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
