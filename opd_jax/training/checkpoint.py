"""Orbax checkpoints: atomic, asynchronous, keep-N, exact resume, preemption save.

A checkpoint at step N holds the train state after N updates (parameters, optimizer state,
step counter) and a JSON `meta` item with everything else a resumed run needs to continue
identically: the data sampler's position. Randomness is derived from (seed, step), so no
RNG state needs saving. Orbax writes to a temporary directory and renames it when complete,
so a crash mid-save never leaves a half-written "latest" checkpoint. All processes call
these methods (orbax coordinates multi-host writes); they return on every process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """`workdir/checkpoints/<step>/{state, meta}` via an orbax CheckpointManager."""

  def __init__(self, workdir: str, *, every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.every = int(every)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      log.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state):
    """(state, meta) of `step`; arrays are restored with `abstract_state`'s shardings."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice reached any of them (multi-host)."""
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # no distributed preemption service (single process)
      return False

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionFlag:
  """Turns SIGTERM (TPU preemption, `kill`, a scheduler's stop) into a flag the loop checks
  after each step, so the run saves a checkpoint and exits cleanly instead of dying."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning('SIGTERM received: saving a checkpoint after this step, then exiting')
    self.event.set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def is_set(self) -> bool:
    return self.event.is_set()
