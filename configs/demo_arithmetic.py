"""The CPU demo: on-policy distillation fixes a student's systematic mistake.

  python -m opd_jax.tools.demo --workdir runs/demo        # every stage, ~3 min on a 2-core CPU

Task (opd_jax/tasks/arithmetic.py): 3-digit addition written out column by column,
"583+767" -> "3+7+0=10\\n8+6+1=15\\n5+7+1=13\\n#### 1350", checked by exact match.

Stages (this recipe with a stage argument; `python -m opd_jax.tools.demo` chains them and fills in
the data and model paths):
  :teacher   SFT of a 3-layer, 96-wide Qwen3 on clean solutions (reaches ~100%).
  :student   SFT of a smaller 2-layer, 64-wide Qwen3 on a noisier dataset in which half the
             solutions forget their carries: it learns the format and the digit lookup but
             carries only some of the time (~65% held-out accuracy).
  :opd       pure OPD of that student against the teacher: the student samples, the teacher
             scores every token, A = -(s_b - t), importance-sampled policy loss.
  :sft_more  the off-policy baseline: the same student, same steps, batch and learning rate,
             trained by SFT on the clean dataset (what the teacher would write).

e.g. python -m opd_jax.train --config configs/demo_arithmetic.py:opd --workdir runs/demo/opd \\
       --config.student.model=runs/demo/student/export \\
       --config.teachers.teacher.model=runs/demo/teacher/export \\
       --config.data.train.arith=runs/demo/data/train.jsonl \\
       --config.data.eval.arith=runs/demo/data/eval.jsonl

Measured numbers and curves: docs/demo.md.
"""

from opd_jax.config_lib import base_config, lock, teacher

TEACHER_MODEL = 'tiny:qwen3:hidden_size=96,num_layers=3,num_heads=4,num_kv_heads=2,seed=11'
STUDENT_MODEL = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=12'


def get_config(arg='opd'):
  c = base_config()
  c.seed = 0
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.remat = False  # tiny models: recomputation costs more than it saves
  c.data.train = dict(arith='runs/demo/data/train.jsonl')
  c.data.eval = dict(arith='runs/demo/data/eval.jsonl')
  c.data.max_prompt_len = 64
  c.rl.tag_to_reward = dict(arith='exact_match')
  c.rollout.max_new_tokens = 48
  c.eval.num_prompts = 256
  c.eval.batch_size = 256
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.log_every = 25
  c.optim.grad_clip = 1.0

  if arg == 'teacher':
    c.mode = 'sft'
    c.student.model = TEACHER_MODEL
    c.total_steps = 450
    c.sft.batch_size = 32
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.schedule = 'cosine'
    c.eval.reverse_kl = False
  elif arg == 'student':
    c.mode = 'sft'
    c.student.model = STUDENT_MODEL
    c.data.train = dict(arith='runs/demo/data/noisy_train.jsonl')
    c.total_steps = 600
    c.sft.batch_size = 32
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = 'cosine'
    c.teachers.teacher = teacher('runs/demo/teacher/export')  # eval reverse KL only
    c.rl.use_opd = False
  elif arg in ('opd', 'sft_more'):
    c.student.model = 'runs/demo/student/export'
    c.teachers.teacher = teacher('runs/demo/teacher/export', kl_coef=1.0)
    c.total_steps = 100
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.schedule = 'constant'
    c.eval_every = 25
    c.eval_at_start = True
    c.log_every = 5
    if arg == 'opd':
      c.mode = 'opd'
      c.rollout.prompts_per_step = 64
      c.rollout.temperature = 1.0
    else:
      c.mode = 'sft'
      c.sft.batch_size = 64
      c.rl.use_opd = False
  else:
    raise ValueError(f'unknown stage {arg!r}; known: teacher, student, opd, sft_more')
  return lock(c)
