"""On-policy distillation from a teacher served on another slice: Qwen3-1.7B student <-
Qwen3-32B teacher over HTTP (slime's `--opd-type sglang`), math. Otherwise exactly
configs/opd_single_teacher.py (same data, rollout, loss and optimizer).

First serve the teacher on its own host (a v5e-8: one host, 8 chips x 16 GiB; Qwen3-32B in
bf16 is 64 GiB -> 8 GiB/chip, tensor-parallel over the 8 chips):

  python -m opd_jax.teachers.server --model /ckpt/Qwen3-32B --dtype bfloat16 \
      --mesh fsdp=1,tensor=8 --host 0.0.0.0 --port 30000 --max-batch-size 32

then train the student on its slice (a v5e-16, sized as in opd_single_teacher.py) against it:

  python -m opd_jax.train --config configs/opd_remote_teacher.py --workdir $WORKDIR \
      --config.student.model=/ckpt/Qwen3-1.7B \
      --config.teachers.teacher.remote_url=http://TEACHER_HOST:30000 \
      --config.data.train.math=/data/math_train.jsonl --config.data.eval.math=/data/math_eval.jsonl

Each step posts the 256 rollouts (prompt + response token ids, padding stripped) as 256
requests, 64 at a time; the server batches them dynamically. Any SGLang server (or vLLM with
--config.teachers.teacher.remote_protocol=vllm, temperature 1 only) works the same way. The
client checks the server's vocabulary against the student's tokenizer at start-up, times
out a request after remote_timeout_s, retries connection errors / timeouts / 5xx with
exponential backoff and stops with an error naming the URL when the teacher stays down.

  python -m opd_jax.teachers.server \
      --model tiny:qwen3:hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,seed=1 &
  python -m opd_jax.train --config configs/opd_remote_teacher.py:runlocal --workdir /tmp/opd_r

runs opd_single_teacher.py:runlocal's 2 CPU steps with its tiny teacher served on
127.0.0.1:30000 (`:runlocal` starts no server itself; override the address with
--config.teachers.teacher.remote_url=...).
"""

from opd_jax.config_lib import lock, teacher

LOCAL_URL = 'http://127.0.0.1:30000'


def get_config(arg=None):
  from configs import opd_single_teacher
  if arg not in (None, 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; known: runlocal')
  c = opd_single_teacher.get_config(arg)
  c.unlock()
  if arg == 'runlocal':
    c.teachers.teacher = teacher(remote_url=LOCAL_URL, kl_coef=1.0, tags=[],
                                 remote_timeout_s=60.0, remote_retries=2, remote_concurrency=8)
  else:
    c.teachers.teacher = teacher(remote_url='http://TEACHER_HOST:30000', kl_coef=1.0, tags=[],
                                 remote_timeout_s=300.0, remote_retries=4, remote_concurrency=64)
  return lock(c)
