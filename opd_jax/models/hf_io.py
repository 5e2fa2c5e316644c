"""Hugging Face checkpoint I/O: config.json + safetensors (single file or sharded with an index).

Loading never materialises a full copy of a tensor per device: each parameter is built with
`jax.make_array_from_callback`, and the callback reads only the slice a device owns from a
memory-mapped safetensors file. Stacked layer parameters [L, ...] are assembled from the
per-layer HF tensors `model.layers.{i}.…` slice by slice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.models.config import ModelConfig, read_hf_config
from opd_jax.models.decoder import Decoder

log = logging.getLogger(__name__)

_ST_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# Tensors some checkpoints carry that a decoder does not need.
_IGNORABLE = re.compile(r'.*rotary_emb\.inv_freq$|^lm_head\.weight$')


class CheckpointError(ValueError):
  """A checkpoint whose tensors do not match its config.json."""


# ---------------------------------------------------------------------------- reading
class SafetensorsReader:
  """Lazy, slice-level reader over `model.safetensors` or an index of shards."""

  def __init__(self, path: str):
    index = os.path.join(path, 'model.safetensors.index.json')
    single = os.path.join(path, 'model.safetensors')
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files = ['model.safetensors']
    else:
      raise FileNotFoundError(
          f'{path}: no model.safetensors or model.safetensors.index.json '
          '(opd_jax reads safetensors weights only)')
    self.entries: dict[str, tuple[str, str, tuple[int, ...], int]] = {}
    for fname in files:
      full = os.path.join(path, fname)
      if not os.path.exists(full):
        raise FileNotFoundError(f'{index}: lists shard {fname}, which does not exist')
      with open(full, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
      for name, meta in header.items():
        if name == '__metadata__':
          continue
        start, _ = meta['data_offsets']
        self.entries[name] = (full, meta['dtype'], tuple(meta['shape']), 8 + n + start)
    self._maps: dict[str, np.ndarray] = {}

  def __contains__(self, name):
    return name in self.entries

  def keys(self):
    return self.entries.keys()

  def shape(self, name) -> tuple[int, ...]:
    return self.entries[name][2]

  def file(self, name) -> str:
    return self.entries[name][0]

  def array(self, name) -> np.ndarray:
    """A read-only memory map of the tensor (reads happen on slicing)."""
    full, dtype, shape, offset = self.entries[name]
    if dtype not in _ST_DTYPES:
      raise CheckpointError(f'{full}: tensor {name!r} has unsupported dtype {dtype}')
    return np.memmap(full, dtype=_ST_DTYPES[dtype], mode='r', offset=offset, shape=shape)


def hf_name(path: str, layer: int | None = None) -> str:
  """HF tensor name of an opd_jax parameter path (stacked `layers/...` need the layer)."""
  dotted = path.replace('/', '.')
  if path.startswith('lm_head/'):
    return dotted
  if path.startswith('layers/'):
    return f'model.layers.{layer}.' + dotted[len('layers.'):]
  return 'model.' + dotted


def _abstract_model(cfg: ModelConfig, dtype, hf_config: dict | None):
  return nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0), hf_config=hf_config))


def load_pretrained(path: str, *, mesh: jax.sharding.Mesh | None = None, dtype=jnp.float32,
                    rules: str | shd.Rules | None = None) -> Decoder:
  """Loads a local HF model directory (config.json + safetensors) into a `Decoder`.

  With `mesh`, every parameter is created directly on its shards following `rules`
  (default 'fsdp_tp'); without, parameters live on the default device. `dtype` is the
  parameter and activation dtype (float32 or bfloat16); logits are always float32.
  """
  cfg, hf = read_hf_config(path)
  reader = SafetensorsReader(path)
  abstract = _abstract_model(cfg, dtype, hf)
  graphdef, abs_state = nnx.split(abstract)
  np_dtype = np.dtype(jnp.dtype(dtype))

  # Check every tensor's presence and shape before reading anything.
  flat = jax.tree_util.tree_flatten_with_path(abs_state)
  used = set()
  for kp, leaf in flat[0]:
    p = shd.path_str(kp)
    stacked = p.startswith('layers/')
    names = [hf_name(p, i) for i in range(cfg.num_layers)] if stacked else [hf_name(p)]
    want = tuple(leaf.shape[1:]) if stacked else tuple(leaf.shape)
    for n in names:
      if n not in reader:
        raise CheckpointError(f'{path}: tensor {n!r} is missing from the checkpoint '
                              f'(expected shape {want} for this config.json)')
      if reader.shape(n) != want:
        raise CheckpointError(f'{reader.file(n)}: tensor {n!r} has shape {reader.shape(n)}, '
                              f'expected {want} for this config.json')
      used.add(n)
  unexpected = [n for n in reader.keys() if n not in used and not _IGNORABLE.match(n)]
  if unexpected:
    log.warning('%s: %d checkpoint tensors are not used by the %s decoder: %s', path,
                len(unexpected), cfg.model_type, ', '.join(sorted(unexpected)[:8]))

  shardings = (shd.param_shardings(abs_state, mesh, rules) if mesh is not None else None)

  def build(kp, leaf, sharding=None):
    p = shd.path_str(kp)

    def read(index):
      if p.startswith('layers/'):
        layers = range(cfg.num_layers)[index[0]]
        parts = [reader.array(hf_name(p, i))[index[1:]] for i in layers]
        block = np.stack(parts) if parts else np.zeros((0,) + leaf.shape[1:], np_dtype)
      else:
        block = reader.array(hf_name(p))[index]
      return np.ascontiguousarray(block).astype(np_dtype)

    if sharding is None:
      return jnp.asarray(read(tuple(slice(None) for _ in leaf.shape)))
    return jax.make_array_from_callback(leaf.shape, sharding, read)

  if shardings is None:
    state = jax.tree_util.tree_map_with_path(build, abs_state)
  else:
    state = jax.tree_util.tree_map_with_path(build, abs_state, shardings)
  return nnx.merge(graphdef, state)


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                 dtype=jnp.float32, rules: str | shd.Rules | None = None,
                 hf_config: dict | None = None) -> Decoder:
  """A randomly initialised decoder (HF-style N(0, 0.02) weights), created already sharded."""
  def make():
    return nnx.split(Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(seed), hf_config=hf_config))[1]
  graphdef, abs_state = nnx.split(_abstract_model(cfg, dtype, hf_config))
  out = None if mesh is None else shd.param_shardings(abs_state, mesh, rules)
  state = jax.jit(make, out_shardings=out)()
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- writing
def _write_safetensors(fname: str, tensors: dict[str, np.ndarray], metadata=None):
  header: dict[str, Any] = {'__metadata__': metadata or {'format': 'pt'}}
  offset = 0
  for name, arr in tensors.items():
    header[name] = {'dtype': _ST_NAMES[arr.dtype], 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)
  tmp = fname + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
  os.replace(tmp, fname)


def save_pretrained(model: Decoder, path: str, *, dtype=None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `path/config.json` and safetensors weights that transformers loads.

  `dtype` (default: the model's) is the stored dtype. Shards above `max_shard_bytes` get a
  `model.safetensors.index.json`. On several processes all of them must call this (the
  gather is collective); only process 0 writes.
  """
  cfg: ModelConfig = model.cfg
  dtype = np.dtype(jnp.dtype(dtype or model.dtype))
  _, state = nnx.split(model)
  tensors: dict[str, np.ndarray] = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    p = shd.path_str(kp)
    arr = shd.to_host(leaf).astype(dtype)
    if p.startswith('layers/'):
      for i in range(cfg.num_layers):
        tensors[hf_name(p, i)] = arr[i]
    else:
      tensors[hf_name(p)] = arr
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  tensors = dict(sorted(tensors.items()))
  shards, current, size = [], {}, 0
  for name, arr in tensors.items():
    if current and size + arr.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = arr
    size += arr.nbytes
  shards.append(current)
  for stale in ('model.safetensors', 'model.safetensors.index.json'):
    if os.path.exists(os.path.join(path, stale)):
      os.remove(os.path.join(path, stale))
  if len(shards) == 1:
    _write_safetensors(os.path.join(path, 'model.safetensors'), shards[0])
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
      _write_safetensors(os.path.join(path, fname), shard)
      weight_map.update({n: fname for n in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  hf = cfg.to_hf_dict(base=model.hf_config, dtype=str(jnp.dtype(dtype)))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
