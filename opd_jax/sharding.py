"""Device mesh, parameter partitioning rules and batch sharding.

The mesh has three named axes, always in this order:
  data    pure data parallelism (parameters replicated across it),
  fsdp    data parallelism with parameters (and optimizer state) sharded across it,
  tensor  tensor (model) parallelism: heads, MLP hidden units and vocabulary split.
A batch is split over ('data', 'fsdp'). Mesh axes of size 1 are free, so one rule set serves
a laptop CPU and a pod slice.

Parameter rules are (regex, spec) pairs matched against parameter paths such as
`layers/self_attn/q_proj/weight` (HF names, HF [out, in] layouts, a leading layer axis for
`layers/...`); the first rule whose regex matches the whole path gives the PartitionSpec.
A dimension that the chosen mesh axes do not divide is replicated instead (logged once), so
tiny test models run on any mesh. Student and teacher may use different rule sets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

Rules = Sequence[tuple[str, tuple[Any, ...]]]

# FSDP over the contraction (input) dimension, tensor parallelism over heads / MLP units /
# vocabulary. [L, out, in] for linear weights; [V, D] for embeddings and the LM head.
FSDP_TP_RULES: Rules = (
    (r'embed_tokens/weight', ('tensor', 'fsdp')),
    (r'lm_head/weight', ('tensor', 'fsdp')),
    (r'layers/self_attn/(q|k|v)_proj/weight', (None, 'tensor', 'fsdp')),
    (r'layers/self_attn/(q|k|v)_proj/bias', (None, 'tensor')),
    (r'layers/self_attn/o_proj/weight', (None, 'fsdp', 'tensor')),
    (r'layers/mlp/(gate|up)_proj/weight', (None, 'tensor', 'fsdp')),
    (r'layers/mlp/(gate|up)_proj/bias', (None, 'tensor')),
    (r'layers/mlp/down_proj/weight', (None, 'fsdp', 'tensor')),
    (r'.*', ()),  # norms, remaining biases: replicated
)


def _drop_axis(rules: Rules, axis: str) -> Rules:
  def drop(entry):
    if entry == axis:
      return None
    if isinstance(entry, tuple):
      kept = tuple(a for a in entry if a != axis)
      return kept or None
    return entry
  return tuple((rx, tuple(drop(e) for e in spec)) for rx, spec in rules)


RULE_SETS: dict[str, Rules] = {
    'fsdp_tp': FSDP_TP_RULES,
    'fsdp': _drop_axis(FSDP_TP_RULES, 'tensor'),
    'tp': _drop_axis(FSDP_TP_RULES, 'fsdp'),
    'replicated': ((r'.*', ()),),
}


def get_rules(rules: str | Rules | None) -> Rules:
  """A rule set by name (see RULE_SETS) or a literal sequence of (regex, spec) pairs."""
  if rules is None:
    return FSDP_TP_RULES
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f'unknown sharding rules {rules!r}; known: {", ".join(RULE_SETS)}')
    return RULE_SETS[rules]
  return tuple((rx, tuple(spec)) for rx, spec in rules)


# ---------------------------------------------------------------------------------- mesh
def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None,
              ) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) from `{'data': 1, 'fsdp': -1, 'tensor': 1}`.

  Missing axes have size 1; one axis may be -1 and takes the remaining devices.
  `devices` defaults to all devices (every process's, on a multi-host run).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {'fsdp': -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}')
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {shape}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh {shape}: axis sizes must be positive or -1')
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {shape}: {len(devices)} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'but {len(devices)} are given')
  try:
    from jax.experimental import mesh_utils
    dev_array = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # non-TPU or an irregular subset: plain row-major order is fine
    dev_array = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(dev_array, MESH_AXES)


def parse_devices(spec: str | None, devices: Sequence[Any] | None = None) -> list[Any]:
  """Selects devices by a Python slice string such as '4:8' (None or '' = all)."""
  devices = list(jax.devices() if devices is None else devices)
  if not spec:
    return devices
  try:
    parts = [int(p) if p else None for p in spec.split(':')]
    chosen = devices[slice(*parts)] if len(parts) > 1 else [devices[parts[0]]]
  except (ValueError, IndexError, TypeError) as e:
    raise ValueError(f'bad device slice {spec!r} (expected e.g. "0:4"): {e}') from e
  if not chosen:
    raise ValueError(f'device slice {spec!r} selects no devices out of {len(devices)}')
  return chosen


# ---------------------------------------------------------------------------- parameters
def path_str(key_path) -> str:
  """'layers/self_attn/q_proj/weight' from a jax key path (nnx's trailing `.value` dropped)."""
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name not in ('value', 'raw_value'):
        parts.append(k.name)
    else:
      parts.append(str(k))
  return '/'.join(parts)


_warned: set[str] = set()


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec of one parameter; axes that do not divide a dimension are dropped."""
  for rx, spec in rules:
    if re.fullmatch(rx, path):
      break
  else:
    raise ValueError(f'no sharding rule matches parameter {path!r}; add a catch-all (".*", ())')
  if len(spec) > len(shape):
    raise ValueError(f'sharding rule {rx!r} -> {spec} has more entries than parameter '
                     f'{path!r} has dimensions {tuple(shape)}')
  out = []
  for dim, entry in zip(shape, spec):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      key = f'{path}:{dim}:{axes}'
      if key not in _warned:
        _warned.add(key)
        log.warning('parameter %s: dimension %d is not divisible by mesh axes %s (size %d); '
                    'replicating that dimension', path, dim, axes, size)
      axes = ()
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(state, mesh: Mesh, rules: str | Rules | None = None):
  """A pytree of NamedShardings matching `state` (arrays or ShapeDtypeStructs)."""
  rules = get_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, spec_for(path_str(kp), x.shape, mesh, rules)), state)


# --------------------------------------------------------------------------------- batch
def batch_spec(ndim: int = 2) -> P:
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_size_multiple(mesh: Mesh) -> int:
  """Global batch sizes must be multiples of this (the data x fsdp extent)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def rows_sharding(mesh: Mesh, rows: int, ndim: int = 2) -> NamedSharding:
  """The batch sharding when the data axes divide `rows`, else replicated (small, odd-sized
  batches such as the last chunk of an evaluation)."""
  if rows % batch_size_multiple(mesh):
    return NamedSharding(mesh, P())
  return batch_sharding(mesh, ndim)


def shard_batch(batch, mesh: Mesh):
  """Places a pytree of host arrays [B, ...] (the *global* batch, identical on every process)
  with B split over the data axes. On several processes use `shard_local_batch`."""
  mult = batch_size_multiple(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % mult:
      raise ValueError(f'batch dimension {x.shape[0]} is not divisible by the data x fsdp mesh '
                       f'extent {mult}; pad the batch or change config.mesh')
    return jax.device_put(x, batch_sharding(mesh, x.ndim))
  return jax.tree.map(put, batch)


def shard_local_batch(local_batch, mesh: Mesh):
  """Assembles a global batch from each process's rows (multi-host input pipeline)."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, local_batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- activations
def mesh_axis_size(axis: str) -> int:
  """Size of `axis` in the mesh set by `jax.set_mesh` (1 outside a mesh context)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(axis, 1)


def constrain(x, *spec):
  """`with_sharding_constraint(x, P(*spec))` under the mesh set by `jax.set_mesh`.

  A no-op outside a mesh context; mesh axes that are absent, of size 1, or that do not
  divide their dimension are dropped, so model code can state the intended layout once.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  out = []
  for dim, entry in zip(x.shape, spec):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
    if axes and dim % math.prod(sizes[a] for a in axes):
      axes = ()
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.lax.with_sharding_constraint(x, P(*out))


def match_shardings(tree, reference, mesh: Mesh):
  """Shardings for `tree` taken from `reference` (arrays with shardings): a leaf whose path
  ends with a reference leaf's path and has its shape gets that sharding (so optimizer
  moments follow their parameters); anything else is replicated. Pinning these as a jitted
  step's in/out shardings keeps them stable from step to step (no recompiles)."""
  ref = [(path_str(kp), tuple(x.shape), x.sharding)
         for kp, x in jax.tree_util.tree_flatten_with_path(reference)[0]]

  def pick(kp, leaf):
    p = path_str(kp)
    for rp, shape, sharding in ref:
      if tuple(leaf.shape) == shape and (p == rp or p.endswith('/' + rp)):
        return sharding
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(pick, tree)


# ------------------------------------------------------------------------------ multi-host
# The three host gathers of the package: a global array to numpy (`to_host`), every
# process's host rows concatenated (`allgather_rows`) or stacked (`allgather_host`).
def to_host(x) -> np.ndarray:
  """A global array as numpy on every process (gathered when other processes hold parts)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_rows(x: np.ndarray) -> np.ndarray:
  """Every process's host rows concatenated in process order (identity on one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array (all rows on one process)."""
  if jax.process_count() == 1 or getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, x.sharding.mesh, batch_spec(x.ndim)))


def allgather_host(x: np.ndarray) -> np.ndarray:
  """Every process's `x` stacked on a new leading axis [process_count, ...]."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


# ------------------------------------------------------------------------ rollout layout
# Decoding with the training (FSDP) layout makes XLA:TPU gather every weight at every
# generated token (it sinks the gathers into the decode loop to save memory). The sampler
# therefore runs on its own layout over the same devices: tensor parallelism over heads, MLP
# units and vocabulary on a 'tensor' axis of degree t, rows over the other n / t devices
# ('data'), no FSDP. Parameters are resharded onto it once per rollout (docs/design.md §5).
ROLLOUT_OFF = -1


def rollout_tp_degree(num_heads: int, num_kv_heads: int, n_devices: int,
                      requested: int = 0) -> int:
  """The rollout's tensor-parallel degree t. `requested` 0 = automatic: the largest t that
  divides the device count, the query heads and the kv heads (so the KV cache splits by
  heads, not inside one) and leaves each device at least 2 kv heads when the model has 2
  or more: with one kv head per device XLA:TPU lays the decode loop's cache out rows-minor
  and copies the whole cache in and out of the loop (Qwen3-1.7B at B=256, S=5k on v5e-16:
  10.4 GiB of temporaries at t=8, 1.1 GiB at t=4). An explicit t must divide the device count
  and the query heads (kv heads that t does not divide are replicated)."""
  if requested == 0:
    min_kv = 2 if num_kv_heads >= 2 else 1
    return max(t for t in range(1, n_devices + 1)
               if n_devices % t == 0 and num_heads % t == 0 and num_kv_heads % t == 0
               and num_kv_heads // t >= min_kv)
  if requested < 1 or n_devices % requested or num_heads % requested:
    raise ValueError(f'rollout.tensor_parallel={requested} must divide the {n_devices} '
                     f'devices and the {num_heads} attention heads (0: automatic, '
                     f'{ROLLOUT_OFF}: sample on the training layout)')
  return requested


def rollout_rules(num_kv_heads: int, tp: int) -> Rules:
  """Tensor-parallel rules without FSDP; k/v projections replicated when t does not divide
  the kv heads (splitting a head's E dims would make every attention score a collective)."""
  rules = RULE_SETS['tp']
  if num_kv_heads % tp == 0:
    return rules
  kv = (r'layers/self_attn/(k|v)_proj/(weight|bias)', ())
  return (kv,) + tuple(rules)


@dataclasses.dataclass(frozen=True)
class RolloutLayout:
  """Where a model samples: `mesh` (data = rows, tensor = t, over the training mesh's
  devices in the same order) and the parameter `rules` on it."""
  mesh: Mesh
  tp: int
  rules: Rules

  def shardings(self, params):
    """NamedShardings of `params` (arrays or ShapeDtypeStructs) on this layout."""
    return param_shardings(params, self.mesh, self.rules)

  def put_key(self, key):
    """The draw key replicated on this layout's mesh when it carries another mesh (a key made
    under the caller's `jax.set_mesh`); a plain key, such as each process's own on a
    multi-host run, is left as it is."""
    s = getattr(key, 'sharding', None)
    if isinstance(s, NamedSharding) and s.mesh != self.mesh:
      return jax.device_put(key, replicated(self.mesh))
    return key

  def put(self, params):
    """`params` on this layout: unchanged when already there, else resharded (once per
    rollout: a teacher sampling for SFT, a caller that did not cast onto the layout)."""
    target = self.shardings(params)
    if all(getattr(x, 'sharding', None) == t
           for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(target))):
      return params
    return jax.device_put(params, target)


def rollout_layout(mesh: Mesh, num_heads: int, num_kv_heads: int,
                   requested: int = 0) -> RolloutLayout | None:
  """The rollout layout for a model on `mesh`, or None (sample on the training layout) when
  `requested` is ROLLOUT_OFF or automatic on a one-device mesh."""
  n = mesh.devices.size
  if requested == ROLLOUT_OFF or (requested == 0 and n == 1):
    return None
  tp = rollout_tp_degree(num_heads, num_kv_heads, n, requested)
  # Same flat device order as the training mesh: the reshard is a relayout on the same
  # devices, and consecutive devices (ICI neighbours on a TPU slice) share the tensor axis.
  devs = np.asarray(mesh.devices).reshape(n // tp, 1, tp)
  return RolloutLayout(Mesh(devs, MESH_AXES), tp, rollout_rules(num_kv_heads, tp))


def reshard_bytes(tree, src, dst) -> int:
  """Bytes the busiest device receives when `tree` (arrays or ShapeDtypeStructs) moves from
  shardings `src` to `dst`: each device's new shard minus what it already held."""
  per: dict[Any, int] = {}
  for x, s, d in zip(jax.tree.leaves(tree), jax.tree.leaves(src), jax.tree.leaves(dst)):
    shape, item = tuple(x.shape), np.dtype(x.dtype).itemsize
    held = s.devices_indices_map(shape)
    for dev, idx in d.devices_indices_map(shape).items():
      have = held.get(dev)
      new = math.prod(_extent(i, n) for i, n in zip(idx, shape))
      both = 0 if have is None else math.prod(
          max(0, min(_stop(a, n), _stop(b, n)) - max(_start(a), _start(b)))
          for a, b, n in zip(idx, have, shape))
      per[dev] = per.get(dev, 0) + (new - both) * item
  return max(per.values(), default=0)


def _start(s: slice) -> int:
  return s.start or 0


def _stop(s: slice, n: int) -> int:
  return n if s.stop is None else s.stop


def _extent(s: slice, n: int) -> int:
  return _stop(s, n) - _start(s)
