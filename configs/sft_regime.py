"""OPD vs SFT in the regime of diminishing SFT returns, in miniature (CPU):
`python -m opd_jax.experiments.sft_regime --workdir W` chains these stages and fills in the
data and model paths.

Task (opd_jax/tasks/keyed.py): keyed codes, "QZK:4821" -> "#### 4821-37", with
NUM_KEYS keys of Zipf frequencies (exponent ZIPF): a long tail of sub-skills.

Stages (`get_config('STAGE')`; `'STAGE,quick'` is the shrunk pipeline check):
  teacher      SFT of the teacher on ground-truth solutions with every key frequent.
  gate         SFT of the student on a finite set of N teacher samples (the experiment sets
               data.train and total_steps per N): one point of the gate curve.
  opd          pure sampled-token OPD from the gate's SFT-N checkpoint (kl_coef 1).
  opd_topk     OPD on the teacher's top-TOP_K tokens + a tail bucket at every sampled
               position (loss.full_vocab='reverse_kl'), no sampled-token term.
  sft_teacher  continued SFT on fresh teacher samples (T=1), sampling FLOPs counted.
  grpo         GRPO on the exact-match reward, GROUP samples per prompt, no teacher.
  negadv       the control: a constant negative advantage (rl.constant_advantage) on every
               sampled token, no teacher, no reward.
All methods share the SFT-N checkpoint, the prompts, METHOD_STEPS x ROWS_PER_STEP training
sequences and the learning-rate sweep LRS (chosen per method on validation).
"""

from opd_jax.config_lib import base_config, lock, teacher

NUM_KEYS = 512            # 256 (with TEACHER_STEPS 800) was the second design: its SFT curve
                          # came within 9-12 points of the teacher (docs/results.md)
ZIPF = 1.0
TEACHER_EXAMPLES = 40000   # ground-truth examples, keys uniform (the teacher's SFT set)
EXTRA_POOL = 20000         # Zipf pool prompts beyond the gate's largest N (methods' prompts)
N_VAL = 256
N_EVAL = 512
QUICK_NUM_KEYS = 16
QUICK_GATE_NS = (16, 32, 64, 128)
QUICK_SFT_N = 32
TEACHER_MODEL = 'tiny:qwen3:hidden_size=128,num_layers=3,num_heads=4,num_kv_heads=2,seed=21'
STUDENT_MODEL = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=22'
QUICK_TEACHER = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=21'
QUICK_STUDENT = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=22'

TEACHER_STEPS = 1600      # 512 codes: the teacher's loss leaves its plateau near step 325
GATE_NS = (64, 128, 256, 512, 1024)
GATE_EPOCHS = 60          # passes over each finite SFT set (at least GATE_MIN_STEPS steps)
GATE_MIN_STEPS = 400
GATE_BATCH = 64
SFT_N = 256               # the comparison's starting checkpoint (the analogue of SFT-400K)

METHODS = ('opd', 'opd_topk', 'sft_teacher', 'grpo', 'negadv')
TOP_K = 20                # opd_topk: the teacher's top tokens per position
LRS = (3e-4, 1e-3, 3e-3)
QUICK_LRS = (1e-3,)
ROWS_PER_STEP = 64        # training sequences per step, every method
GROUP = 4                 # GRPO samples per prompt
METHOD_STEPS = 150
EVAL_EVERY = 30


def get_config(arg='opd'):
  stage, _, flag = arg.partition(',')
  quick = flag == 'quick'
  c = base_config()
  c.seed = 0
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.remat = False
  c.data.train = dict(keyed='runs/regime/data/pool.jsonl')
  c.data.eval = dict(keyed='runs/regime/data/eval.jsonl')
  c.data.max_prompt_len = 32
  c.rl.tag_to_reward = dict(keyed='exact_match')
  c.rollout.max_new_tokens = 16
  c.eval.num_prompts = 0
  c.eval.batch_size = 256
  c.eval.reverse_kl = False
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.log_every = 25
  c.optim.grad_clip = 1.0

  if stage == 'teacher':
    c.mode = 'sft'
    c.data.train = dict(keyed='runs/regime/data/teacher.jsonl')
    c.student.model = QUICK_TEACHER if quick else TEACHER_MODEL
    c.total_steps = 30 if quick else TEACHER_STEPS
    c.sft.batch_size = 64
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.schedule = 'cosine'
  elif stage == 'gate':
    c.mode = 'sft'
    c.data.train = dict(keyed='runs/regime/data/sft_N.jsonl')
    c.student.model = QUICK_STUDENT if quick else STUDENT_MODEL
    c.total_steps = 20 if quick else GATE_MIN_STEPS
    c.sft.batch_size = GATE_BATCH
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.schedule = 'cosine'
  elif stage in METHODS:
    c.student.model = 'runs/regime/gate_N/export'
    c.total_steps = 6 if quick else METHOD_STEPS
    c.eval_every = 3 if quick else EVAL_EVERY
    c.log_every = c.eval_every
    c.eval_at_start = True
    c.optim.lr = LRS[0]
    c.optim.warmup_steps = 0
    c.optim.schedule = 'constant'
    c.rollout.temperature = 1.0
    c.export.hf_dir = ''
    if stage in ('opd', 'opd_topk'):
      c.mode = 'opd'
      c.teachers.teacher = teacher('runs/regime/teacher/export', kl_coef=1.0)
      c.rollout.prompts_per_step = ROWS_PER_STEP
      if stage == 'opd_topk':
        c.rl.use_opd = False
        c.loss.full_vocab = 'reverse_kl'
        c.loss.full_vocab_coef = 1.0
        c.loss.full_vocab_top_k = TOP_K
    elif stage == 'sft_teacher':
      c.mode = 'sft'
      c.teachers.teacher = teacher('runs/regime/teacher/export', kl_coef=1.0)
      c.sft.source = 'teacher'
      c.sft.temperature = 1.0
      c.sft.batch_size = ROWS_PER_STEP
      c.rl.use_opd = False
    elif stage == 'grpo':
      c.mode = 'opd'
      c.rl.estimator = 'grpo'
      c.rl.use_opd = False
      c.rollout.prompts_per_step = ROWS_PER_STEP // GROUP
      c.rollout.n_samples = GROUP
    else:  # negadv
      c.mode = 'opd'
      c.rl.constant_advantage = -1.0
      c.rollout.prompts_per_step = ROWS_PER_STEP
  else:
    raise ValueError(f'unknown stage {stage!r}; known: teacher, gate, {", ".join(METHODS)}')
  if quick:
    c.eval.batch_size = 32
    if stage in ('teacher', 'gate'):
      c.log_every = 10
  return lock(c)
