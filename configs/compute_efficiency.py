"""Compute efficiency of on-policy distillation vs RL and off-policy distillation, in
miniature (CPU): `python -m opd_jax.experiments.compute_efficiency --workdir W` chains
these stages and fills in the data and model paths.

Task (opd_jax/tasks/chain.py): chained arithmetic mod 10 written out step by step,
"7+5*3-9+4" -> "7+5=2\\n2*3=6\\n6-9=7\\n7+4=1\\n#### 1", checked by exact match.

Stages (`get_config('STAGE')`; `'STAGE,quick'` is the shrunk pipeline check):
  teacher      SFT of a 3x96 Qwen3 on the written solutions (600 steps x 32; ~90-100%).
  student      shorter SFT of a 2x64 Qwen3 on the same solutions (800 steps x 32, ~3x fewer
               parameters): mediocre (~35-40% held-out), with its own mistakes.
  opd          pure OPD from the student against the teacher (kl_coef 1).
  sft_teacher  off-policy distillation: SFT on responses sampled by the teacher (T=1).
  grpo         RL: GRPO on the exact-match reward, n_samples per prompt, no teacher.
  mixed        GRPO + the teacher's KL term (rl.use_opd).

The four methods share the student checkpoint, the prompts (same data files and seed), the
number of steps (METHOD_STEPS) and the number of training sequences per step
(ROWS_PER_STEP = 32: OPD 32 prompts x 1 sample, SFT 32 teacher samples, GRPO and mixed 8
prompts x GROUP=4 samples), i.e. the same sequence budget, and the learning-rate sweep LRS; the experiment picks each method's learning rate by its final
accuracy on the validation split (data.eval of a separate run is the held-out set).

e.g. python -m opd_jax.train --config configs/compute_efficiency.py:opd --workdir W/opd \\
       --config.student.model=W/student/export --config.teachers.teacher.model=W/teacher/export \\
       --config.data.train.chain=W/data/train.jsonl --config.data.eval.chain=W/data/eval.jsonl
"""

from opd_jax.config_lib import base_config, lock, teacher

TEACHER_MODEL = 'tiny:qwen3:hidden_size=96,num_layers=3,num_heads=4,num_kv_heads=2,seed=11'
STUDENT_MODEL = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=12'
QUICK_TEACHER = 'tiny:qwen3:hidden_size=48,num_layers=2,num_heads=4,num_kv_heads=2,seed=11'
QUICK_STUDENT = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=12'

METHODS = ('opd', 'sft_teacher', 'grpo', 'mixed')
LRS = (3e-4, 1e-3, 3e-3)
QUICK_LRS = (1e-3,)
ROWS_PER_STEP = 32       # training sequences per step, every method
GROUP = 4                # GRPO samples per prompt (8 prompts x 4 samples = 32 rows)
METHOD_STEPS = 250
EVAL_EVERY = 25


def get_config(arg='opd'):
  stage, _, flag = arg.partition(',')
  quick = flag == 'quick'
  c = base_config()
  c.seed = 0
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.remat = False
  c.data.train = dict(chain='runs/ce/data/train.jsonl')
  c.data.eval = dict(chain='runs/ce/data/eval.jsonl')
  c.data.max_prompt_len = 64
  c.rl.tag_to_reward = dict(chain='exact_match')
  c.rollout.max_new_tokens = 40
  c.eval.num_prompts = 256
  c.eval.batch_size = 256
  c.eval.reverse_kl = False
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.log_every = 25
  c.optim.grad_clip = 1.0

  if stage == 'teacher':
    c.mode = 'sft'
    c.student.model = QUICK_TEACHER if quick else TEACHER_MODEL
    c.total_steps = 40 if quick else 600
    c.sft.batch_size = 32
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.schedule = 'cosine'
  elif stage == 'student':
    c.mode = 'sft'
    c.student.model = QUICK_STUDENT if quick else STUDENT_MODEL
    c.total_steps = 20 if quick else 800
    c.sft.batch_size = 32
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = 'cosine'
  elif stage in METHODS:
    c.student.model = 'runs/ce/student/export'
    c.total_steps = 6 if quick else METHOD_STEPS
    c.eval_every = 3 if quick else EVAL_EVERY
    c.log_every = c.eval_every  # every eval step is a log step (cumulative FLOPs there)
    c.eval_at_start = True
    c.optim.lr = LRS[0]
    c.optim.warmup_steps = 0
    c.optim.schedule = 'constant'
    c.rollout.temperature = 1.0
    c.eval.pass_k = [1]
    c.export.hf_dir = ''
    if stage == 'opd':
      c.mode = 'opd'
      c.teachers.teacher = teacher('runs/ce/teacher/export', kl_coef=1.0)
      c.rollout.prompts_per_step = ROWS_PER_STEP
    elif stage == 'sft_teacher':
      c.mode = 'sft'
      c.teachers.teacher = teacher('runs/ce/teacher/export', kl_coef=1.0)
      c.sft.source = 'teacher'
      c.sft.temperature = 1.0
      c.sft.batch_size = ROWS_PER_STEP
      c.rl.use_opd = False
    else:
      c.mode = 'opd'
      c.rl.estimator = 'grpo'
      c.rollout.prompts_per_step = ROWS_PER_STEP // GROUP
      c.rollout.n_samples = GROUP
      if stage == 'mixed':
        c.teachers.teacher = teacher('runs/ce/teacher/export', kl_coef=1.0)
        c.rl.use_opd = True
      else:
        c.rl.use_opd = False
        # pure RL: no teacher at all (no scoring FLOPs, no KL term)
  else:
    raise ValueError(f'unknown stage {stage!r}; known: teacher, student, {", ".join(METHODS)}')
  if quick:
    c.eval.num_prompts = 32
    c.eval.batch_size = 32
    if stage in ('teacher', 'student'):
      c.log_every = 10
  return lock(c)
