"""Checks that run before anything compiles or computes.

A value out of range (a batch of 0, a negative interval, an EMA decay of 1)
or an output folder that cannot be written otherwise surfaces minutes or
hours later, deep in a reshape or after a whole evaluation. Here each is one
line naming the field (or folder) and what would be valid.

Only ranges are checked here; names and schedules are checked where they
are defined (`objectives.validate`, `samplers.parse_schedule`), and batch
divisibility by the mesh where the mesh is known
(`sharding.check_batch_size`).
"""

import numbers
import os

import jax
from etils import epath

from mf_jax import samplers
from mf_jax.evaluation import inception
from mf_jax.objectives import guidance
from mf_jax.training import state as state_lib

ON_NONFINITE = ("stop", "skip")
DONATE_STATE = ("auto", "always", "never")


def _number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _at_least(low):
  return lambda value: _number(value) and value >= low


def _decay(value) -> bool:
  return _number(value) and 0 <= value < 1


# (field, what is valid, test). Fields a config lacks (e.g. a run's saved
# config.json from before the field existed) are not checked.
_RANGES = (
    ("training.batch_size", ">= 1", _at_least(1)),
    ("training.num_steps", ">= 1", _at_least(1)),
    ("training.log_every_steps", ">= 0 (0: off)", _at_least(0)),
    ("training.on_nonfinite", f"one of {ON_NONFINITE}",
     lambda value: value in ON_NONFINITE),
    ("training.donate_state", f"one of {DONATE_STATE}",
     lambda value: value in DONATE_STATE),
    ("training.ema_decays", "a tuple of decays in [0, 1)",
     lambda value: isinstance(value, (tuple, list))
     and all(_decay(d) for d in value)),
    ("objective.guidance_passes", f"one of {guidance.PASSES}",
     lambda value: value in guidance.PASSES),
    ("eval.every_steps", ">= 0 (0: off)", _at_least(0)),
    ("eval.batch_size", ">= 1", _at_least(1)),
    ("eval.labels", f"one of {samplers.LABEL_MODES}",
     lambda value: value in samplers.LABEL_MODES),
    ("eval.fid_protocol", f"one of {tuple(inception.PROTOCOLS)}",
     lambda value: value in inception.PROTOCOLS),
    ("sample.every_steps", ">= 0 (0: off)", _at_least(0)),
    ("sample.grid_size", ">= 1", _at_least(1)),
    ("checkpoint.max_to_keep", ">= 1", _at_least(1)),
    ("checkpoint.every_steps", ">= 0 (0: off)", _at_least(0)),
    ("checkpoint.every_secs", ">= 0 (0: off)", _at_least(0)),
    ("checkpoint.first_step", ">= 0 (0: off)", _at_least(0)),
    ("profile.start_step", ">= 0", _at_least(0)),
    ("profile.num_steps", ">= 0 (0: off)", _at_least(0)),
)


def _get(config, field: str):
  """(present, value) of a dotted field."""
  section, name = field.split(".")
  if section not in config or name not in config[section]:
    return False, None
  return True, config[section][name]


def _problems(config) -> list[str]:
  problems = []
  for field, valid, test in _RANGES:
    present, value = _get(config, field)
    if present and not test(value):
      problems.append(f"{field}={value!r} (must be {valid})")
  _, every = _get(config, "eval.every_steps")
  _, inception = _get(config, "eval.inception")
  present, num_samples = _get(config, "eval.num_samples")
  scored = (_number(every) and every > 0) or bool(inception)
  if present and scored and not _at_least(1)(num_samples):
    problems.append(f"eval.num_samples={num_samples!r} (must be >= 1 when "
                    "eval.every_steps > 0 or FID is configured)")
  problems.extend(_ema_problems(config))
  return problems


def _ema_problems(config) -> list[str]:
  """eval.ema_decay must name an EMA the run keeps, compared by the keys
  the train state stores them under (`state.ema_key`)."""
  has_decays, decays = _get(config, "training.ema_decays")
  present, decay = _get(config, "eval.ema_decay")
  if not (present and has_decays and _number(decay)
          and isinstance(decays, (tuple, list))):
    return []
  kept = [state_lib.ema_key(d) for d in decays if _number(d)]
  if decay < 0 and not kept:
    return [f"eval.ema_decay={decay!r} (the first EMA) but "
            "training.ema_decays is empty (use 0 for the online parameters)"]
  if decay > 0 and state_lib.ema_key(decay) not in kept:
    return [f"eval.ema_decay={decay!r} (must be one of training.ema_decays="
            f"{tuple(decays)!r}, 0 for the online parameters or < 0 for "
            "the first EMA)"]
  return []


def validate_config(config):
  """Raises one ValueError line listing every field out of range."""
  problems = _problems(config)
  if problems:
    raise ValueError("Invalid config: " + "; ".join(problems) + ".")


def check_writable(directory: str, what: str):
  """Fails at once, in one line, when `directory` cannot be written.

  Creates it and writes and removes a probe file through etils.epath (so
  gs:// works as local paths do); directories it had to create are removed
  again, so a mistyped workdir is not left behind. Process 0 only: it alone
  writes the files this guards (eval JSON, sample grids).
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(directory)
  created = []  # the missing directories, deepest first
  parent = path
  while not parent.exists() and parent.parent != parent:
    created.append(parent)
    parent = parent.parent
  probe = path / f".write_probe_{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("probe")
    probe.unlink()
  except Exception as e:  # OSError locally; cloud clients raise their own
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise PermissionError(
        f"Cannot write {what} to {directory} ({type(e).__name__}: "
        f"{reason}); use a --workdir this process can write.") from e
  finally:
    for folder in created:
      try:
        folder.rmdir()
      except Exception:  # pylint: disable=broad-except
        break  # not empty (someone else writes there) or never created
