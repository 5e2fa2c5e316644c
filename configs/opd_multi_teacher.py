"""Multi-teacher OPD routed by data tag (ROLL's mixed routing example): a math specialist,
a code specialist and a general teacher with tags=[] that scores every record.

  python -m opd_jax.train --config configs/opd_multi_teacher.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-4B \
      --config.teachers.math.model=/ckpt/Qwen3-32B --config.teachers.code.model=/ckpt/Qwen3-14B \
      --config.teachers.general.model=/ckpt/Qwen3-8B \
      --config.data.train.math=/data/math.jsonl --config.data.train.code=/data/code.jsonl \
      --config.data.train.general=/data/chat.jsonl

Routing: a 'math' record gets A = -(1.0 * KL_math + 0.2 * KL_general); a 'code' record
-(1.0 * KL_code + 0.2 * KL_general); a 'general' record -(0.2 * KL_general). Each teacher
scores only its routed rows. Sized for a v5p-64 slice: the 32B math teacher (bf16, 64 GB)
is tensor-parallel (8-way, rows over 2) on its own 16 chips (devices='0:16'), the others
share the student's mesh. Prompts are interleaved 40% math / 40% code / 20% general; math uses Qwen3's thinking
template, code and chat do not. Held-out accuracy is logged per tag (math-verify, sandboxed
code tests) with pass@1 and pass@4.

  python -m opd_jax.train --config configs/opd_multi_teacher.py:runlocal --workdir /tmp/mt

runs 2 steps on CPU with tiny random models and data/samples/.
"""

from opd_jax.config_lib import base_config, lock, teacher


def get_config(arg=None):
  c = base_config()
  c.total_steps = 300
  c.eval_every = 50
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = '/ckpt/Qwen3-4B'
  c.student.compute_dtype = 'bfloat16'
  c.teachers.math = teacher('/ckpt/Qwen3-32B', kl_coef=1.0, tags=['math'], dtype='bfloat16',
                            sharding='tp', devices='0:16', mesh=dict(fsdp=2, tensor=8))
  c.teachers.code = teacher('/ckpt/Qwen3-14B', kl_coef=1.0, tags=['code'], dtype='bfloat16')
  c.teachers.general = teacher('/ckpt/Qwen3-8B', kl_coef=0.2, tags=[], dtype='bfloat16')
  c.data.train = dict(math='/data/math.jsonl', code='/data/code.jsonl',
                      general='/data/chat.jsonl')
  c.data.eval = dict(math='/data/math_eval.jsonl', code='/data/code_eval.jsonl')
  c.data.interleave = dict(math=0.4, code=0.4, general=0.2)
  c.data.template = 'qwen3_no_think'
  c.data.tag_to_template = dict(math='qwen3_think')
  c.data.max_prompt_len = 2048
  c.rollout.prompts_per_step = 128
  c.rollout.n_samples = 2
  c.rollout.max_new_tokens = 8192
  c.rl.tag_to_reward = dict(math='math', code='code')
  c.eval.pass_k = [1, 4]
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.batch.micro_batches = 16

  if arg == 'runlocal':
    from configs import _local
    c.data.train = dict(math=_local.sample('math_train'), code=_local.sample('code_train'),
                        general=_local.sample('general_train'))
    c.data.eval = dict(math=_local.sample('math_eval'), code=_local.sample('code_eval'))
    _local.shrink(c)
    c.teachers.math.model = _local.TINY_TEACHER
    c.teachers.code.model = 'tiny:qwen3:hidden_size=48,num_layers=2,num_heads=2,num_kv_heads=1,seed=2'
    c.teachers.general.model = 'tiny:llama:hidden_size=32,num_layers=1,num_heads=2,num_kv_heads=1,seed=3'
    c.eval.pass_k = [1, 2]
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
