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


def read_events(workdir):
  """{tag: [(step, value or text)]} from the tensorboardX event files in `workdir`
  (a plain TFRecord reader: length, crc, payload, crc)."""
  import glob
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + n]
      pos += 12 + n + 4
      ev = event_pb2.Event()
      ev.ParseFromString(payload)
      for v in ev.summary.value:
        if v.HasField('simple_value'):
          out.setdefault(v.tag, []).append((ev.step, v.simple_value))
        elif v.HasField('tensor'):
          text = b''.join(v.tensor.string_val).decode()
          out.setdefault(v.tag.replace('/text_summary', ''), []).append((ev.step, text))
  return out
