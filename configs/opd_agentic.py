"""Multi-turn (agentic) OPD: the student acts in an environment over several turns (tool
calls run in the sandbox, a guessing game), the teacher scores every student token given
the whole interleaved context, and observation tokens stay out of the loss.

  python -m opd_jax.train --config configs/opd_agentic.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B --config.teachers.teacher.model=/ckpt/Qwen3-8B \
      --config.data.train.tool=/data/tool_train.jsonl --config.data.eval.tool=/data/tool_eval.jsonl

Records are ROLL's JSONL with the environment's fields (opd_jax/envs/: 'tool' needs the
answer in ground_truth, 'guess' the secret number); config.agent.tag_to_env picks the
environment per tag, and tags without one stay single-turn. Each turn is decoded by the
jitted sampler until <|im_end|> (the rollout's stop ids) or agent.max_tokens_per_turn; the
environment answers on the host; its observation, wrapped as the next user message of the
chat template, is prefilled after the cache (docs/design.md §10). Sized like
opd_single_teacher for a v5e-16 slice, with episodes of up to 6 turns and 4096 tokens after
the prompt (the cache holds P + 6 x 512 + 5 x 512 slots per row). Expect the reverse KL on
student tokens (opd/reverse_kl) to fall and agent/episode_reward to rise towards the
teacher's; agent/tool_errors counts episodes ended by a failing call. For mixed RL + OPD with
the episode reward, add --config.rl.estimator=grpo --config.rollout.n_samples=8.

  python -m opd_jax.train --config configs/opd_agentic.py:runlocal --workdir /tmp/agentic

runs 2 steps on CPU with tiny random models and data/samples/{tool,guess}_*.jsonl (episodes
of 3 turns: a random student never writes <answer>...</answer>).
"""

from opd_jax.config_lib import base_config, lock, teacher


def get_config(arg=None):
  c = base_config()
  c.total_steps = 200
  c.eval_every = 25
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = '/ckpt/Qwen3-1.7B'
  c.student.compute_dtype = 'bfloat16'
  c.teachers.teacher = teacher('/ckpt/Qwen3-8B', kl_coef=1.0, tags=[], dtype='bfloat16')
  c.data.train = dict(tool='/data/tool_train.jsonl')
  c.data.eval = dict(tool='/data/tool_eval.jsonl')
  c.data.template = 'qwen3_no_think'
  c.data.max_prompt_len = 1024
  c.agent.tag_to_env = dict(tool='tool', guess='guess')
  c.agent.env_kwargs = dict(tool=dict(timeout_s=5.0, errors_end_episode=True))
  c.agent.max_turns = 6
  c.agent.max_tokens_per_turn = 512
  c.agent.max_episode_tokens = 4096
  c.agent.max_obs_tokens = 512
  c.rollout.prompts_per_step = 64
  c.rollout.n_samples = 4
  c.rollout.temperature = 1.0
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.batch.micro_batches = 8
  c.eval.num_prompts = 256
  c.eval.batch_size = 128
  c.checkpoint.every = 25

  if arg == 'runlocal':
    from configs import _local
    c.data.train = dict(tool=_local.sample('tool_train'), guess=_local.sample('guess_train'))
    c.data.eval = dict(tool=_local.sample('tool_eval'), guess=_local.sample('guess_eval'))
    c.data.template = 'default'
    _local.shrink(c)
    c.rollout.prompts_per_step = 4
    c.rollout.n_samples = 2
    c.agent.max_turns = 3
    c.agent.max_tokens_per_turn = 8
    c.agent.max_episode_tokens = 128
    c.agent.max_obs_tokens = 48
    c.eval.num_prompts = 0
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  return lock(c)
