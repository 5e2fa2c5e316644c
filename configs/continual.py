"""Continual learning in miniature (CPU): `python -m opd_jax.experiments.continual --workdir W`
chains these stages and fills in the data and model paths.

Behaviour and knowledge:
  add    the post-trained behaviour: 3-digit addition written out column by column with
         carries, answer after `####` (opd_jax/tasks/arithmetic.py), tested on held-out
         problems;
  fact   new knowledge: "QZK?" -> "#### 482", random three-letter names and numbers
         (opd_jax/tasks/facts.py), tested by recalling the trained facts.

Stages (`get_config('STAGE')`; `'STAGE,quick'` is the shrunk pipeline check):
  post       SFT of a 2x64 Qwen3 on clean addition: the post-trained model (behaviour on).
  knowledge  SFT from `post` on the facts (the experiment runs it with two data mixes: facts
             only, and facts with a share of the post-training data replayed).
  opd        OPD from a knowledge checkpoint (facts only, or the mix) with `post` as the
             teacher, on the behaviour's prompts only (the facts are never shown again).
"""

from opd_jax.config_lib import base_config, lock, teacher

MODEL = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=21'
QUICK_MODEL = 'tiny:qwen3:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=21'
STAGES = ('post', 'knowledge', 'opd')
N_FACTS = 128
POST_STEPS = 600
KNOWLEDGE_STEPS = 400
KNOWLEDGE_LR = 1e-3
REPLAY = 0.25           # share of post-training (behaviour) data in the mixed knowledge SFT
OPD_STEPS = 100
OPD_LR = 1e-3
OPD_LRS = (1e-4, 3e-4, 1e-3)   # the experiment's sweep (chosen on validation)
QUICK_OPD_LRS = (1e-3,)
EVAL_EVERY = 25


def get_config(arg='opd'):
  stage, _, flag = arg.partition(',')
  quick = flag == 'quick'
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; known: {", ".join(STAGES)}')
  c = base_config()
  c.seed = 0
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.remat = False
  c.data.train = dict(add='runs/continual/data/add_train.jsonl')
  c.data.eval = dict(add='runs/continual/data/add_eval.jsonl',
                     fact='runs/continual/data/facts.jsonl')
  c.data.max_prompt_len = 64
  c.rl.tag_to_reward = dict(add='exact_match', fact='exact_match', val='exact_match')
  c.rollout.max_new_tokens = 48
  c.eval.num_prompts = 0
  c.eval.batch_size = 256
  c.eval.reverse_kl = False
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.log_every = 5 if quick else 25
  c.optim.grad_clip = 1.0
  c.eval_every = 0 if quick else EVAL_EVERY
  c.eval_at_start = stage != 'post'
  c.sft.batch_size = 32
  if stage == 'post':
    c.mode = 'sft'
    c.student.model = QUICK_MODEL if quick else MODEL
    c.total_steps = 20 if quick else POST_STEPS
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = 'cosine'
    c.eval_every = 0
  elif stage == 'knowledge':
    c.mode = 'sft'
    c.student.model = 'runs/continual/post/export'
    c.data.train = dict(fact='runs/continual/data/facts.jsonl')
    c.total_steps = 10 if quick else KNOWLEDGE_STEPS
    c.optim.lr = KNOWLEDGE_LR
    c.optim.warmup_steps = 10
    c.optim.schedule = 'constant'
  else:
    c.mode = 'opd'
    c.student.model = 'runs/continual/knowledge/export'
    c.teachers.teacher = teacher('runs/continual/post/export', kl_coef=1.0)
    c.rollout.prompts_per_step = 32
    c.rollout.temperature = 1.0
    c.total_steps = 6 if quick else OPD_STEPS
    c.optim.lr = OPD_LR
    c.optim.schedule = 'constant'
    c.export.hf_dir = ''
  return lock(c)
