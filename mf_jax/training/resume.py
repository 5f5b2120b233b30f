"""Which checkpoint a run continues from, decided once for every host.

A checkpoint that cannot be used is one of two very different things:
- a mismatch: the config builds a state of other shapes (a changed width,
  depth or EMA list). Walking back would find the same mismatch in every
  checkpoint and end in training from scratch over the old run, so the run
  stops with one line naming the leaves and the config fields that differ;
- damage: some host cannot read it, or its bits differ from the fingerprint
  taken when it was written, or it holds non-finite values. The one before
  it is tried; once a readable one is found, the damaged ones are moved
  aside (`checkpoints/unreadable_<step>`: nothing is deleted, and a later
  save at that step happens).
Every host takes each decision together (their results are gathered before
anyone moves on), so hosts never resume different steps. When nothing is
readable, nothing is moved (the cause may be systematic: a library change,
permissions) and the run stops and says so: starting over is the user's
choice (`start_fresh`, which archives the old checkpoints first).
"""

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mf_jax import checkpointing
from mf_jax.checkpointing import CheckpointError

UNREADABLE, SUPERSEDED = "unreadable", "superseded"
_FRESH_HINT = ("pass --start_fresh to archive these checkpoints and train "
               "from scratch")


class Mismatch(CheckpointError):
  """The config's state does not have the checkpoint's shapes."""


def restore(checkpointer, abstract_state, config, *, step=None,
            repair=True, start_fresh=False):
  """Returns (state, step) of the checkpoint to continue from, or
  (None, 0) when there is none and training starts from scratch.

  `step` picks one checkpoint (in training, later ones are then moved
  aside: they belong to the abandoned continuation). `repair=False`
  (evaluation, sampling) walks back past damaged checkpoints without
  moving them. `start_fresh` archives checkpoints that cannot be resumed
  (a mismatch, or none readable) and returns (None, 0).
  """
  steps = _agreed_steps(checkpointer)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"No checkpoint at step {step} in "
                            f"{checkpointer.directory}; saved steps: {steps}.")
    candidates = [step]
  else:
    candidates = steps[::-1]
  damaged = []
  for candidate in candidates:
    try:
      state, meta = _read_verified(checkpointer, candidate, abstract_state,
                                   config)
    except Mismatch as e:
      if start_fresh and step is None:
        return _archive(checkpointer, str(e))
      raise Mismatch(f"{e}; resume with the run's own config, or "
                     f"{_FRESH_HINT}.") from None
    except _Damaged as e:
      if step is not None:
        raise CheckpointError(
            f"Checkpoint {candidate} in {checkpointer.directory} is "
            f"unreadable: {e}") from None
      logging.warning("Checkpoint at step %d is unreadable (%s); trying the "
                      "one before it.", candidate, e)
      damaged.append((candidate, str(e)))
      continue
    # Only now, with a good checkpoint in hand, are the damaged ones moved:
    # if none is readable the cause may be systematic (a library change,
    # permissions), and nothing should be renamed.
    for bad, _ in damaged if repair else ():
      logging.warning("Moved the unreadable checkpoint %d to %s.", bad,
                      checkpointer.move_aside(bad, UNREADABLE))
    if step is not None and repair:
      _supersede_later(checkpointer, step, steps)
    changed = config_changes((meta or {}).get("config", {}), config)
    if meta and changed:
      logging.warning("Resuming step %d with changed config fields (the run "
                      "is not the one that was saved): %s", candidate,
                      "; ".join(changed))
    return state, candidate
  if damaged:
    message = (f"No readable checkpoint in {checkpointer.directory} ("
               + "; ".join(f"step {s}: {why}" for s, why in damaged) + ")")
    if start_fresh:
      return _archive(checkpointer, message)
    raise CheckpointError(f"{message}; nothing to resume (nothing was moved "
                          f"or deleted): {_FRESH_HINT}.")
  return None, 0


class _Damaged(Exception):
  """Some host could not use the checkpoint; the message says why."""


def _read_verified(checkpointer, step, abstract_state, config):
  """Reads `step` on every host and checks it against its meta record."""
  meta = _on_all_hosts(checkpointer.read_meta, step)
  if meta is not None:
    _check_fits(meta, abstract_state, config, step)
  state = _on_all_hosts(checkpointer.read_state, step, abstract_state)
  digest, finite = checkpointing.fingerprint(state)
  if meta is not None and digest != meta["fingerprint"]:
    raise _Damaged("its contents differ from the fingerprint taken when it "
                   "was saved")
  if not finite:
    raise _Damaged("it holds non-finite values")
  return state, meta


def _on_all_hosts(read, *args):
  """`read(*args)` on every host; raises _Damaged on every host if it
  failed on any (so that no host goes on alone into a collective)."""
  error = None
  try:
    result = read(*args)
  except Exception as e:  # pylint: disable=broad-except
    error, result = e, None
  failed = _any_host(error is not None)
  if failed:
    cause = checkpointing.root_cause(error) if error else (
        "another host could not read it")
    raise _Damaged(cause)
  return result


def _any_host(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _agreed_steps(checkpointer) -> list[int]:
  """Process 0's list of saved steps, on every host."""
  steps = checkpointer.steps()
  if jax.process_count() == 1:
    return steps
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  if count == 0:
    return []
  padded = np.zeros(count, np.int64)
  padded[:min(count, len(steps))] = steps[:count]
  return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def _check_fits(meta, abstract_state, config, step):
  saved = meta.get("tree", {})
  wanted = checkpointing.leaf_signatures(abstract_state)
  differ = sorted(set(saved) ^ set(wanted) | {
      k for k in set(saved) & set(wanted) if saved[k] != wanted[k]},
                  key=lambda k: (not k.startswith("params/"), k))
  if not differ:
    return
  shown = "; ".join(f"{k}: {saved.get(k, 'absent')} saved, "
                    f"{wanted.get(k, 'absent')} now" for k in differ[:3])
  more = f" (+{len(differ) - 3} more)" if len(differ) > 3 else ""
  changed = config_changes(meta.get("config", {}), config)
  fields = ", ".join(changed) if changed else "none found"
  raise Mismatch(f"Checkpoint {step} does not fit this config: {len(differ)} "
                 f"state leaves differ ({shown}{more}); changed config "
                 f"fields: {fields}")


def config_changes(saved: dict, config) -> list[str]:
  """'group.field: old -> new' for every config field that differs from
  the run's saved config (a dict, as in WORKDIR/config.json)."""
  old = _flatten(saved)
  new = _flatten(config.to_dict() if hasattr(config, "to_dict") else config)
  return [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}"
          for k in sorted(set(old) | set(new))
          if _normal(old.get(k)) != _normal(new.get(k))]


def _flatten(tree, prefix="") -> dict:
  flat = {}
  for key, value in (tree or {}).items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _normal(value):
  """Tuples and lists compare equal (JSON has only lists)."""
  return list(value) if isinstance(value, (tuple, list)) else value


def _supersede_later(checkpointer, step, steps):
  for later in (s for s in steps if s > step):
    where = checkpointer.move_aside(later, SUPERSEDED)
    logging.warning("Resuming from step %d as asked: moved the later "
                    "checkpoint %d to %s.", step, later, where)


def _archive(checkpointer, reason: str):
  """Moves the whole checkpoint folder aside and starts from scratch."""
  directory = checkpointer.directory
  target = _archive_path(directory)
  if jax.process_index() == 0:
    directory.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("archive_checkpoints")
  logging.warning("--start_fresh: %s; archived the checkpoints to %s and "
                  "training from scratch.", reason, target)
  checkpointer.reopen()
  return None, 0


def _archive_path(directory: epath.Path) -> epath.Path:
  k = 1
  while (directory.parent / f"{directory.name}.archived-{k}").exists():
    k += 1
  return directory.parent / f"{directory.name}.archived-{k}"

