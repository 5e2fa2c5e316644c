"""Synthetic facts to memorise: a three-letter name and its three-digit number.

  prompt:    "QZK?"
  response:  "#### 482"

There is nothing to infer: the number is random, so a model knows a fact only if training
put it there. The continual-learning experiment uses these as new "knowledge" learned by
SFT; its knowledge test asks the very facts that were trained (recall is what is measured),
while the behaviour it protects is tested on held-out problems.
"""

from __future__ import annotations

import random
import string


def make_facts(n: int, *, seed: int, tag: str = 'fact') -> list[dict]:
  """`n` facts with distinct names, in the record format of the other tasks ('response'
  for SFT, 'ground_truth' for the exact-match checker)."""
  if n > 26 ** 3:
    raise ValueError(f'at most {26 ** 3} distinct three-letter names, asked for {n}')
  rng = random.Random(seed)
  names: set[str] = set()
  out = []
  while len(out) < n:
    name = ''.join(rng.choice(string.ascii_uppercase) for _ in range(3))
    if name in names:
      continue
    names.add(name)
    value = rng.randint(100, 999)
    out.append({'id': f'{tag}-{len(out)}', 'prompt': f'{name}?', 'tag': tag,
                'ground_truth': str(value), 'response': f'#### {value}',
                'source': 'synthetic'})
  return out
