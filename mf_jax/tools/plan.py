r"""Plans a run before it starts: size and cost of the compiled train step.

  python -m mf_jax.tools.plan --config=configs/imagenet256_b4.py

Prints one JSON object: `params`, `train_step_flops` (global, per step) and
per-device `train_step_temp_bytes` / argument / output bytes, from abstract
shapes on this host's devices: no data is read and nothing is trained.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from mf_jax.tools import compiled_stats
from mf_jax.training import trainer


def plan(config, batch_size=None) -> dict:
  exp = trainer.Experiment(config, workdir="")
  compiled = exp.lower_train_step(batch_size).compile()
  memory = compiled_stats.memory(compiled)
  return {
      "params": compiled_stats.param_count(exp.abstract_state.params),
      "batch_size": batch_size or config.training.batch_size,
      "devices": exp.mesh.size,
      "train_step_flops": compiled_stats.flops(compiled),
      "train_step_temp_bytes": memory["temp_bytes"],
      "train_step_argument_bytes": memory["argument_bytes"],
      "train_step_output_bytes": memory["output_bytes"],
  }


def main(argv):
  del argv
  print(json.dumps(plan(_CONFIG.value, _BATCH.value), sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                            lock_config=True)
  _BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: config).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
