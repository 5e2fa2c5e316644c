"""Multi-digit addition with written-out column steps: a tiny reasoning task with a
rule-based checker.

  prompt:    "4721+385"
  response:  "1+5+0=6\n2+8+0=10\n7+3+1=11\n4+0+1=5\n#### 5106"

Each line adds one column (right to left) with the incoming carry; the answer follows
`####` and is checked by exact match against `ground_truth` (the reward 'exact_match').
The carry chain makes single-token mistakes compound, so the task separates a strong
teacher from a weak student, and a dense per-token signal (OPD) can fix the exact step
where the student goes wrong.
"""

from __future__ import annotations

import json
import os
import random


def solve(a: int, b: int, *, forget_carry: bool = False) -> str:
  """The written-out solution of a + b. `forget_carry` writes the classic mistake instead:
  every carry is dropped (the answer is then wrong whenever a column overflows)."""
  da, db = str(a)[::-1], str(b)[::-1]
  lines, carry, digits = [], 0, []
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    s = x + y + carry
    lines.append(f'{x}+{y}+{carry}={s}')
    digits.append(s % 10)
    carry = 0 if forget_carry else s // 10
    last = s
  answer = ('1' if last >= 10 else '') + ''.join(str(d) for d in reversed(digits))
  lines.append(f'#### {int(answer)}')
  return '\n'.join(lines)


def solve_sub(a: int, b: int, *, forget_borrow: bool = False,
              smaller_from_larger: bool = False) -> str:
  """The written-out solution of a - b (a >= b), one column per line, right to left:
  `x-y-c=z` with c the incoming borrow; a column that borrows writes its top digit as `1x`
  ("13-7-0=6"), and the next line's c is 1. `forget_borrow` writes the classic mistake: the
  borrow is taken ("13-...") but never paid back (every c is 0). `smaller_from_larger`
  writes the other classic mistake: a column whose top digit is smaller subtracts it from
  the bottom one instead of borrowing ("7-3-0=4" for 3 - 7; never a borrow)."""
  if a < b:
    raise ValueError(f'solve_sub needs a >= b, got {a}-{b}')
  if forget_borrow and smaller_from_larger:
    raise ValueError('solve_sub: forget_borrow and smaller_from_larger are exclusive')
  da, db = str(a)[::-1], str(b)[::-1]
  lines, borrow, digits = [], 0, []
  for i in range(len(da)):
    x = int(da[i])
    y = int(db[i]) if i < len(db) else 0
    need = y + borrow
    if smaller_from_larger and x < y:
      lines.append(f'{y}-{x}-0={y - x}')
      digits.append(y - x)
      nxt = 0
    elif x < need:
      lines.append(f'1{x}-{y}-{borrow}={10 + x - need}')
      digits.append(10 + x - need)
      nxt = 1
    else:
      lines.append(f'{x}-{y}-{borrow}={x - need}')
      digits.append(x - need)
      nxt = 0
    borrow = 0 if forget_borrow else nxt
  lines.append(f'#### {int("".join(str(d) for d in reversed(digits)))}')
  return '\n'.join(lines)


def make_records(n: int, *, seed: int, min_digits: int = 3, max_digits: int = 3,
                 prefix: str = 'add', exclude: set | None = None,
                 carry_error_rate: float = 0.0, op: str = '+',
                 tag: str = 'arith', sub_error: str = 'forget_borrow') -> list[dict]:
  """`n` distinct problems in ROLL's record format, tag `tag`, with the written solution
  under 'response' (for SFT) and the number under 'ground_truth' (for the checker).
  `op` is '+' (addition, `solve`) or '-' (subtraction a - b with a >= b, `solve_sub`).
  `carry_error_rate` is the fraction of responses written with forgotten carries (or
  borrows: a noisy dataset); ground_truth is always the true result. `sub_error` is the
  mistake of a noisy subtraction: 'forget_borrow' or 'smaller_from_larger' (solve_sub)."""
  if op not in ('+', '-'):
    raise ValueError(f"op={op!r}; expected '+' or '-'")
  if sub_error not in ('forget_borrow', 'smaller_from_larger'):
    raise ValueError(f"sub_error={sub_error!r}; expected 'forget_borrow' or "
                     "'smaller_from_larger'")
  rng = random.Random(seed)
  seen = set(exclude or ())
  out = []
  while len(out) < n:
    da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
    a, b = rng.randint(10 ** (da - 1), 10 ** da - 1), rng.randint(10 ** (db - 1), 10 ** db - 1)
    if op == '-' and a < b:
      a, b = b, a
    prompt = f'{a}{op}{b}'
    if prompt in seen or (op == '+' and (a, b) in seen):  # `exclude`: prompts or (a, b)
      continue
    seen.add(prompt)
    if op == '+':
      seen.add((a, b))
    noisy = rng.random() < carry_error_rate
    if op == '+':
      truth, response = a + b, solve(a, b, forget_carry=noisy)
    else:
      truth, response = a - b, solve_sub(a, b, **{sub_error: noisy})
    out.append({'id': f'{prefix}-{len(out)}', 'prompt': prompt, 'tag': tag,
                'ground_truth': str(truth), 'response': response,
                'source': 'synthetic-noisy' if noisy else 'synthetic'})
  return out


def write_dataset(directory: str, *, n_train: int, n_eval: int, seed: int = 0,
                  carry_error_rate: float = 0.5, **kw) -> dict:
  """Writes train.jsonl (clean), noisy_train.jsonl (the same problems' count, a share of
  responses with forgotten carries) and eval.jsonl (held out from both)."""
  os.makedirs(directory, exist_ok=True)
  eval_recs = make_records(n_eval, seed=seed + 1, prefix='eval', **kw)
  held_out = {tuple(map(int, r['prompt'].split('+'))) for r in eval_recs}
  train_recs = make_records(n_train, seed=seed, prefix='train', exclude=held_out, **kw)
  noisy_recs = make_records(n_train, seed=seed + 2, prefix='noisy', exclude=held_out,
                            carry_error_rate=carry_error_rate, **kw)
  paths = {}
  for name, recs in (('train', train_recs), ('noisy_train', noisy_recs), ('eval', eval_recs)):
    paths[name] = os.path.join(directory, f'{name}.jsonl')
    with open(paths[name], 'w') as f:
      for r in recs:
        f.write(json.dumps(r) + '\n')
  return paths
