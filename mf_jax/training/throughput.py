"""How fast training runs: FLOPs per step, model FLOPs utilisation, and a
profiler window over a few steps.

The FLOPs come from XLA's cost analysis of the compiled train step, so they
count what the program computes (the MeanFlow JVP, CFG's extra forward
passes, any rematerialisation), not a formula that could drift from the
code. Utilisation divides the achieved FLOP/s by the chips' peak dense bf16
FLOP/s: the figure TPU users compare across runs and slices.
"""

import os
import time

import jax

# Peak dense bf16 FLOP/s per chip, and JAX devices per chip (TPU v2 and v3
# show each of a chip's two TensorCores as a device; v4 and v5p join theirs
# into one "megacore" device). Sources, read 2026:
#   TPU v2: 46 TFLOPS per chip, Jouppi et al., "A Domain Specific
#     Supercomputer for Training Deep Neural Networks", CACM 2020 (the paper
#     cloud.google.com/tpu/docs/v2 refers to).
#   TPU v3: 123, cloud.google.com/tpu/docs/v3;  TPU v4: 275, .../docs/v4;
#   TPU v5e: 197, .../docs/v5e;  TPU v5p: 459, .../docs/v5p;
#   TPU v6e (Trillium): 918, .../docs/v6e.
#   NVIDIA A100 (SXM and PCIe): 312, A100 datasheet; H100 SXM and H200:
#     989 (1,979 "with sparsity"), H100 PCIe: 756 (1,513 with sparsity),
#     H100 / H200 datasheets. Dense, i.e. half the sparsity figures.
_TPU_PEAKS = {  # jax device_kind, lower case: (FLOP/s per chip, devices)
    "tpu v2": (46e12, 2),
    "tpu v3": (123e12, 2),
    "tpu v4": (275e12, 1),
    "tpu v5 lite": (197e12, 1),
    "tpu v5e": (197e12, 1),
    "tpu v5": (459e12, 1),
    "tpu v5p": (459e12, 1),
    "tpu v6 lite": (918e12, 1),
    "tpu v6e": (918e12, 1),
}
# GPU device kinds carry memory and form factor ("NVIDIA H100 80GB HBM3"):
# the first name found in the kind wins.
_GPU_PEAKS = (("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12),
              ("a100", 312e12))


def peak_flops_per_device(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one JAX device of this kind; None when not
  known (CPU, other accelerators)."""
  kind = device_kind.strip().lower()
  if kind in _TPU_PEAKS:
    per_chip, devices_per_chip = _TPU_PEAKS[kind]
    return per_chip / devices_per_chip
  if kind.startswith("nvidia"):
    for name, peak in _GPU_PEAKS:
      if name in kind:
        return peak
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function, summed over all the devices
  it runs on; None when XLA does not say.

  `cost_analysis()` returns a dict (a list of one dict per module in older
  JAX). For a program partitioned over several devices it describes one
  device's share (checked in the tests: a matmul sharded over 8 devices
  reports 1/8 of the unsharded count), so it is multiplied by the number of
  devices. Work that every device repeats (replicated small layers) is then
  counted on each: for pure data parallelism that is exact.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    flops = sum(a.get("flops", 0.0) for a in analysis if a)
  elif analysis:
    flops = analysis.get("flops", 0.0)
  else:
    flops = 0.0
  return float(flops) * _num_devices(compiled) if flops > 0 else None


def _num_devices(compiled) -> int:
  shardings = jax.tree.leaves((compiled.input_shardings,
                               compiled.output_shardings))
  return max((len(s.device_set) for s in shardings), default=1)


def model_flops_utilization(flops_per_step: float | None,
                            steps_per_sec: float, num_devices: int,
                            device_kind: str) -> float | None:
  """Achieved over peak FLOP/s, in [0, 1]; None on devices of unknown peak.

  Args:
    flops_per_step: FLOPs of one train step over all devices
      (`compiled_flops` of the compiled step).
    steps_per_sec: measured training steps per second.
    num_devices: devices the step runs on (`mesh.size`).
    device_kind: `jax.devices()[0].device_kind`.
  """
  peak = peak_flops_per_device(device_kind)
  if peak is None or not flops_per_step or num_devices < 1:
    return None
  return flops_per_step * steps_per_sec / (num_devices * peak)


class ProfileWindow:
  """A jax.profiler trace of a few training steps, for TensorBoard's
  profile plugin (or Perfetto).

  Tracing starts before the first step numbered `start_step` or later and
  covers `num_steps` steps: steps [start_step, start_step + num_steps) of a
  fresh run (steps count from 1, so start_step=0 traces the first
  num_steps). A run resumed past the window traces nothing. Only one
  process traces (process 0 by default: every host runs the same program);
  num_steps=0 turns it off.

  In the training loop:

    window = ProfileWindow.from_config(config.profile, workdir)
    for step in ...:
      window.before_step(step, wait_for=state)  # previous step's outputs
      state, metrics = train_step(...)
    window.close(wait_for=state)

  `wait_for` lets the last traced step finish on the devices before the
  trace stops (dispatch is asynchronous).
  """

  def __init__(self, logdir: str, start_step: int, num_steps: int,
               enabled: bool | None = None):
    if enabled is None:
      enabled = jax.process_index() == 0
    self.logdir = logdir
    self._start, self._num = max(start_step, 1), num_steps
    self._armed = enabled and num_steps > 0
    self._stop_before = None  # the first step after the window, once open

  @classmethod
  def from_config(cls, profile_config, workdir: str) -> "ProfileWindow":
    """From the config's `profile` fields; the trace goes to WORKDIR/profile."""
    return cls(os.path.join(workdir, "profile"), profile_config.start_step,
               profile_config.num_steps)

  @property
  def tracing(self) -> bool:
    return self._stop_before is not None

  def before_step(self, step: int, wait_for=None):
    """Call once per step, before running step number `step`."""
    if self.tracing and step >= self._stop_before:
      self.close(wait_for)
    elif (self._armed and not self.tracing
          and self._start <= step < self._start + self._num):
      jax.profiler.start_trace(self.logdir)
      self._stop_before = step + self._num

  def close(self, wait_for=None):
    """Ends the trace if one is open (the run stopped inside the window)."""
    if self.tracing:
      jax.block_until_ready(wait_for)
      jax.profiler.stop_trace()
      self._stop_before, self._armed = None, False


class StepRate:
  """Steps per second and model FLOPs utilisation between log steps."""

  def __init__(self, mesh, flops_per_step: float | None, step: int):
    self.flops_per_step = flops_per_step
    self.num_devices = mesh.size
    self.device_kind = mesh.devices.flat[0].device_kind
    self._step, self._time = step, time.monotonic()

  def measure(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    out = {"steps_per_sec": steps_per_sec}
    mfu = model_flops_utilization(
        self.flops_per_step, steps_per_sec, self.num_devices,
        self.device_kind)
    if mfu is not None:
      out["mfu"] = mfu
    return out
