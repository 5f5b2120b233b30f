"""Orbax checkpoints of the train state, each with a record that vouches for it.

A checkpoint `checkpoints/<step>/` holds two items:
  state  the TrainState (orbax StandardSave: sharded, every host writes its
         own shards);
  meta   JSON: the step, a fingerprint of the state's bits, the tree of leaf
         shapes, the run's config and batch size.
The fingerprint is why a restore can tell a good checkpoint from a damaged
one (a flipped bit, a truncated shard) instead of training on whatever the
files hold; the leaf shapes are why it can tell "this config does not fit
that checkpoint" from "the checkpoint is broken", which need opposite
responses (stop and say so, versus walk back to an older one).

The data position is not stored: it is rebuilt from the step (the pipeline
indexes one global stream by step), so a run resumes exactly on any number
of hosts. Saves are asynchronous and atomic (orbax writes a temporary folder
and renames it); a failed save is raised at the next call into the
Checkpointer, naming its cause, and leaves no temporary folder behind.
Choosing which checkpoint to resume from is `training/resume.py`.
"""

import hashlib
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE, META = "state", "meta"
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or used; the message is one line."""


class Checkpointer:
  """A CheckpointManager over `directory` with the items 'state' and 'meta'."""

  def __init__(self, directory: str, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = self._new_manager()
    self._pending_step = None  # the latest save started

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, item_names=(STATE, META),
                                 options=self._options)

  def save(self, step: int, state, meta: dict):
    """Starts saving `state` at `step`; raises if an earlier save failed or
    orbax declines this one (it skips steps at or below its latest).

    Waits for the previous save first (orbax would too): so an error is
    reported with the step it belongs to.
    """
    self.wait()
    self._pending_step = step
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 META: ocp.args.JsonSave(meta)})
    try:
      saved = self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failure(step, e) from e
    if not saved:
      raise CheckpointError(
          f"Checkpoint of step {step} was not written: orbax keeps a step "
          f"{self.manager.latest_step()} in {self.directory} already.")

  def check_for_errors(self):
    """Raises the error of a finished asynchronous save, if one failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failure(self._pending_step, e) from e

  def wait(self):
    """Blocks until pending saves are on disk; raises if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failure(self._pending_step, e) from e

  def _save_failure(self, step, error) -> CheckpointError:
    # Other writes of the failed save may still be running: closing the
    # manager joins them (they end with their own errors) before their
    # folder is removed; a fresh manager serves whatever comes next.
    for finish in (self.manager.wait_until_finished, self.manager.close):
      try:
        finish()
      except Exception:  # pylint: disable=broad-except
        pass
    self.remove_temporary()
    self.manager = self._new_manager()
    which = f"step {step}" if step is not None else "a checkpoint"
    return CheckpointError(f"Saving {which} in {self.directory} failed: "
                           f"{root_cause(error)}")

  def remove_temporary(self):
    """Deletes the temporary folders of unfinished saves (process 0)."""
    if jax.process_index() != 0 or not self.directory.exists():
      return
    # Some orbax versions finish writing small files (e.g. `_sharding`)
    # from threads that nothing joins: look again until none reappear.
    for attempt in range(10):
      leftovers = [p for p in self.directory.iterdir() if _TMP_MARK in p.name]
      if not leftovers:
        return
      for path in leftovers:
        if attempt == 0:
          logging.warning("Removing the unfinished save %s.", path)
        _remove_tree(path)
      time.sleep(0.2)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # Reads go to orbax's item handlers, not through the manager: the
  # manager's restore ends in a cross-host barrier made of device
  # collectives, which a host whose read failed never reaches, and the
  # hosts' next collectives would then pair up wrongly. Here a failed read
  # is an exception on its host alone; resume.py gathers the outcomes.

  def read_meta(self, step: int) -> dict | None:
    """The step's meta record; None for checkpoints written before it."""
    path = self.directory / str(step) / META
    if not path.exists():
      return None
    return ocp.JsonCheckpointHandler().restore(path,
                                              args=ocp.args.JsonRestore())

  def read_state(self, step: int, abstract_state):
    """The state at `step`, into `abstract_state`'s shapes and shardings."""
    handler = ocp.StandardCheckpointHandler()
    try:
      return handler.restore(self.directory / str(step) / STATE,
                             args=ocp.args.StandardRestore(abstract_state))
    finally:
      handler.close()

  def move_aside(self, step: int, prefix: str) -> str:
    """Renames `<step>/` to `<prefix>_<step>/` (process 0; all hosts wait),
    so orbax no longer lists it and a later save at that step happens.
    Nothing is deleted. Returns the new path."""
    target = self.directory / f"{prefix}_{step}"
    if jax.process_index() == 0:
      k = 1
      while target.exists():
        k += 1
        target = self.directory / f"{prefix}_{step}.{k}"
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"move_aside_{prefix}_{step}")
      target = self.directory / f"{prefix}_{step}"
    self.reopen()
    return str(target)

  def reopen(self):
    """A fresh manager, after the folder changed under the old one."""
    self.manager.close()
    self.manager = self._new_manager()

  def close(self):
    self.manager.close()


def root_cause(error: BaseException) -> str:
  """The innermost cause of a chain of exceptions, as 'Type: message'."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split())
  # TensorStore appends "[os_error_code='28']", "[source locations=...]"
  # and such: the words before them say it.
  text = re.sub(r"\s*\[[a-z_ ]+=.*$", "", text)
  return f"{type(error).__name__}: {text}"


def _remove_tree(path: epath.Path):
  if "://" in str(path):
    path.rmtree(missing_ok=True)
  else:
    shutil.rmtree(os.fspath(path), ignore_errors=True)


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array goes."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def leaf_signatures(tree) -> dict[str, str]:
  """'path/to/leaf' -> 'float32[128,2]' for every array of a state (or of
  its abstract shapes): what a checkpoint must match to be restorable."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): f"{jnp.dtype(x.dtype).name}"
                            f"[{','.join(map(str, x.shape))}]"
          for path, x in leaves}


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the leaf's 32-bit words, modulo 2**32.

  Integer arithmetic, so the result does not depend on how the array is
  sharded or in which order XLA reduces it; odd weights make every
  single-bit change (and any swap of two words) change the sum.
  """
  if x.dtype.itemsize != 4:
    x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating)
                 else jnp.int32)
  words = jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
  return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksums_and_finite(tree):
  leaves = jax.tree.leaves(tree)
  sums = jnp.stack([_leaf_checksum(x) for x in leaves])
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.inexact)]
                             or [jnp.bool_(True)]))
  return sums, finite


def fingerprint(state) -> tuple[str, bool]:
  """(hex digest of the state's bits, whether every float is finite),
  computed on the devices; every host gets the same answer."""
  sums, finite = jax.device_get(_checksums_and_finite(state))
  digest = hashlib.sha256(np.asarray(sums, "<u4").tobytes()).hexdigest()
  return digest[:32], bool(finite)
