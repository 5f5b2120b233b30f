"""Command line: train, evaluate or sample a config.

  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m mf_jax.main --config=configs/toy2d.py:objective=flow_matching \
      --workdir=/tmp/fm --config.training.num_steps=2000
  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits \
      --mode=eval

Several processes (one per host) run the same command; see
`mf_jax/distributed.py` for how they find each other (on CPU, collectives
between processes use gloo).
"""

import json
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mf_jax import checkpointing
from mf_jax import distributed
from mf_jax import samplers
from mf_jax.training import step as step_lib
from mf_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, "
                               "samples and eval results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                          "train (resumes if possible), eval or sample.")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step to evaluate, sample or resume training "
    "from (default: the latest; in training, later checkpoints are moved "
    "aside to checkpoints/superseded_<step>).")
_START_FRESH = flags.DEFINE_bool(
    "start_fresh", False, "Train from scratch when the checkpoints cannot be "
    "resumed (saved with other shapes, or none readable), after archiving "
    "them to checkpoints.archived-<k>; readable, fitting ones still resume.")
_NFE = flags.DEFINE_string("nfe", None, "Sample mode's schedule: N steps, "
                           "or explicit times such as '1,0.6,0'.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_nfe(text: str | None) -> int | str | None:
  """--nfe as sample mode takes it: an int N >= 1 (uniform N steps), times
  such as '1,0.6,0' descending from 1 to 0, or None (the config's). Any
  other value is a one-line error naming the flag, never a silent fallback
  to the config (0 used to read as 'unset')."""
  if text is None:
    return None
  try:
    nfe = int(text)
  except ValueError:
    nfe = text.strip()
  try:
    samplers.parse_schedule(nfe)
  except ValueError as e:
    raise ValueError(f"--nfe={text!r} is not a sampling schedule: expected "
                     "a step count >= 1 or times descending from 1 to 0 "
                     "such as '1,0.6,0'.") from e
  return nfe


def main(argv):
  del argv
  nfe = parse_nfe(_NFE.value)  # before anything starts or compiles
  if nfe is not None and _MODE.value != "sample":
    raise ValueError(f"--nfe is for --mode=sample; --mode={_MODE.value} "
                     "reads eval.nfe (eval) or sample.nfe (grids).")
  distributed.initialize()
  logging.info("Process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == "train":
    results = trainer.train_and_evaluate(config, workdir, _STEP.value,
                                         _START_FRESH.value)
  elif _MODE.value == "eval":
    results = trainer.evaluate_checkpoint(config, workdir, _STEP.value)
  else:
    results = {"png": trainer.sample_checkpoint(config, workdir, _STEP.value,
                                                nfe)}
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


def run(argv):
  """`main`, with the errors a run can meet after start-up (checkpoints
  that do not fit or fail to save, non-finite training) reported as the
  last line on stderr: the process exits at once, so nothing that shuts
  down after it (orbax's threads, the distributed client) buries it."""
  try:
    main(argv)
  except (checkpointing.CheckpointError, step_lib.NonFiniteError) as e:
    logging.exception("Stopped:")
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads still shutting down (orbax's event loops) may print after
    # this point: silence fd 2 first, then write the verdict to a copy.
    verdict_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.write(verdict_fd, f"mf_jax: {type(e).__name__}: {e}\n".encode())
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(run)
