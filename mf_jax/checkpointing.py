"""Orbax checkpoints holding the train state and the data position together.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), the last `max_to_keep` are kept, and restore
walks back from the latest step past any checkpoint that fails to load.
"""

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """A CheckpointManager with two items: 'state' and 'data' (grain)."""

  def __init__(self, directory: str, max_to_keep: int = 3,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(
        directory, item_names=("state", "data"), options=options)

  def save(self, step: int, state, data_iterator=None, force=False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores `step` (default: the latest that loads) into the shapes and
    shardings of `abstract_state`, and the data iterator in place.

    Returns (state, step), or (None, None) when there is nothing to restore.
    """
    candidates = [step] if step is not None else self.steps()[::-1]
    for candidate in candidates:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(
            candidate, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning("Checkpoint at step %d is unreadable (%s: %s); "
                        "trying the one before it.", candidate,
                        type(e).__name__, e)
        continue
      return restored["state"], candidate
    return None, None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array goes."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
