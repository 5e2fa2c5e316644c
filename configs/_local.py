"""Shared pieces of the `:runlocal` forms: tiny random models and the sample data in
data/samples/, sized to run a few steps on one CPU in seconds."""

import os

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data',
                       'samples')

TINY_STUDENT = 'tiny:qwen3:hidden_size=32,num_layers=2,num_heads=2,num_kv_heads=1,seed=0'
TINY_TEACHER = 'tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=1'


def sample(name: str) -> str:
  return os.path.join(SAMPLES, name + '.jsonl')


def shrink(c):
  """Shrinks any recipe to a 2-step CPU run (tiny models, sample data, short rollouts)."""
  c.total_steps = 2
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.student.model = TINY_STUDENT
  c.student.compute_dtype = 'float32'
  c.rollout.prompts_per_step = 8
  c.rollout.max_new_tokens = 16
  c.data.max_prompt_len = 256
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 0
  c.eval.num_prompts = 8
  c.eval.batch_size = 8
  c.checkpoint.every = 1
  c.batch.mini_batches = 1
  c.batch.micro_batches = 1
  c.checkpoint.async_save = False
  for t in c.teachers.values():
    if t.model is not None or t.remote_url is None:
      t.model = TINY_TEACHER
    t.dtype = 'float32'
    t.devices = None
    if 'mesh' in t:  # a teacher's own mesh shape is sized for its slice
      t.mesh = None
  return c
