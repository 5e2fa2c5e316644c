"""Test helpers shared by several test modules."""

import json
import os

import numpy as np


def torch_logits(path, ids, mask=None):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    kw = {} if mask is None else {'attention_mask': torch.tensor(np.asarray(mask))}
    return model(torch.tensor(np.asarray(ids)), **kw).logits.numpy()


def rewrite_config(path, fn):
  fname = os.path.join(path, 'config.json')
  with open(fname) as f:
    cfg = json.load(f)
  cfg = fn(cfg) or cfg
  with open(fname, 'w') as f:
    json.dump(cfg, f)
