"""Scaling out: data parallel, FSDP and two processes give the run of one
device; SIGTERM saves where it stops, on every host at the same step; a
broken latest checkpoint is skipped for the one before it."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import sharding
from mf_jax.data import pipeline
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_STEPS = 16
# The toy MLP with 128x128 matrices, which FSDP splits (>= 1024 elements);
# constant lr, so a run's trajectory does not depend on num_steps; eval,
# samples and periodic checkpoints off.
OVERRIDES = {
    "model.hidden_size": 128, "model.depth": 2,
    "training.batch_size": 16, "training.log_every_steps": 1,
    "optimizer.schedule": "constant", "mesh.fsdp_min_size": 1024,
    "checkpoint.every_steps": 1000, "eval.every_steps": 0,
    "eval.batch_size": 16, "sample.every_steps": 0,
}
MESHES = {"one_device": dict(data=1, fsdp=1, num_devices=1),
          "data8": dict(data=8, fsdp=1), "fsdp8": dict(data=1, fsdp=8),
          "data2_fsdp4": dict(data=2, fsdp=4)}
# Sums reduced over devices in another order: float32 rounding, amplified a
# little by Adam over NUM_STEPS.
ATOL = 2e-5


def toy_config(mesh, num_steps=NUM_STEPS):
  c = toy2d.get_config()
  for key, value in OVERRIDES.items():
    group, field = key.split(".")
    c[group][field] = value
  c.training.num_steps = num_steps
  c.mesh.update(MESHES[mesh])
  return c


def cli_args(mesh, num_steps, workdir, **changes):
  """`python -m mf_jax.main` arguments for the same config as toy_config
  (with `changes`, e.g. {'checkpoint.every_steps': 4})."""
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **changes}.items()]
  flags += [f"--config.mesh.{k}={v}" for k, v in MESHES[mesh].items()]
  return [sys.executable, "-m", "mf_jax.main", "--config=configs/toy2d.py",
          f"--workdir={workdir}", f"--config.training.num_steps={num_steps}",
          *flags]


def logged(workdir):
  """The training records of WORKDIR/metrics.jsonl (complete lines only)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = [json.loads(line) for line in lines if line.endswith("}")]
  return [r for r in records if "loss" in r]


def checkpoint_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def final_state(config, workdir, step=None):
  exp = trainer.Experiment(config, workdir)
  state, restored = exp.restore(step=step)
  exp.checkpointer.close()
  return state, restored


def state_bytes_on(tree, device):
  """Bytes of `tree` stored on `device`, and the tree's logical bytes."""
  held = total = 0
  for leaf in jax.tree.leaves(tree):
    total += leaf.nbytes
    held += sum(s.data.nbytes for s in leaf.addressable_shards
                if s.device == device)
  return held, total


def assert_trees_close(a, b, atol=ATOL):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=atol)


def subprocess_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "SLURM_"))}
  return dict(env, JAX_PLATFORMS="cpu", **extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Each mesh trains the same NUM_STEPS: its losses and final state."""
  out = {}
  for mesh in MESHES:
    workdir = str(tmp_path_factory.mktemp(mesh))
    config = toy_config(mesh)
    trainer.train_and_evaluate(config, workdir)
    state, step = final_state(config, workdir)
    assert step == NUM_STEPS
    losses = [r["loss"] for r in logged(workdir)]
    out[mesh] = dict(state=state, losses=losses)
  out["init"] = trainer.Experiment(toy_config("one_device"), "").new_state()
  return out


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "data2_fsdp4"])
def test_sharded_runs_match_one_device(runs, mesh):
  ref, got = runs["one_device"], runs[mesh]
  assert len(ref["losses"]) == NUM_STEPS
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4)
  assert_trees_close(got["state"].params, ref["state"].params)
  assert_trees_close(got["state"].opt_state, ref["state"].opt_state)
  assert_trees_close(got["state"].ema_params, ref["state"].ema_params)
  # Training moved the parameters by far more than the tolerance.
  moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(runs["init"].params),
                              jax.tree.leaves(ref["state"].params)))
  assert moved > 100 * ATOL


def test_fsdp_splits_params_optimizer_state_and_ema(runs):
  """Device 0 holds about 1/8 of the state under fsdp=8, 1/4 under
  data=2 x fsdp=4, and all of it under pure data parallelism."""
  device = jax.devices()[0]
  share = {}
  for mesh in ("data8", "fsdp8", "data2_fsdp4"):
    held, total = state_bytes_on(runs[mesh]["state"], device)
    share[mesh] = held / total
  assert share["data8"] == 1.0
  assert 1 / 8 < share["fsdp8"] < 1 / 8 + 0.05, share
  assert 1 / 4 < share["data2_fsdp4"] < 1 / 4 + 0.05, share
  state = runs["fsdp8"]["state"]
  for tree in (state.params, state.opt_state, state.ema_params):
    held, total = state_bytes_on(tree, device)
    assert held < 0.2 * total


def test_hosts_read_their_rows_of_one_global_stream():
  """Two hosts' shares of each digits batch are the one host's batch, so
  the process count does not change the data a run trains on."""
  c = config_lib.base_config()
  c.data.name, c.training.batch_size = "digits", 8
  whole = pipeline.make_train_iterator(c, np.arange(8))
  halves = [pipeline.make_train_iterator(c, rows)
            for rows in (np.arange(4), np.arange(4, 8))]
  for _ in range(3):
    want = next(whole)
    got = [next(it) for it in halves]
    for key in ("x", "y"):
      np.testing.assert_array_equal(
          np.concatenate([g[key] for g in got]), want[key])
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  np.testing.assert_array_equal(sharding.process_batch_rows(mesh, 16),
                                np.arange(16))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two_hosts(workdir, num_steps, logs, **changes):
  """Two processes x 4 CPU devices on 127.0.0.1, one FSDP mesh of 8. They
  share a compilation cache, so the relaunch skips most compiling."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = subprocess_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_COMPILATION_CACHE_DIR=os.path.join(logs, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i))
    log = open(os.path.join(logs, f"host{i}_{num_steps}.log"), "w")
    procs.append(subprocess.Popen(
        cli_args("fsdp8", num_steps, workdir, **changes), cwd=REPO, env=env,
        stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait_all(procs, timeout=240):
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return codes


def test_two_hosts_sigterm_one_then_resume_on_one_host(runs, tmp_path):
  """2 processes x 4 devices: SIGTERM to host 1 alone makes both hosts
  save the same step and exit cleanly; resumed by 1 process x 8 devices
  (the data position is rebuilt from the step), the run ends on the state
  and the losses of the uninterrupted run."""
  workdir, logs = str(tmp_path / "run"), str(tmp_path)
  procs = _launch_two_hosts(workdir, 10_000, logs)
  deadline = time.time() + 180
  while not logged(workdir) and time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  assert _wait_all(procs) == [0, 0], open(
      os.path.join(logs, "host1_10000.log")).read()[-3000:]
  (stopped,) = checkpoint_steps(workdir)
  assert 1 <= stopped < NUM_STEPS, stopped
  assert logged(workdir)[-1]["step"] == stopped
  for i in range(2):
    assert f"Stop signal: saved step {stopped}," in open(
        os.path.join(logs, f"host{i}_10000.log")).read()
  done = subprocess.run(
      cli_args("fsdp8", NUM_STEPS, workdir), cwd=REPO, capture_output=True,
      text=True, timeout=240, env=subprocess_env(
          XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resumed from step {stopped}" in done.stderr
  state, step = final_state(toy_config("fsdp8"), workdir)
  assert step == NUM_STEPS
  assert_trees_close(state, runs["fsdp8"]["state"])
  losses = {r["step"]: r["loss"] for r in logged(workdir)}
  want = dict(enumerate(runs["fsdp8"]["losses"], start=1))
  np.testing.assert_allclose([losses[s] for s in sorted(want)],
                             [want[s] for s in sorted(want)], rtol=1e-4)


def test_host_killed_and_its_view_damaged_both_resume_one_step(tmp_path):
  """Host 1 is killed mid-run (host 0 then too: it waits in a collective
  forever), and the latest checkpoint is damaged only where host 1 reads
  (its own shards). Relaunched, host 0 could read that checkpoint but
  host 1 cannot: both move on together to the one before it, and the run
  matches an uninterrupted one."""
  workdir, logs = str(tmp_path / "run"), str(tmp_path)
  every = {"checkpoint.every_steps": 4}
  procs = _launch_two_hosts(workdir, 10_000, logs, **every)
  deadline = time.time() + 180
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and len(
        checkpoint_steps(workdir)) >= 2:
      break
    time.sleep(0.05)
  procs[1].kill()
  time.sleep(0.5)
  procs[0].kill()
  _wait_all(procs)
  *_, previous, latest = checkpoint_steps(workdir)
  own = os.path.join(workdir, "checkpoints", str(latest), "state",
                     "ocdbt.process_1", "d")
  for name in os.listdir(own):
    open(os.path.join(own, name), "w").close()
  num_steps = latest + 4
  procs = _launch_two_hosts(workdir, num_steps, logs, **every)
  assert _wait_all(procs) == [0, 0], open(
      os.path.join(logs, f"host1_{num_steps}.log")).read()[-3000:]
  for i in range(2):
    log = open(os.path.join(logs, f"host{i}_{num_steps}.log")).read()
    assert f"Checkpoint at step {latest} is unreadable" in log
    assert f"Resumed from step {previous}." in log
  assert f"unreadable_{latest}" in os.listdir(
      os.path.join(workdir, "checkpoints"))
  reference = str(tmp_path / "reference")
  trainer.train_and_evaluate(toy_config("fsdp8", num_steps), reference)
  state, step = final_state(toy_config("fsdp8", num_steps), workdir)
  assert step == num_steps
  assert_trees_close(state, final_state(toy_config("fsdp8", num_steps),
                                        reference)[0])


def test_sigterm_saves_the_step_it_stopped_at(tmp_path):
  """One process, `python -m mf_jax.main`: SIGTERM mid-run exits with 0
  and leaves a checkpoint at the last trained (and logged) step, off the
  periodic schedule."""
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(cli_args("one_device", 100_000, workdir), cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while len(logged(workdir)) < 3 and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  (stopped,) = checkpoint_steps(workdir)
  assert stopped == logged(workdir)[-1]["step"] >= 3
  assert stopped % OVERRIDES["checkpoint.every_steps"] != 0
  assert stopped < 100_000


def test_corrupted_latest_checkpoint_is_skipped(tmp_path, caplog):
  config = toy_config("one_device", num_steps=8)
  config.checkpoint.every_steps = 4
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [4, 8]
  state_dir = os.path.join(workdir, "checkpoints", "8", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "w") as f:
        f.truncate(0)
  with caplog.at_level(logging.WARNING):
    state, step = final_state(config, workdir)
  assert step == 4 and int(state.step) == 4
  assert "Checkpoint at step 8 is unreadable" in caplog.text
