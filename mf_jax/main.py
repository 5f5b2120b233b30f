"""Command line: train, evaluate or sample a config.

  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m mf_jax.main --config=configs/toy2d.py:objective=flow_matching \
      --workdir=/tmp/fm --config.training.num_steps=2000
  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits \
      --mode=eval

Several processes (one per host) run the same command; see
`sharding.initialize_distributed` for how they find each other (on CPU,
collectives between processes use gloo).
"""

import json

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mf_jax import sharding
from mf_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, "
                               "samples and eval results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                          "train (resumes if possible), eval or sample.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for eval/sample "
                             "(default: latest).")
_NFE = flags.DEFINE_string("nfe", None, "Sample mode's schedule: N steps, "
                           "or explicit times such as '1,0.6,0'.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.initialize_distributed()
  logging.info("Process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == "train":
    results = trainer.train_and_evaluate(config, workdir)
  elif _MODE.value == "eval":
    results = trainer.evaluate_checkpoint(config, workdir, _STEP.value)
  else:
    nfe = _NFE.value
    nfe = int(nfe) if nfe and nfe.isdigit() else nfe
    results = {"png": trainer.sample_checkpoint(config, workdir, _STEP.value,
                                                nfe)}
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
