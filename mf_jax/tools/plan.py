r"""Plans a run before it starts: size and cost of the compiled train step.

  python -m mf_jax.tools.plan --config=configs/imagenet256_b4.py
  python -m mf_jax.tools.plan --config=configs/imagenet256_xl.py \
      --topology=v5e:4x4 --config.mesh.data=1 --config.mesh.fsdp=-1

Prints one JSON object: `params`, `train_step_flops` (per device, per step)
and per-device argument / output / temporary bytes, from abstract shapes: no
data is read and nothing is trained.

With `--topology` the step is compiled ahead of time for a TPU slice this
host does not have (the `libtpu` wheel compiles for any named topology on a
CPU host), over a mesh built from the config's `mesh` fields on that
slice's devices, so the report says whether the run fits the chips' HBM
before anyone pays for them.
"""

import collections
import json
import os

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from mf_jax.tools import compiled_stats
from mf_jax.training import trainer

GIB = 2**30
# HBM per chip by TPU generation (the topology name's prefix).
TPU_HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB,
                 "v6e": 32 * GIB}
# Cloud TPU v4 VMs run the chip's two TensorCores as one JAX device
# ("megacore"); libtpu's default topology would show each core separately.
_CHIP_CONFIG = {"v4": "megacore"}


def tpu_devices(topology: str, platform: str = "tpu"):
  """Compile-only devices of a named slice, e.g. 'v5e:4x4' or 'v4:2x2x2'.

  Needs the `libtpu` wheel (jax[tpu] pins the matching version); nothing is
  attached, so these devices compile and cannot run.
  """
  # Once libtpu is installed every JAX process on the host loads it and takes
  # its lock file; compiling for a topology runs nothing, so it may share.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if generation(topology) in _CHIP_CONFIG:
    kwargs["chip_config_name"] = _CHIP_CONFIG[generation(topology)]
  return topologies.get_topology_desc(topology, platform, **kwargs).devices


def generation(topology: str) -> str:
  return topology.partition(":")[0]


def device_hbm_bytes(topology: str, devices) -> int | None:
  """One device's share of its chip's HBM (None for unknown generations)."""
  chip_bytes = TPU_HBM_BYTES.get(generation(topology))
  if chip_bytes is None:
    return None
  per_chip = collections.Counter(tuple(d.coords) for d in devices)
  return chip_bytes // max(per_chip.values())


def plan(config, batch_size=None, devices=None, hbm_bytes=None) -> dict:
  """The compiled train step's parameters, FLOPs and per-device memory.

  `total_bytes` counts what the step holds at its peak: arguments (train
  state shard and batch shard), outputs not aliased to donated arguments,
  and temporaries (activations, gradients, collectives' buffers). It is
  the checked steps' program (log, save, sample and eval steps), which
  adds the parameter check and the gradient and parameter norms to the
  other steps' (and ~2 % of temporaries at DiT-S/4 batch 8): a run holds
  both, and must fit the larger.
  """
  exp = trainer.Experiment(config, workdir="", devices=devices)
  report = {
      "params": compiled_stats.param_count(exp.abstract_state.params),
      "batch_size": batch_size or config.training.batch_size,
      "devices": exp.mesh.size,
      "device_kind": exp.mesh.devices.flat[0].device_kind,
      "mesh": dict(exp.mesh.shape),
  }
  try:
    compiled = exp.lower_train_step(batch_size, checked=True).compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program that cannot fit in HBM: that is an
    # answer ("does not fit"), not a failure of the tool.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(report, fits=False, hbm_bytes=hbm_bytes,
                compile_error=str(e).strip().splitlines()[0][:500])
  memory = compiled_stats.memory(compiled)
  total = (memory["argument_bytes"] + memory["output_bytes"]
           - memory["alias_bytes"] + memory["temp_bytes"])
  report.update({
      "train_step_flops": compiled_stats.flops(compiled),
      "train_step_temp_bytes": memory["temp_bytes"],
      "train_step_argument_bytes": memory["argument_bytes"],
      "train_step_output_bytes": memory["output_bytes"],
      "train_step_alias_bytes": memory["alias_bytes"],
      "train_step_total_bytes": total,
  })
  if hbm_bytes:
    report.update(hbm_bytes=hbm_bytes, fits=total <= hbm_bytes,
                  hbm_fraction=round(total / hbm_bytes, 3))
  return report


def plan_topology(config, topology: str, batch_size=None,
                  platform: str = "tpu") -> dict:
  """`plan` compiled for a named TPU slice (see `tpu_devices`)."""
  devices = tpu_devices(topology, platform)
  report = plan(config, batch_size, devices,
                device_hbm_bytes(topology, devices))
  report["topology"] = topology
  return report


def main(argv):
  del argv
  if _TOPOLOGY.value:
    report = plan_topology(_CONFIG.value, _TOPOLOGY.value, _BATCH.value,
                           _PLATFORM.value)
  else:
    report = plan(_CONFIG.value, _BATCH.value)
  print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                            lock_config=True)
  _BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: config).")
  _TOPOLOGY = flags.DEFINE_string(
      "topology", None, "Compile for this TPU slice instead of this host's "
      "devices, e.g. v5e:4x4, v4:2x2x2, v5p:2x2x2 (needs libtpu).")
  _PLATFORM = flags.DEFINE_enum("platform", "tpu", ["tpu"],
                                "Platform of --topology.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
