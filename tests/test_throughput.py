"""FLOPs per step, model FLOPs utilisation and the profiler window."""

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mf_jax.training import throughput


@pytest.mark.parametrize("kind, peak", [
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v4", 275e12),
    # v2 and v3: one JAX device per TensorCore, two per chip.
    ("TPU v3", 61.5e12), ("TPU v2", 23e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("cpu", None), ("TPU v4 lite", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_per_device(kind, peak):
  assert throughput.peak_flops_per_device(kind) == peak


def test_model_flops_utilization():
  # 8 v5e chips, each doing half its peak per step, 2 steps/s: 100 %.
  flops = 8 * 197e12 / 2
  assert throughput.model_flops_utilization(
      flops, 2.0, 8, "TPU v5 lite") == pytest.approx(1.0)
  assert throughput.model_flops_utilization(
      flops, 0.5, 8, "TPU v5 lite") == pytest.approx(0.25)
  assert throughput.model_flops_utilization(flops, 2.0, 8, "cpu") is None
  assert throughput.model_flops_utilization(None, 2.0, 8, "TPU v4") is None


def test_compiled_flops_count_every_device():
  """XLA reports one device's share of a partitioned program; the helper
  gives the whole step's FLOPs, the same on 1 device as on 8."""
  matmul = jax.jit(lambda a, b: a @ b)
  a, b = jnp.ones((512, 256)), jnp.ones((256, 128))
  want = 2 * 512 * 256 * 128
  one = throughput.compiled_flops(matmul.lower(a, b).compile())
  mesh = jax.make_mesh((8,), ("data",))
  rows = jax.device_put(a, NamedSharding(mesh, P("data")))
  eight = matmul.lower(rows, b).compile()
  assert one == want
  assert throughput.compiled_flops(eight) == pytest.approx(want, rel=0.01)
  assert eight.cost_analysis()["flops"] == pytest.approx(want / 8, rel=0.01)


def _profile_config(start_step, num_steps):
  return ml_collections.ConfigDict(dict(start_step=start_step,
                                        num_steps=num_steps))


def _run(window, num_steps):
  """A tiny jitted 'training loop' driving the window as the trainer will."""
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x.T) + 1.0)
  x, traced = jnp.ones((64, 64)), []
  for step in range(1, num_steps + 1):
    window.before_step(step, wait_for=x)
    if window.tracing:
      traced.append(step)
    x = step_fn(x)
  window.close(wait_for=x)
  return traced


def test_profile_window_writes_a_trace_of_its_steps(tmp_path):
  window = throughput.ProfileWindow.from_config(_profile_config(3, 2),
                                                str(tmp_path))
  assert _run(window, 8) == [3, 4]
  assert not window.tracing
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"),
                     recursive=True)
  assert traces and all(os.path.getsize(t) > 0 for t in traces)


@pytest.mark.parametrize("start, num, steps, traced", [
    (0, 2, 5, [1, 2]),        # start_step 0: the first steps
    (4, 10, 6, [4, 5, 6]),    # the run ends inside the window: close() stops
    (2, 0, 5, []),            # num_steps 0: off
])
def test_profile_window_steps(tmp_path, monkeypatch, start, num, steps,
                              traced):
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", calls.append)
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
  window = throughput.ProfileWindow(str(tmp_path), start, num)
  assert _run(window, steps) == traced
  assert calls == ([str(tmp_path), "stop"] if traced else [])


def test_profile_window_only_on_the_tracing_process(tmp_path):
  window = throughput.ProfileWindow(str(tmp_path / "profile"), 1, 2,
                                    enabled=False)
  assert _run(window, 4) == []
  assert not os.path.exists(tmp_path / "profile")


def test_resumed_past_the_window_traces_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax.profiler, "start_trace",
                      lambda *_: pytest.fail("traced after the window"))
  window = throughput.ProfileWindow(str(tmp_path), 3, 2)
  for step in range(10, 13):
    window.before_step(step)
  assert not window.tracing
