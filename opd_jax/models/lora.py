"""LoRA students: frozen base + trainable low-rank adapters (docs/design.md §9).

  check_targets(spec, base)         the target regex matches projections only, at least one
  abstract_lora(cfg, hf, spec, ...) (graphdef of the adapted Decoder, adapter
                                    ShapeDtypeStructs with their shardings)
  init_adapters(...)                the adapters, created on their shards (B = 0)
  merge_params(base, adapters, spec)   W + (alpha / r) B A for every adapted weight: a plain
                                    parameter tree (the sampler, evaluation and the export)
  save_peft_adapter(...)            adapter_config.json + adapter_model.safetensors in PEFT's
                                    format and key names
  param_counts(params, base)        {'params/trainable', 'params/total'}

The model applies the adapters in its forward (`Decoder(lora=...)`, nnx.LoRA modules inside
the projections), which the update differentiates with respect to the adapters only; the
frozen base is a separate argument of the update, never in the optimizer state. The rollout
and evaluation instead sample from merged weights, computed once per step, so the decode
loop (fused q/k/v and gate/up matmuls, per-token weight reads) is exactly the plain model's.

Adapter layout: nnx.LoRA's `lora_a` [L, in, r], `lora_b` [L, r, out] (stacked layers); PEFT's
`lora_A.weight` is [r, in] and `lora_B.weight` [out, r] per layer (transposes on export).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax import sharding as shd
from opd_jax.models.decoder import Decoder, LoraSpec

# Parameter paths an adapter may target: the layers' seven projections.
_TARGETABLE = re.compile(r'layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/weight')
_ADAPTER = re.compile(r'(layers/.*_proj)/lora/lora_(a|b)')


def check_targets(spec: LoraSpec, base_params) -> list[str]:
  """The weight paths `spec` adapts; ValueError when it matches a parameter that cannot take
  an adapter (embeddings, LM head, norms, biases) or no projection at all."""
  paths = [shd.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(base_params)[0]]
  hit = [p for p in paths if re.fullmatch(spec.targets, p)]
  bad = [p for p in hit if not _TARGETABLE.fullmatch(p)]
  if bad:
    raise ValueError(f'matches {bad}, which cannot take an adapter (only the layers\' '
                     f'q/k/v/o/gate/up/down_proj weights can)')
  if not hit:
    raise ValueError('matches no parameter; it is matched in full against weight paths such '
                     f'as {", ".join(p for p in paths if _TARGETABLE.fullmatch(p))}')
  return hit


def _lora_model(cfg, hf, spec: LoraSpec, dtype, seed: int = 0):
  return Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(seed), hf_config=hf, lora=spec)


def _split(model):
  """(graphdef, adapters, base) of an adapted Decoder."""
  return nnx.split(model, nnx.LoRAParam, ...)


def adapter_shardings(adapters, base_shardings):
  """Each adapter follows its weight's layout: with the weight [L, out, in] sharded
  (l, o, i), lora_a [L, in, r] is (l, i, None) and lora_b [L, r, out] is (l, None, o)."""
  base_by_path = {shd.path_str(kp): s for kp, s in
                  jax.tree_util.tree_flatten_with_path(base_shardings)[0]}

  def one(kp, _):
    m = _ADAPTER.fullmatch(shd.path_str(kp))
    ws = base_by_path[m.group(1) + '/weight']
    if not isinstance(ws, NamedSharding):  # one device
      return ws
    spec = tuple(ws.spec) + (None,) * (3 - len(ws.spec))
    lay, out, inp = spec
    return NamedSharding(ws.mesh, P(lay, inp, None) if m.group(2) == 'a' else P(lay, None, out))
  return jax.tree_util.tree_map_with_path(one, adapters)


def abstract_lora(cfg, hf, spec: LoraSpec, base_shardings, dtype):
  """(graphdef of the adapted Decoder, adapters as ShapeDtypeStructs with shardings)."""
  graphdef, adapters, _ = _split(nnx.eval_shape(lambda: _lora_model(cfg, hf, spec, dtype)))
  shardings = adapter_shardings(adapters, base_shardings)
  return graphdef, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), adapters, shardings)


def init_adapters(cfg, hf, spec: LoraSpec, base_shardings, dtype, seed: int = 0):
  """(graphdef, adapters) with adapters created on their shards: lora_a from nnx.LoRA's
  initialiser, lora_b = 0 (the adapted model starts as the base). The base weights the jit
  would also initialise are not outputs, so XLA drops them."""
  graphdef, abstract = abstract_lora(cfg, hf, spec, base_shardings, dtype)
  out = jax.tree.map(lambda x: x.sharding, abstract)
  adapters = jax.jit(lambda: _split(_lora_model(cfg, hf, spec, dtype, seed))[1],
                     out_shardings=out)()
  return graphdef, adapters


def _flat(tree) -> dict[str, Any]:
  return {shd.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _pairs(adapters) -> dict[str, tuple[Any, Any]]:
  """{weight path: (lora_a [L, in, r], lora_b [L, r, out])}."""
  out: dict[str, list] = {}
  for p, x in _flat(adapters).items():
    m = _ADAPTER.fullmatch(p)
    out.setdefault(m.group(1) + '/weight', [None, None])['ab'.index(m.group(2))] = x
  return {k: (a, b) for k, (a, b) in out.items()}


def merge_params(base, adapters, spec: LoraSpec, dtype=None):
  """The plain parameter tree with W + scale * (a b)^T on every adapted weight, computed in
  float32 and stored in `dtype` (default: the base's). Jit it with the base's shardings as
  out_shardings to keep each weight's layout."""
  pairs = _pairs(adapters)

  def one(kp, w):
    p = shd.path_str(kp)
    out_dtype = dtype or w.dtype
    if p not in pairs:
      return w.astype(out_dtype)
    a, b = pairs[p]
    delta = jnp.einsum('lir,lro->loi', a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + spec.scale * delta).astype(out_dtype)
  return jax.tree_util.tree_map_with_path(one, base)


def join(adapters, base):
  """One state for nnx.merge(adapted graphdef, ...): base and adapters together."""
  return nnx.merge_state(base, adapters)


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_counts(params, base=None) -> dict[str, float]:
  """{'params/trainable', 'params/total'}: the trained parameters, and those plus the frozen
  base (LoRA) or the same count (full fine-tuning)."""
  n = num_params(params)
  return {'params/trainable': float(n),
          'params/total': float(n + (num_params(base) if base is not None else 0))}


# ------------------------------------------------------------------------------- export
PEFT_ADAPTER_CONFIG = 'adapter_config.json'
PEFT_ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def peft_state(adapters, num_layers: int) -> dict[str, np.ndarray]:
  """PEFT's tensors: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
  [r, in] and `....lora_B.weight` [out, r], float32."""
  out = {}
  for path, (a, b) in _pairs(adapters).items():
    a, b = shd.to_host(a).astype(np.float32), shd.to_host(b).astype(np.float32)
    module = path[len('layers/'):-len('/weight')].replace('/', '.')
    for i in range(num_layers):
      prefix = f'base_model.model.model.layers.{i}.{module}'
      out[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a[i].T)
      out[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b[i].T)
  return dict(sorted(out.items()))


def peft_config(spec: LoraSpec, adapters, base_model: str) -> dict:
  """adapter_config.json: PEFT's LoraConfig fields for these adapters."""
  modules = sorted({p.rsplit('/', 2)[-2] for p in _pairs(adapters)})
  return {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model,
      'r': int(spec.rank), 'lora_alpha': float(spec.alpha), 'target_modules': modules,
      'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
      'use_dora': False, 'init_lora_weights': True, 'inference_mode': True,
      'modules_to_save': None, 'layers_to_transform': None, 'layers_pattern': None,
      'rank_pattern': {}, 'alpha_pattern': {}, 'revision': None,
  }


def save_peft_adapter(spec: LoraSpec, adapters, path: str, *, base_model: str,
                      num_layers: int) -> None:
  """Writes `path/adapter_config.json` and `path/adapter_model.safetensors`, which
  `peft.PeftModel.from_pretrained(base, path)` loads. Collective on several processes (the
  gather); process 0 writes."""
  from opd_jax.models.hf_io import _write_safetensors
  tensors = peft_state(adapters, num_layers)
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  _write_safetensors(os.path.join(path, PEFT_ADAPTER_WEIGHTS), tensors)
  with open(os.path.join(path, PEFT_ADAPTER_CONFIG), 'w') as f:
    json.dump(peft_config(spec, adapters, base_model), f, indent=2, sort_keys=True)


__all__ = ['LoraSpec', 'PEFT_ADAPTER_CONFIG', 'PEFT_ADAPTER_WEIGHTS', 'abstract_lora',
           'adapter_shardings', 'check_targets', 'init_adapters', 'join', 'merge_params',
           'num_params', 'param_counts', 'peft_config', 'peft_state', 'save_peft_adapter',
]
