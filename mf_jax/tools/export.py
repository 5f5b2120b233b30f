r"""Exports a run's evaluation parameters (EMA) to safetensors + JSON.

  python -m mf_jax.tools.export --workdir=/tmp/mf_digits \
      --output=/tmp/mf_digits.safetensors [--step=N] [--ema_decay=D] \
      [--config=configs/digits.py]

Restores a checkpoint (latest by default) the way evaluation does and writes
the parameters evaluation would use (`config.eval.ema_decay`; `--ema_decay`
picks another EMA, 0 the online parameters) in `mf_jax.export`'s format:
`--output` and the JSON beside it. The run's config is read from
WORKDIR/config.json, which training writes; `--config` replaces it (runs
from before that file existed, or a different mesh for this host).
Prints the JSON record. One process: the parameters are gathered to it.
"""

import json
import os

import jax
import ml_collections
from absl import app
from absl import flags
from etils import epath
from ml_collections import config_flags

from mf_jax import export
from mf_jax import objectives
from mf_jax.training import state as state_lib
from mf_jax.training import trainer


def _tuples(value):
  """JSON has no tuples; configs use them (e.g. eval.nfe, ema_decays)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in WORKDIR/config.json."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a training run's workdir (or the "
        "run predates config.json); pass --config=configs/NAME.py.")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _check_has_checkpoint(workdir: str):
  """Fails before orbax would create an empty checkpoints/ directory."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir() or not any(directory.iterdir()):
    raise FileNotFoundError(f"No checkpoint in {directory}; train first.")


def _pick_params(exp, state, ema_decay):
  """The parameters to export and the EMA decay they carry (0: online).

  None takes what evaluation scores (`exp.eval_params`); otherwise the
  decay means what `config.eval.ema_decay` means.
  """
  if ema_decay is None:
    params = exp.eval_params(state)
  elif ema_decay == 0:
    params = state.params
  elif ema_decay < 0:
    params = next(iter(state.ema_params.values()))
  else:
    key = state_lib.ema_key(ema_decay)
    if key not in state.ema_params:
      raise ValueError(f"No EMA with decay {ema_decay} in this run; it keeps "
                       f"{sorted(state.ema_params)} (0 = online parameters).")
    params = state.ema_params[key]
  if params is state.params:
    return params, 0.0
  return params, next(float(k) for k, v in state.ema_params.items()
                      if v is params)


def export_run(workdir: str, output: str, step: int | None = None,
               config=None, ema_decay: float | None = None) -> dict:
  """Writes `output` and its JSON from a run's checkpoint; returns the JSON."""
  if os.path.isdir(output):  # before the restore, not after it
    raise IsADirectoryError(f"--output={output} is a directory; an export "
                            "is written to a file, NAME.safetensors.")
  config = config if config is not None else run_config(workdir)
  _check_has_checkpoint(workdir)
  exp = trainer.Experiment(config, workdir)
  try:
    if step is not None and step not in exp.checkpointer.steps():
      raise ValueError(f"No checkpoint at step {step} in {workdir}; saved "
                       f"steps: {exp.checkpointer.steps()}.")
    state, step = exp.restore(step=step)
    if state is None:
      raise FileNotFoundError(f"No readable checkpoint in {workdir}.")
    params, decay = _pick_params(exp, state, ema_decay)
    return export.save(
        output, jax.device_get(params), config.model,
        source=f"mf_jax:{os.path.abspath(workdir)}", step=int(step),
        ema_decay=decay, objective=config.objective.name,
        sampler=objectives.get(config.objective.name).SAMPLER)
  finally:
    exp.checkpointer.close()


def main(argv):
  del argv
  record = export_run(_WORKDIR.value, _OUTPUT.value, _STEP.value,
                      _CONFIG.value, _EMA_DECAY.value)
  print(json.dumps({k: record[k] for k in export.METADATA_KEYS},
                   sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
  _OUTPUT = flags.DEFINE_string("output", None, "FILE.safetensors to write "
                                "(FILE.json is written beside it).")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: "
                               "latest).")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file (default: WORKDIR/config.json).")
  _EMA_DECAY = flags.DEFINE_float(
      "ema_decay", None, "EMA decay to export (default: config.eval."
      "ema_decay; 0 = online parameters).")
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main)
