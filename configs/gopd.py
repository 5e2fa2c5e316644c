"""G-OPD / ExOPD in miniature (CPU): `python -m opd_jax.experiments.gopd --workdir W` chains
these stages and fills in the data and model paths.

Tasks (opd_jax/tasks/arithmetic.py), two domains with one rule-based checker (exact match
of the number after `####`):
  add   2-digit addition written out column by column with carries ("3+7+0=10 ...");
  sub   2-digit subtraction written out with borrows ("13-7-0=6\\n8-6-1=1 ...").

Stages (`get_config('STAGE')`; `'STAGE,quick'` is the shrunk pipeline check):
  base        SFT of a 2x64 Qwen3 on noisy solutions of both domains (a share
              CARRY_ERROR_RATE of them forget their carries / borrows): the shared pre-RL
              base, and the student.
  large_base  the same SFT of a 3x96 Qwen3: the larger teacher's own base (claim 3).
  rl          GRPO on the exact-match reward from a base, on one domain: the domain
              teachers (base + RL, same size) and the larger teacher (large_base + RL).
              Its learning rate is chosen per domain among RL_LRS on the VALIDATION split's
              pass@1 (the experiment runs one stage per rate; see experiments/gopd.py).
  opd         distillation from the base (the student's init): pure OPD (gopd off), or
              G-OPD with --config.gopd.enabled and λ = gopd.reward_scale; one teacher or
              two routed by tag.
  sft         SFT on responses sampled by the teachers (routed by tag), T=1.

Every distillation run (opd and sft) has the same budget: DISTILL_STEPS steps of
ROWS_PER_STEP training sequences, the same learning-rate grid DISTILL_LRS (each method's rate
chosen on its validation pass@1), the same prompt stream (data files, seed) and the same
student init.
"""

from opd_jax.config_lib import base_config, lock, teacher

SMALL = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=12'
LARGE = 'tiny:qwen3:hidden_size=96,num_layers=3,num_heads=4,num_kv_heads=2,seed=11'
QUICK_SMALL = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=12'
QUICK_LARGE = 'tiny:qwen3:hidden_size=48,num_layers=2,num_heads=4,num_kv_heads=2,seed=11'

STAGES = ('base', 'large_base', 'rl', 'opd', 'sft')
LAMBDAS = (0.0, 0.5, 1.0, 1.25, 1.5, 2.0)
QUICK_LAMBDAS = (0.0, 1.25)   # the pipeline check: λ = 0 and one ExOPD value
ROWS_PER_STEP = 32       # training sequences per distillation step, every method
DISTILL_STEPS = 60
LR = 1e-4                # a bare opd / sft stage's rate (the experiment sets the rate)
DISTILL_LRS = (1e-4, 3e-4)   # every distillation method, chosen on validation pass@1 alike
QUICK_DISTILL_LRS = (1e-4,)
# The RL stage (the experts). The first design (60 steps x 8 prompts x 8 samples at lr 1e-4,
# base SFT 500 steps on 50% noisy solutions) gave the experts +3.4 points on average; see
# docs/results.md, G-OPD section.
RL_STEPS = 150
RL_GROUP = 16            # samples per prompt (the GRPO group)
RL_PROMPTS = 8
RL_LRS = (1e-4, 3e-4)   # chosen per domain on validation pass@1 (never on held-out)
RL_LR = 3e-4             # the default of a bare `rl` stage (the experiment sets the rate)
RL_EVAL_EVERY = 50      # a multiple of log_every (10): evaluations only fall on logged steps
QUICK_RL_LRS = (1e-4, 3e-4)
CARRY_ERROR_RATE = 0.7   # share of training solutions written with the domain's mistake
# The noisy subtraction's mistake: 'smaller_from_larger' (3 - 7 written 7 - 3, at the first
# line) rather than 'forget_borrow' (the same "0 instead of 1" at the same place as add's
# forgotten carry: GRPO on add then fixed sub as much as add, +19 vs +26 points).
SUB_ERROR = 'smaller_from_larger'
BASE_STEPS = 1000
DIGITS = 2               # operands of 2 digits (3 would leave the tiny base too weak at T=1)
N_TRAIN = 3000           # training problems per domain (of 8,100 / 4,095 distinct)
N_VAL = 128              # validation problems per domain (RL learning rate; disjoint)
N_EVAL = 256             # held-out problems per domain
EVAL_EVERY = 30
# The experts gate, checked before any distillation: each expert's held-out pass@1 (T=1) is at
# least GATE_OVER_BASE above the base on its own domain and GATE_OVER_OTHER above the other
# expert there.
GATE_OVER_BASE = 0.15
GATE_OVER_OTHER = 0.10


def get_config(arg='opd'):
  stage, _, flag = arg.partition(',')
  quick = flag == 'quick'
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; known: {", ".join(STAGES)}')
  c = base_config()
  c.seed = 0
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.remat = False  # tiny models: recomputation costs more than it saves
  c.data.train = dict(add='runs/gopd/data/add_train.jsonl')
  c.data.eval = dict(add='runs/gopd/data/add_eval.jsonl')
  c.data.max_prompt_len = 64
  c.rl.tag_to_reward = dict(add='exact_match', sub='exact_match', add_val='exact_match',
                           sub_val='exact_match')  # *_val: the validation split
  c.rollout.max_new_tokens = 48
  c.rollout.temperature = 1.0
  c.eval.num_prompts = 0
  c.eval.batch_size = 256
  c.eval.reverse_kl = False
  # sampling accuracy: pass@1 at T=1 averaged over 4 samples per prompt (plus pass@4); the
  # greedy accuracy saturates near 100% on this task
  c.eval.pass_k = [1] if quick else [1, 4]
  c.eval.temperature = 1.0
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.log_every = 10
  c.optim.grad_clip = 1.0
  c.eval_every = 2 if quick else EVAL_EVERY
  c.eval_at_start = True

  if stage in ('base', 'large_base'):
    c.mode = 'sft'
    c.student.model = (QUICK_SMALL if stage == 'base' else QUICK_LARGE) if quick else (
        SMALL if stage == 'base' else LARGE)
    c.total_steps = 30 if quick else BASE_STEPS
    c.sft.batch_size = 32
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = 'cosine'
    c.eval_every = 0
    c.eval_at_start = False
  elif stage == 'rl':
    c.mode = 'opd'
    c.student.model = 'runs/gopd/base/export'
    c.rl.estimator = 'grpo'
    c.rl.use_opd = False
    c.rollout.prompts_per_step = RL_PROMPTS
    c.rollout.n_samples = 4 if quick else RL_GROUP
    c.total_steps = 4 if quick else RL_STEPS
    c.optim.lr = RL_LR
    c.eval_every = 2 if quick else RL_EVAL_EVERY
    c.optim.schedule = 'constant'
  else:
    c.student.model = 'runs/gopd/base/export'
    c.teachers.teacher = teacher('runs/gopd/rl_add/export', kl_coef=1.0)
    c.total_steps = 4 if quick else DISTILL_STEPS
    c.optim.lr = LR
    c.optim.schedule = 'constant'
    c.export.hf_dir = ''
    c.log_every = 5
    if stage == 'opd':
      c.mode = 'opd'
      c.rollout.prompts_per_step = ROWS_PER_STEP
      c.gopd.reward_scale = 1.0
    else:
      c.mode = 'sft'
      c.sft.source = 'teacher'
      c.sft.temperature = 1.0
      c.sft.batch_size = ROWS_PER_STEP
      c.rl.use_opd = False
  if quick:
    c.log_every = min(c.log_every, c.eval_every or c.log_every)
  return lock(c)
