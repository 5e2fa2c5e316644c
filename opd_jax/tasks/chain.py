"""Chained modular arithmetic written out step by step: a multi-step reasoning task whose
early mistakes compound, with a rule-based checker (the 'exact_match' reward).

  prompt:    "7+5*3-9+4"
  response:  "7+5=2\n2*3=6\n6-9=7\n7+4=1\n#### 1"

The expression is evaluated left to right modulo 10 (no operator precedence). Each line
applies one operation to the running value (the previous line's result), so every line
depends on the line before: one wrong digit early makes every later line (and the answer)
wrong, while each step alone is a lookup in a 10x10 table (+, - or * mod 10) plus finding
the step's operator and operand in the prompt. Every problem of a dataset has the same
number of steps (4 by default), so prompts have one length and the operand of step i sits at
a fixed offset from line i: with variable lengths the tiny CPU models here stalled for
hundreds of steps before finding the operands. The answer follows `####` and is
checked by exact match against `ground_truth`; the checker needs nothing but the record.

`write_dataset` writes train / validation / eval JSONL in ROLL's record format. The three
sets are pairwise disjoint (asserted): the validation split is drawn from the training
distribution for choosing hyperparameters, the eval set is held out for reporting only.
"""

from __future__ import annotations

import json
import os
import random

OPS = '+-*'          # the full operator set; datasets may use a subset
MOD = 10


def apply(op: str, x: int, y: int, mod: int = MOD) -> int:
  if op == '+':
    return (x + y) % mod
  if op == '-':
    return (x - y) % mod
  if op == '*':
    return (x * y) % mod
  raise ValueError(f'unknown op {op!r}')


def parse(prompt: str) -> tuple[int, list[tuple[str, int]]]:
  """'7+5*3' -> (7, [('+', 5), ('*', 3)]) (single-digit operands)."""
  start, rest = int(prompt[0]), prompt[1:]
  if len(rest) % 2:
    raise ValueError(f'malformed prompt {prompt!r}')
  return start, [(rest[i], int(rest[i + 1])) for i in range(0, len(rest), 2)]


def solve(prompt: str, mod: int = MOD) -> str:
  """The written-out solution of a prompt: one line `x<op>y=z` per operation, where x is
  the previous line's result."""
  x, steps = parse(prompt)
  lines = []
  for op, y in steps:
    z = apply(op, x, y, mod)
    lines.append(f'{x}{op}{y}={z}')
    x = z
  lines.append(f'#### {x}')
  return '\n'.join(lines)


def answer(prompt: str, mod: int = MOD) -> int:
  x, steps = parse(prompt)
  for op, y in steps:
    x = apply(op, x, y, mod)
  return x


def check(response: str, prompt: str) -> bool:
  """The rule-based checker: the number after the last '####' equals the true value."""
  if '####' not in response:
    return False
  return response.rsplit('####', 1)[1].strip() == str(answer(prompt))


def random_prompt(rng: random.Random, min_steps: int, max_steps: int, ops: str = OPS) -> str:
  k = rng.randint(min_steps, max_steps)
  return str(rng.randrange(MOD)) + ''.join(rng.choice(ops) + str(rng.randrange(MOD))
                                           for _ in range(k))


def make_records(n: int, *, seed: int, min_steps: int = 4, max_steps: int = 4,
                 ops: str = OPS, prefix: str = 'chain',
                 exclude: set | None = None) -> list[dict]:
  """`n` distinct problems, tag 'chain', written solution under 'response' (SFT) and the
  final value under 'ground_truth' (the checker). Prompts in `exclude` are never drawn."""
  rng = random.Random(seed)
  seen = set(exclude or ())
  out = []
  while len(out) < n:
    p = random_prompt(rng, min_steps, max_steps, ops)
    if p in seen:
      continue
    seen.add(p)
    out.append({'id': f'{prefix}-{len(out)}', 'prompt': p, 'tag': 'chain',
                'ground_truth': str(answer(p)), 'response': solve(p), 'source': 'synthetic'})
  return out


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def write_dataset(directory: str, *, n_train: int, n_val: int, n_eval: int, seed: int = 0,
                  **kw) -> dict:
  """Writes train.jsonl, val.jsonl and eval.jsonl (pairwise disjoint prompts) and returns
  their paths. `seed` fixes the problems (the same for every method and training seed)."""
  os.makedirs(directory, exist_ok=True)
  eval_recs = make_records(n_eval, seed=seed * 1000 + 1, prefix='eval', **kw)
  held_out = {r['prompt'] for r in eval_recs}
  val_recs = make_records(n_val, seed=seed * 1000 + 2, prefix='val', exclude=held_out, **kw)
  val_prompts = {r['prompt'] for r in val_recs}
  train_recs = make_records(n_train, seed=seed * 1000, prefix='train',
                            exclude=held_out | val_prompts, **kw)
  train_prompts = {r['prompt'] for r in train_recs}
  assert not train_prompts & held_out, 'train and eval overlap'
  assert not train_prompts & val_prompts, 'train and validation overlap'
  assert not val_prompts & held_out, 'validation and eval overlap'
  paths = {}
  for name, recs in (('train', train_recs), ('val', val_recs), ('eval', eval_recs)):
    paths[name] = os.path.join(directory, f'{name}.jsonl')
    write_jsonl(paths[name], recs)
  return paths
