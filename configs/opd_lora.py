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

  python -m opd_jax.tools.aot --config configs/opd_lora.py --topology v5e-16   # memory per chip
  python -m opd_jax.train --config configs/opd_lora.py:runlocal --workdir /tmp/opd_lora

runs the same loop for 2 steps on CPU with tiny random models and data/samples/.
"""

from opd_jax.config_lib import lock


def get_config(arg=None):
  from configs import opd_single_teacher
  if arg not in (None, 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  c = opd_single_teacher.get_config(arg)
  c.unlock()
  if arg == 'runlocal':  # tiny models: a small rank, the shrunk recipe's learning rate
    c.student.lora.rank = 4
    c.student.lora.alpha = 8.0
  else:
    c.student.lora.rank = 32
    c.student.lora.alpha = 32.0
    c.optim.lr = 1e-5  # 10x the full recipe's 1e-6 (LoRA's rule of thumb)
  return lock(c)
