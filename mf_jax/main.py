"""Command line: train, evaluate or sample a config.

  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m mf_jax.main --config=configs/toy2d.py:objective=flow_matching \
      --workdir=/tmp/fm --config.training.num_steps=2000
  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits \
      --mode=eval

Several processes (one per host): TPU pods and SLURM are detected by
`jax.distributed.initialize`; elsewhere set JAX_COORDINATOR_ADDRESS
(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each
process's environment (on CPU, collectives between processes use gloo).
"""

import json
import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mf_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, "
                               "samples and eval results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                          "train (resumes if possible), eval or sample.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for eval/sample "
                             "(default: latest).")
_NFE = flags.DEFINE_integer("nfe", None, "Steps for sample mode.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _multi_host_requested():
    jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                               process_id=_env_int("JAX_PROCESS_ID"))
  logging.info("Process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == "train":
    results = trainer.train_and_evaluate(config, workdir)
  elif _MODE.value == "eval":
    results = trainer.evaluate_checkpoint(config, workdir, _STEP.value)
  else:
    results = {"png": trainer.sample_checkpoint(config, workdir, _STEP.value,
                                                _NFE.value)}
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


def _multi_host_requested() -> bool:
  """Cluster environments (TPU pods, SLURM) announce several processes."""
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or bool(
      os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _env_int(name: str) -> int | None:
  """An integer from the environment; None lets JAX detect the cluster."""
  value = os.environ.get(name)
  return None if value is None else int(value)


if __name__ == "__main__":
  app.run(main)
