"""The base ConfigDict every recipe in configs/ starts from: one place for every field, its
default and its meaning. README.md documents every field (tests/test_repo.py checks that).

Optional fields are `placeholder`s so `--config.x=value` can set them from the command line.
Teachers are a dict of named sub-configs (see `teacher()`); `tags=[]` means every record.
"""

from __future__ import annotations

from ml_collections import config_dict
from ml_collections.config_dict import ConfigDict, placeholder


# The seven projections of every layer (PEFT's q/k/v/o/gate/up/down_proj).
LORA_TARGETS = r'layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/weight'


def teacher(model: str | None = None, *, kl_coef: float = 1.0, tags=(), sharding='fsdp_tp',
            dtype='float32', devices=None, remote_url=None, remote_protocol='sglang',
            cross_tokenizer=False, tokenizer=None, **kw) -> ConfigDict:
  """One entry of `config.teachers`. `cross_tokenizer=True` allows a teacher whose
  tokenizer differs from the student's (docs/design.md §12); `tokenizer`: the teacher's
  tokenizer directory (None: the model's; needed for a remote cross-tokenizer teacher)."""
  return ConfigDict(dict(
      model=model if model is not None else placeholder(str), kl_coef=kl_coef,
      tags=list(tags), sharding=sharding, dtype=dtype,
      devices=devices if devices is not None else placeholder(str),
      remote_url=remote_url if remote_url is not None else placeholder(str),
      remote_protocol=remote_protocol, cross_tokenizer=cross_tokenizer,
      tokenizer=tokenizer if tokenizer is not None else placeholder(str), **kw))


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.mode = 'opd'                 # 'opd' (rollouts scored by teachers and/or rewards) | 'sft'
  c.total_steps = 100            # training steps (one rollout batch each)
  c.log_every = 1
  c.eval_every = 0               # 0: evaluate only at the end
  c.eval_at_start = False        # also evaluate before the first step (step 0)
  c.distributed = False          # jax.distributed.initialize() (auto on a multi-host TPU)

  c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.student = ConfigDict(dict(
      model=placeholder(str),    # HF directory (or tiny:FAMILY[:k=v,...] for local runs)
      sharding='fsdp_tp',        # rule set in opd_jax.sharding.RULE_SETS
      compute_dtype='float32',   # 'bfloat16': bf16 compute, fp32 params + optimizer state
      remat=True,                # recompute layer activations in the backward pass
      lora=ConfigDict(dict(      # LoRA student (docs/design.md §9); rank 0: full fine-tuning
          rank=0,                # adapter rank r; > 0 trains only the adapters
          alpha=16.0,            # scale alpha / r, as PEFT's lora_alpha
          targets=LORA_TARGETS,  # regex, full match against weight paths
          dropout=0.0,           # only 0 is supported
      )),
  ))
  c.teachers = ConfigDict()      # name -> teacher(...); empty: no OPD signal (RL / SFT)

  c.gopd = ConfigDict(dict(
      enabled=False,             # G-OPD: A = λ(t − r) − (s_b − r)
      reward_scale=1.0,          # λ; > 1 is ExOPD (reward extrapolation)
      reference='student_init',  # 'student_init' or an HF directory (reward correction)
  ))

  c.data = ConfigDict(dict(
      train=ConfigDict(),        # domain -> JSONL path (or list / glob)
      eval=ConfigDict(),         # domain -> held-out JSONL path(s)
      interleave=ConfigDict(),   # domain -> sampling probability (empty: by size)
      template='default',        # opd_jax.data.TEMPLATES
      tag_to_template=ConfigDict(),
      max_prompt_len=512,
      on_too_long='error',       # 'error' | 'skip'
      default_tag=placeholder(str),
  ))

  c.rollout = ConfigDict(dict(
      prompts_per_step=8,        # global prompts per step
      n_samples=1,               # samples per prompt (the group of GRPO/RLOO)
      max_new_tokens=256,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      stop_tokens=[],            # extra stop token strings (EOS ids are always stops)
      slots=0,                   # continuous batching: rows decoded at once (0: static)
      tensor_parallel=0,         # rollout layout's TP degree: 0 auto, -1 the training layout
      max_staleness=0,           # 1: batch k+1 is sampled while batch k is scored / trained
  ))

  c.agent = ConfigDict(dict(     # multi-turn episodes (opd_jax/rollout/multiturn.py, opd_jax/envs/)
      tag_to_env=ConfigDict(),   # tag -> environment name (opd_jax.envs.ENVS); empty: off
      env_kwargs=ConfigDict(),   # environment name -> its constructor's keyword arguments
      max_turns=4,               # student turns per episode
      max_tokens_per_turn=64,    # tokens per student turn (the turn ends earlier at a stop id)
      max_episode_tokens=256,    # student + observation tokens after the prompt
      max_obs_tokens=64,         # tokens per observation (chat-template wrapping included)
  ))

  c.loss = ConfigDict(dict(
      kl_estimator='k1',         # 'k1' only (k3's gradient is not the reverse KL's; logged)
      kl_clamp=placeholder(float),
      clip_eps=placeholder(float),       # PPO ε; None: plain importance sampling
      clip_eps_high=placeholder(float),
      tis_cap=placeholder(float),        # truncated importance sampling: min(rho, C)
      ratio_level='token',       # 'token' | 'sequence' (GSPO)
      aggregation='token-mean',  # 'token-mean' | 'seq-mean-token-mean'
      # None | top-k: 'forward_kl' | 'reverse_kl' | 'jsd' | exact (in-process teacher):
      # 'forward_kl_exact' | 'reverse_kl_exact' | 'jsd_exact' | 'reverse_kl_student_topk'
      full_vocab=placeholder(str),
      full_vocab_coef=1.0,
      full_vocab_top_k=20,
      jsd_beta=0.5,
      chunk_size=placeholder(int),       # vocab chunk positions; None: by memory budget
      vocab_chunk_size=placeholder(int), # vocabulary entries per chunk (exact options); 8192
  ))

  c.rl = ConfigDict(dict(
      use_opd=True,              # add −Σ c_j KL_j to the advantage (when teachers exist)
      estimator=placeholder(str),        # None | 'grpo' | 'rloo' | 'reinforce_pp' | 'reinforce'
      normalize_std=True,        # GRPO only: False is Dr. GRPO
      tag_to_reward=ConfigDict(),        # tag -> reward name (opd_jax.rewards.REWARDS)
      default_reward=placeholder(str),
      # the control of docs/results.md: this advantage on every sampled response token in
      # place of the teachers' term (no teacher needed); None: off
      constant_advantage=placeholder(float),
  ))

  c.optim = ConfigDict(dict(
      lr=1e-6, schedule='constant', warmup_steps=0, weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
  ))
  c.batch = ConfigDict(dict(
      mini_batches=1,            # optimizer steps per rollout batch
      micro_batches=1,           # gradient accumulation inside each optimizer step; teacher
                                 # and reference scoring also run in this many row groups
  ))

  c.sft = ConfigDict(dict(
      source='dataset',          # 'dataset': record[response_field] | 'teacher': sampled
      response_field='response',
      batch_size=32,
      temperature=1.0,           # teacher sampling temperature (source='teacher')
  ))

  c.eval = ConfigDict(dict(
      num_prompts=64,            # held-out prompts per evaluation (0: all)
      batch_size=64,
      max_new_tokens=placeholder(int),   # None: rollout.max_new_tokens
      pass_k=[],                 # e.g. [1, 4]
      temperature=placeholder(float),    # pass@k samples; None: rollout.temperature
      reverse_kl=True,
      num_text_samples=4,
  ))
  c.checkpoint = ConfigDict(dict(every=50, keep=3, async_save=True))
  c.export = ConfigDict(dict(hf_dir='export', dtype=placeholder(str)))  # '' disables
  c.debug = ConfigDict(dict(stop_at_step=placeholder(int)))  # behave as if preempted there
  return c


def lock(c: ConfigDict) -> ConfigDict:
  """Locks the config (a typo in an override becomes an error) and returns it."""
  c.lock()
  return c


__all__ = ['ConfigDict', 'base_config', 'config_dict', 'lock', 'placeholder', 'teacher']
