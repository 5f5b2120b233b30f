r"""Benchmarks the train step of flow matching and MeanFlow on one backbone.

  python -m mf_jax.tools.bench --config=configs/imagenet256_b4.py --batch=32

Prints one JSON object with entries `flow_matching`, `meanflow` (no
guidance), `meanflow_cfg0` (omega = 2, kappa = 0: one extra forward pass)
and `meanflow_cfg` (kappa > 0: two guidance velocities in one batched pass),
each with `flops` and `temp_bytes` of the compiled step and the median
`step_seconds` over timed steps after a warm-up, all in this process, and
the FLOP ratios to flow matching.
"""

import json
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mf_jax.tools import compiled_stats
from mf_jax.training import trainer


def variants(config) -> dict:
  """The four objective settings, all on the config's backbone and batch."""
  kappa = config.objective.guidance_kappa or 0.5
  settings = {
      "flow_matching": dict(name="flow_matching"),
      "meanflow": dict(name="meanflow", guidance_omega=1.0,
                       guidance_kappa=0.0),
      "meanflow_cfg0": dict(name="meanflow", guidance_omega=2.0,
                            guidance_kappa=0.0),
      "meanflow_cfg": dict(name="meanflow", guidance_omega=1.0,
                           guidance_kappa=kappa),
  }
  out = {}
  for name, fields in settings.items():
    c = config.copy_and_resolve_references()
    c.objective.update(**fields)
    out[name] = c
  return out


def _random_batch(exp, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  local = {
      "x": rng.standard_normal((batch_size, *exp.input_shape), np.float32),
      "y": rng.integers(0, max(exp.config.model.num_classes, 1),
                        (batch_size,), np.int32)}
  shardings = exp.abstract_batch(batch_size)
  for key, spec in shardings.items():  # e.g. augmentation labels: zeros
    local.setdefault(key, np.zeros(spec.shape, spec.dtype))
  return {k: jax.device_put(v, shardings[k].sharding)
          for k, v in local.items()}


def bench_one(config, batch_size, steps: int) -> dict:
  exp = trainer.Experiment(config, workdir="")
  step, compiled = exp.compile_train_step(batch_size)
  state = exp.new_state()
  batch = _random_batch(exp, batch_size)
  rng = jax.random.key(0)
  for _ in range(2):  # warm-up
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"flops": compiled_stats.flops(compiled),
          "temp_bytes": compiled_stats.memory(compiled)["temp_bytes"],
          "step_seconds": float(np.median(times))}


def bench(config, batch_size=None, steps=10) -> dict:
  batch_size = batch_size or config.training.batch_size
  results = {name: bench_one(c, batch_size, steps)
             for name, c in variants(config).items()}
  base = results["flow_matching"]["flops"]
  for entry in results.values():
    entry["flops_ratio_to_flow_matching"] = entry["flops"] / base
  results["batch_size"] = batch_size
  results["device"] = str(jax.devices()[0].device_kind)
  return results


def main(argv):
  del argv
  print(json.dumps(bench(_CONFIG.value, _BATCH.value, _STEPS.value),
                   sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                            lock_config=True)
  _BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: config).")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
