r"""Benchmarks the train step of flow matching and MeanFlow on one backbone.

  python -m mf_jax.tools.bench --config=configs/imagenet256_b4.py --batch=32
  python -m mf_jax.tools.bench --config=configs/imagenet256_b4.py \
      --config.model.variant=S/4 --batch=8 --against=official-structure

Prints one JSON object with entries `flow_matching`, `meanflow` (no
guidance), `meanflow_cfg0` (omega = 2, kappa = 0: one extra forward pass)
and `meanflow_cfg` (kappa > 0: two guidance velocities, in the passes
`objective.guidance_passes` says),
each with `flops` and `temp_bytes` of the compiled step and the median
`step_seconds` over timed steps after a warm-up, all in this process, and
the FLOP ratios to flow matching.

The project's step is the program a run executes between log steps; the
program of the steps whose state is logged or read adds the check of the
updated parameters and the gradient and parameter norms (5-8 % more time,
training/step.py).

`--against=official-structure` compares each variant's step with the
official code's step structure (tools/reference_step.py: official DiT
layout and attention, separate guidance passes, no donation) built from the
same config: both compiled in this process and timed in `--rounds`
interleaved rounds of `--steps_per_round` steps each, the order alternating
from round to round, so drifts of the machine's load hit both alike. Per
variant: median step seconds of each, the median and interquartile range of
the per-round ratio project / reference, FLOPs and memory of both. The JSON
object is followed by the same as a markdown table.
"""

import json
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mf_jax.tools import compiled_stats
from mf_jax.tools import reference_step
from mf_jax.training import trainer

AGAINST = ("official-structure",)
MIB = 2**20


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


def _memory(compiled) -> dict[str, int]:
  """compiled_stats.memory plus the peak XLA reports (or, where it does
  not, arguments + outputs + temporaries - aliased)."""
  stats = compiled_stats.memory(compiled)
  peak = getattr(compiled.memory_analysis(), "peak_memory_in_bytes", 0)
  stats["peak_bytes"] = int(peak) or (
      stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"]
      - stats["alias_bytes"])
  return stats


class _Runner:
  """A compiled step with its state, batch and rng, timed step by step."""

  def __init__(self, name, step, compiled, state, batch, rng):
    self.name, self.step, self.compiled = name, step, compiled
    self.state, self.batch, self.rng = state, batch, rng
    self.times = []

  def run(self, steps: int, record: bool = True) -> float:
    """Runs `steps` steps; returns their mean seconds."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.rng)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    if record:
      self.times += times
    return float(np.mean(times))


def _project_runner(config, batch_size) -> _Runner:
  exp = trainer.Experiment(config, workdir="")
  step, compiled = exp.compile_train_step(batch_size)
  return _Runner("project", step, compiled, exp.new_state(),
                 _random_batch(exp, batch_size), jax.random.key(0))


def _reference_runner(config, batch_size, project: _Runner) -> _Runner:
  """The reference step on the project's first device and batch values."""
  ref = reference_step.ReferenceStep(config)
  device = jax.devices()[0]
  batch = {k: jax.device_put(project.batch[k], device) for k in ("x", "y")}
  compiled = ref.compile(batch_size)
  on_device = jax.sharding.SingleDeviceSharding(device)
  state = jax.jit(ref.new_state, out_shardings=on_device)(
      jax.random.key(config.training.seed))
  return _Runner("reference", compiled, compiled, state, batch,
                 jax.random.key(0))


def compare_one(config, batch_size: int, rounds: int,
                steps_per_round: int) -> dict:
  """Project and reference step of one variant, interleaved (see module)."""
  reference_step.check_config(config)
  project = _project_runner(config, batch_size)
  reference = _reference_runner(config, batch_size, project)
  pair = (project, reference)
  for runner in pair:  # warm-up: first calls allocate and page in
    runner.run(2, record=False)
  ratios = []
  for i in range(rounds):
    order = pair if i % 2 == 0 else pair[::-1]
    seconds = {r.name: r.run(steps_per_round) for r in order}
    ratios.append(seconds["project"] / seconds["reference"])
  entry = {"rounds": rounds, "steps_per_round": steps_per_round,
           "ratio_median": float(np.median(ratios)),
           "ratio_q25": float(np.percentile(ratios, 25)),
           "ratio_q75": float(np.percentile(ratios, 75))}
  for runner in pair:
    entry[f"{runner.name}_seconds"] = float(np.median(runner.times))
    entry[f"{runner.name}_flops"] = compiled_stats.flops(runner.compiled)
    entry[f"{runner.name}_memory"] = _memory(runner.compiled)
  entry["flops_ratio"] = entry["project_flops"] / entry["reference_flops"]
  entry["peak_ratio"] = (entry["project_memory"]["peak_bytes"]
                         / entry["reference_memory"]["peak_bytes"])
  return entry


def compare(config, batch_size=None, rounds=16, steps_per_round=2,
            names=None) -> dict:
  """`compare_one` for each variant (or those in `names`), one process."""
  if rounds < 1 or steps_per_round < 1:
    raise ValueError(f"--rounds ({rounds}) and --steps_per_round "
                     f"({steps_per_round}) must be >= 1.")
  batch_size = batch_size or config.training.batch_size
  settings = variants(config)
  unknown = sorted(set(names or ()) - set(settings))
  if unknown:
    raise ValueError(f"Unknown variants {unknown}; valid: {sorted(settings)}.")
  for c in settings.values():  # every config checked before compiling
    reference_step.check_config(c)
  results = {name: compare_one(c, batch_size, rounds, steps_per_round)
             for name, c in settings.items() if not names or name in names}
  results["batch_size"] = batch_size
  results["device"] = str(jax.devices()[0].device_kind)
  return results


def markdown_table(results: dict) -> str:
  """The comparison as the README shows it."""
  lines = [
      "| variant | project s | reference s | ratio (median, IQR) | "
      "FLOPs ratio | peak MiB (project / ref) | temp MiB (project / ref) |",
      "|---|---|---|---|---|---|---|"]
  for name, e in results.items():
    if not isinstance(e, dict):
      continue
    mib = lambda key, e=e: " / ".join(
        f"{e[f'{side}_memory'][key] / MIB:.1f}"
        for side in ("project", "reference"))
    lines.append(
        f"| {name} | {e['project_seconds']:.3f} | "
        f"{e['reference_seconds']:.3f} | {e['ratio_median']:.3f} "
        f"({e['ratio_q25']:.3f}-{e['ratio_q75']:.3f}) | "
        f"{e['flops_ratio']:.3f} | {mib('peak_bytes')} | "
        f"{mib('temp_bytes')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _AGAINST.value:
    results = compare(_CONFIG.value, _BATCH.value, _ROUNDS.value,
                      _STEPS_PER_ROUND.value, _VARIANTS.value)
    print(json.dumps(results, sort_keys=True))
    print()
    print(f"batch {results['batch_size']}, {results['device']}")
    print(markdown_table(results))
    return
  print(json.dumps(bench(_CONFIG.value, _BATCH.value, _STEPS.value),
                   sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                            lock_config=True)
  _BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: config).")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
  _AGAINST = flags.DEFINE_enum(
      "against", None, AGAINST, "Compare each variant's step with a "
      "reference step structure (see the module docstring).")
  _ROUNDS = flags.DEFINE_integer("rounds", 16, "--against: interleaved "
                                 "timing rounds per variant.")
  _STEPS_PER_ROUND = flags.DEFINE_integer(
      "steps_per_round", 2, "--against: steps of each step per round.")
  _VARIANTS = flags.DEFINE_list(
      "variants", None, "--against: only these variants (default: all; "
      "flow_matching, meanflow, meanflow_cfg0, meanflow_cfg).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
