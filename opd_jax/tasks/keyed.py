"""Keyed codes with a Zipf-distributed long tail of keys: many small sub-skills, each a fact
to look up, most of them rare.

  prompt:    "QZK:4821"
  response:  "#### 4821-37"

Each of K keys (three-letter names) has its own two-digit code. The response copies the
operand (the same skill for every key, learned from a few examples) and appends the key's
code (the fact to recall); the text after `####` is checked by exact match against
`ground_truth` ('exact_match'). A code is random, so a model knows it only if training put
it there; a key never seen is a 1-in-100 guess.

Keys are drawn with Zipf frequencies, p(key of rank k) proportional to 1 / k^s (s = 1 by
default): a few keys are common, most are rare. A student that learns from N examples knows
roughly the keys whose probability is above ~1/N, and the mass of those grows by about the
same amount per doubling of N (log N / log K for s = 1): the long tail that makes
supervised accuracy grow log-linearly with data. A teacher trained with every key frequent
(`make_records(..., uniform=True)`) knows the tail.

`write_dataset` writes the teacher / pool / validation / eval JSONL in ROLL's record format,
with pairwise disjoint prompts (asserted; keys are shared, as sub-skills are). The codes
and key names depend only on `num_keys` and `task_seed`, the same for every split and every
experiment seed.
"""

from __future__ import annotations

import functools
import json
import os
import random
import string

DIGITS = 4


@functools.lru_cache(maxsize=8)
def make_keys(num_keys: int, task_seed: int = 0) -> tuple[tuple[str, str], ...]:
  """((name, code), ...) for keys of rank 1..num_keys (distinct three-letter names, random
  two-digit codes)."""
  if not 1 <= num_keys <= 26 ** 3:
    raise ValueError(f'num_keys={num_keys}: must be in 1..{26 ** 3}')
  rng = random.Random(f'keyed-{num_keys}-{task_seed}')
  names: set[str] = set()
  out = []
  while len(out) < num_keys:
    name = ''.join(rng.choice(string.ascii_uppercase) for _ in range(3))
    if name in names:
      continue
    names.add(name)
    out.append((name, f'{rng.randrange(100):02d}'))
  return tuple(out)


def parse(prompt: str) -> tuple[str, str]:
  name, sep, x = prompt.partition(':')
  if not sep or len(name) != 3 or not x.isdigit():
    raise ValueError(f'malformed prompt {prompt!r}; expected NAME:DIGITS')
  return name, x


def answer(prompt: str, num_keys: int, task_seed: int = 0) -> str:
  name, x = parse(prompt)
  return f'{x}-{dict(make_keys(num_keys, task_seed))[name]}'


def solve(prompt: str, num_keys: int, task_seed: int = 0) -> str:
  """The written solution: `#### ` then the operand and the key's code."""
  return f'#### {answer(prompt, num_keys, task_seed)}'


def zipf_weights(num_keys: int, exponent: float) -> list[float]:
  """Normalised p(rank k) proportional to 1 / k^exponent, k = 1..num_keys."""
  w = [1.0 / (k ** exponent) for k in range(1, num_keys + 1)]
  z = sum(w)
  return [x / z for x in w]


def make_records(n: int, *, seed: int, num_keys: int, exponent: float = 1.0,
                 uniform: bool = False, task_seed: int = 0, prefix: str = 'keyed',
                 tag: str = 'keyed', exclude: set | None = None) -> list[dict]:
  """`n` distinct prompts (key by Zipf rank, or uniform over keys with `uniform`), each
  with its written solution under 'response' and the answer under 'ground_truth'.
  Prompts in `exclude` are never drawn."""
  keys = make_keys(num_keys, task_seed)
  if n > num_keys * 10 ** DIGITS // 2:
    raise ValueError(f'n={n} is too many distinct prompts for {num_keys} keys')
  rng = random.Random(seed)
  weights = None if uniform else zipf_weights(num_keys, exponent)
  seen = set(exclude or ())
  out = []
  while len(out) < n:
    k = rng.randrange(num_keys) if uniform else rng.choices(range(num_keys), weights)[0]
    name, code = keys[k]
    x = ''.join(rng.choice(string.digits) for _ in range(DIGITS))
    p = f'{name}:{x}'
    if p in seen:
      continue
    seen.add(p)
    y = f'{x}-{code}'
    out.append({'id': f'{prefix}-{len(out)}', 'prompt': p, 'tag': tag, 'ground_truth': y,
                'response': f'#### {y}', 'source': 'synthetic', 'rank': k + 1})
  return out


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_dataset(directory: str, *, num_keys: int, n_teacher: int, n_pool: int, n_val: int,
                  n_eval: int, exponent: float = 1.0, seed: int = 0,
                  task_seed: int = 0) -> dict:
  """Writes, with pairwise disjoint prompts:
    teacher.jsonl  `n_teacher` prompts with keys uniform (the teacher's ground-truth SFT);
    pool.jsonl     `n_pool` Zipf prompts: the student's SFT prompts (nested prefixes of it
                   are the N, 2N, 4N, ... sets) and the methods' training prompts;
    val.jsonl      `n_val` Zipf prompts (choosing hyperparameters);
    eval.jsonl     `n_eval` Zipf prompts (held out, reported only).
  Returns their paths."""
  os.makedirs(directory, exist_ok=True)
  kw = dict(num_keys=num_keys, exponent=exponent, task_seed=task_seed)
  sets = {}
  used: set[str] = set()
  for name, n, s, uni in (('eval', n_eval, 1, False), ('val', n_val, 2, False),
                          ('pool', n_pool, 3, False), ('teacher', n_teacher, 4, True)):
    sets[name] = make_records(n, seed=seed * 1000 + s, uniform=uni, prefix=name,
                              exclude=used, **kw)
    prompts = {r['prompt'] for r in sets[name]}
    assert not prompts & used, f'{name} overlaps an earlier split'
    used |= prompts
  paths = {}
  for name, recs in sets.items():
    paths[name] = os.path.join(directory, f'{name}.jsonl')
    write_jsonl(paths[name], recs)
  return paths
