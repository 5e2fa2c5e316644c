"""The AOT check's collectives and time: which decode loops gather weights per token, and an
estimated time per phase on the target's chips (`opd_jax.tools.aot` compiles, this module
reads its reports; the chip table and the roofline are `opd_jax.tools.roofline`).

Legend: B rows, P prompt slots, N new tokens, L sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax import sharding as shd
from opd_jax.buckets import batch_bucket
from opd_jax.teachers.local import LocalTeacher
from opd_jax.tools import roofline
from opd_jax.training import flops as compute

GiB = 2**30
# A decode loop may gather at most this fraction of the sampled model's parameter bytes per
# generated token (activations such as a vocabulary-split logits row are far below it).
DECODE_GATHER_LIMIT = 0.01


def sds(shape, dtype, sharding):
  """A ShapeDtypeStruct carrying its sharding."""
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def bytes_by_device(tree) -> dict[Any, int]:
  """Bytes each device holds of a pytree of sharded ShapeDtypeStructs."""
  out: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    per = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for d in x.sharding.device_set:
      out[d] = out.get(d, 0) + per
  return out


def frozen(r) -> list:
  """The in-process teachers, then the G-OPD reference: the frozen models compiled here."""
  return [t for t in r.teachers if isinstance(t, LocalTeacher)] + (
      [r.reference] if r.reference is not None else [])


_DECODE_LOOPS = ('/decode', '/segment', '/turn')  # a multi-turn episode's turn is a decode loop


def _sampled_param_bytes(r, name: str) -> int:
  """Bytes of the parameters that the function `name` decodes with (all shards)."""
  if name.startswith('rollout/') and name.split('/')[1] in {t.name for t in r.teachers}:
    t = next(t for t in r.teachers if t.name == name.split('/')[1])
    tree = t.params
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return sum(math.prod(x.shape) * (r.compute_dtype.itemsize if jnp.issubdtype(
      x.dtype, jnp.floating) else x.dtype.itemsize) for x in jax.tree.leaves(r.plain_params))


def decode_gathers(r, reports) -> list[dict]:
  """Per decode loop (rollout/decode, eval/decode, rollout/segment, rollout/turn, ...): the
  bytes it all-gathers per iteration (per generated token) on the busiest device, next to the
  sampled model's parameter bytes; above DECODE_GATHER_LIMIT of them is an error (the
  weights are being gathered at every token)."""
  out = []
  for f in reports:
    if not f.name.endswith(_DECODE_LOOPS) or not f.collectives:
      continue
    per_iter = max((lp['per_iter'].get('all-gather', 0) for lp in f.collectives['loops']),
                   default=0)
    params = _sampled_param_bytes(r, f.name)
    largest = [x for lp in f.collectives['loops'] for x in lp['largest']
               if x['kind'] == 'all-gather'][:3]
    out.append(dict(name=f.name, gathered_per_token=per_iter, param_bytes=params,
                    fraction=per_iter / params if params else 0.0,
                    error=per_iter > DECODE_GATHER_LIMIT * params, largest=largest))
  return out


def _ici(f, trips_default: int = 1) -> tuple[float, float]:
  """(collective bytes, collective instructions) of one call of a compiled function, loops
  counted by their trip counts (a decode loop: `trips_default`, its token budget)."""
  if f is None or not f.collectives:
    return 0.0, 0.0
  c = f.collectives
  total = sum(c['outside'].values())
  runs = 0.0
  for lp in c['loops']:
    n = lp['trips'] if lp['trips'] is not None else trips_default
    n = min(n, trips_default) if f.name.endswith(_DECODE_LOOPS) else n
    total += sum(lp['per_iter'].values()) * n
    runs += lp['collectives'] * n
  return total, runs


def phase_estimates(r, reports, target, config, rows: int, p_len: int, seq: int) -> dict:
  """The step's rollout, scoring and update seconds on the target's chips (roofline.py),
  each with its binding resource, and the implied MFU. FLOPs are compute.py's executed
  (padded) counts; HBM bytes are the weights and KV cache each device reads (see the
  rows below); ICI bytes are the compiled programs' collectives, loops by trip count."""
  chip = roofline.CHIPS[target.generation]
  n_dev = len(target.devices)
  per_chip = chip.cores if target.kind == 'tpu-topology' else 1
  dev = roofline.Chip(chip.name, chip.peak_flops / per_chip, chip.hbm_bytes // per_chip,
                      chip.hbm_bw / per_chip, chip.ici_bw / per_chip)
  fns = {f.name: f for f in reports}
  out: dict = {'chip': chip.name, 'devices': n_dev, 'per_device': dataclasses.asdict(dev),
               'phases': {}}
  cfg = r.student_cfg
  item = r.compute_dtype.itemsize
  rb = rows
  if config.mode == 'opd' and ('rollout/decode' in fns or 'rollout/segment' in fns):
    sampler = r.sampler
    lay = sampler.run_mesh
    rb = batch_bucket(rows, shd.batch_size_multiple(lay))
    n_new = r.rollout_sp.max_new_tokens
    tp = int(lay.shape['tensor'])
    data = shd.batch_size_multiple(lay)
    w_dev = max(bytes_by_device(jax.tree.map(lambda x, sh: sds(
        x.shape, r.compute_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sh),
        r.plain_params, r.rollout_shardings)).values())
    kv_heads = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
    rows_dev = rb / data
    kv_token = roofline.kv_cache_bytes(cfg.num_layers, kv_heads, cfg.head_dim, rows_dev,
                                       p_len + n_new / 2, item)
    hbm_bound = n_new * (w_dev + kv_token)
    flops = compute.padded_rollout_flops(cfg, rb, p_len, n_new) / n_dev
    dec = fns.get('rollout/decode') or fns.get('rollout/segment')
    ici_d, runs_d = _ici(dec, n_new)
    ici_p, runs_p = _ici(fns.get('rollout/prefill') or fns.get('rollout/refill'))
    ici_c, runs_c = _ici(fns.get('rollout/cast'))
    prefill_hbm = w_dev + roofline.kv_cache_bytes(cfg.num_layers, kv_heads, cfg.head_dim,
                                                  rows_dev, p_len, item)
    est = roofline.estimate(dev, flops=flops, hbm_bytes=hbm_bound + prefill_hbm,
                            ici_bytes=ici_d + ici_p + ici_c, collectives=runs_d + runs_p + runs_c)
    out['phases']['rollout'] = dict(
        _est_dict(est), hbm_bound_s=(hbm_bound + prefill_hbm) / dev.hbm_bw,
        note=f'{n_new} decode steps of B={rb}: weights {w_dev / GiB:.2f} GiB + KV cache '
             f'{kv_token / GiB:.2f} GiB (mean length {p_len + n_new / 2:.0f}) per device '
             f'per token; collectives: decode {ici_d / max(n_new, 1) / 2**20:.1f} MiB per '
             f'token, prefill {ici_p / GiB:.2f} GiB, relayout {ici_c / GiB:.2f} GiB')
  if config.mode == 'opd':
    for t in frozen(r):
      f = fns.get(f'score/{t.name}')
      if f is None:
        continue
      tb = batch_bucket(rows, shd.batch_size_multiple(t.mesh))
      t_dev = t.mesh.devices.size
      w = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(t.params))
      w_read = w / int(t.mesh.shape['tensor']) * max(1, int(config.batch.micro_batches))
      ici, runs = _ici(f)
      est = roofline.estimate(dev, flops=compute.padded_score_flops(t.cfg, tb, seq) / t_dev,
                              hbm_bytes=w_read, ici_bytes=ici, collectives=runs)
      out['phases'][f'score/{t.name}'] = dict(
          _est_dict(est), note=f'B={tb} L={seq} on {t_dev} devices: gathered weights '
                               f'{w_read / GiB:.2f} GiB read per device')
  f = fns.get('update')
  if f is not None:
    mini = int(config.batch.mini_batches)
    micro = int(config.batch.micro_batches)
    ub = rows // mini
    tens = int(r.mesh.shape['tensor'])
    w = sum(math.prod(x.shape) for x in jax.tree.leaves(r.plain_params))
    # per micro-batch: the weights read in the forward, the rematerialised forward and the
    # backward; per optimizer step: params, grads, 2 moments read and params, moments written
    w_read = w * item / tens * 3 * micro + w * 4 * 7 / n_dev
    ici, runs = _ici(f)
    flops = compute.padded_update_flops(cfg, ub, seq, remat=bool(config.student.remat)) / n_dev
    est = roofline.estimate(dev, flops=flops * mini, hbm_bytes=w_read * mini,
                            ici_bytes=ici * mini, collectives=runs * mini)
    out['phases']['update'] = dict(_est_dict(est), note=f'{mini} x B={ub} L={seq}')
  step_s = sum(p['seconds'] for p in out['phases'].values())
  model = 0.0
  if 'rollout' in out['phases']:
    model += compute.padded_rollout_flops(cfg, rb, p_len, r.rollout_sp.max_new_tokens)
  if config.mode == 'opd':
    for t in frozen(r):
      if f'score/{t.name}' in fns:
        model += compute.padded_score_flops(t.cfg, batch_bucket(
            rows, shd.batch_size_multiple(t.mesh)), seq)
  if 'update' in fns:
    model += compute.padded_update_flops(cfg, rows, seq, remat=False)
  out['step_seconds'] = step_s
  out['mfu'] = model / (step_s * dev.peak_flops * n_dev) if step_s else 0.0
  return out


def _sec(x: float) -> str:
  return f'{x:.2f} s' if x >= 0.1 else f'{x * 1e3:.2f} ms'


def _est_dict(e: roofline.Estimate) -> dict:
  return dict(seconds=e.seconds, binding=e.binding, flops=e.flops, hbm_bytes=e.hbm_bytes,
              ici_bytes=e.ici_bytes, compute_s=e.compute_s, hbm_s=e.hbm_s, ici_s=e.ici_s,
              latency_s=e.latency_s)


def report_lines(rep: dict, fmt) -> list[str]:
  """The report's collectives table, decode-gather verdicts and time estimates, as lines
  (`fmt` formats a byte count)."""
  lines = []
  head = ('collectives per device', 'all-gather', 'all-reduce', 'red-scatter', 'permute',
          'all-to-all')
  kinds = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')
  crow = []
  for f in rep['functions']:
    c = f.get('collectives')
    if not c:
      continue
    crow.append((f'{f["name"]}  once', *[fmt(c['outside'].get(k, 0)) for k in kinds]))
    for i, lp in enumerate(c['loops']):
      trips = f'x{lp["trips"]}' if lp['trips'] is not None else 'x?'
      crow.append((f'{f["name"]}  loop {i} per iteration ({trips})',
                   *[fmt(lp['per_iter'].get(k, 0)) for k in kinds]))
  if crow:
    w0 = max(len(r[0]) for r in crow + [head])
    for r in [head] + crow:
      lines.append((f'{r[0]:<{w0}}' + ''.join(f'{c:>12}' for c in r[1:])).rstrip())
  for g in rep.get('decode_gathers') or []:
    flag = 'ERROR: the weights are gathered at every token' if g['error'] else 'ok'
    lines.append(f'{g["name"]}: gathers {fmt(g["gathered_per_token"])} per generated token '
                 f'= {100 * g["fraction"]:.2f}% of the {fmt(g["param_bytes"])} it samples '
                 f'with (limit {100 * DECODE_GATHER_LIMIT:g}%): {flag}'
                 + (''.join(f'\n    {x["shape"]} {fmt(x["bytes"])}' for x in g['largest'])
                    if g['error'] else ''))
  est = rep.get('estimates')
  if est:
    d = est['per_device']
    lines.append('')
    lines.append(f'estimated time per step on {est["chip"]} ({est["devices"]} devices; per '
                 f'device {d["peak_flops"] / 1e12:.0f} TFLOP/s, HBM {d["hbm_bw"] / 1e9:.0f} '
                 f'GB/s, ICI {d["ici_bw"] / 1e9:.0f} GB/s; opd_jax/tools/roofline.py)')
    for name, p in est['phases'].items():
      extra = (f', HBM bound {_sec(p["hbm_bound_s"])} = '
               f'{p["seconds"] / p["hbm_bound_s"]:.2f}x' if p.get('hbm_bound_s') else '')
      lines.append(f'  {name:<16} {_sec(p["seconds"]):>10}  bound by {p["binding"]:<8} '
                   f'(compute {_sec(p["compute_s"])}, HBM {_sec(p["hbm_s"])}, ICI '
                   f'{_sec(p["ici_s"])}, latency {_sec(p["latency_s"])}{extra})')
      lines.append(f'  {"":<16} {p["note"]}')
    lines.append(f'  step             {_sec(est["step_seconds"]):>10}  implied MFU '
                 f'{100 * est["mfu"]:.1f}% (executed model FLOPs, no remat)')
  return lines
