"""Randomized faults: a toy run is stopped by SIGKILL, SIGTERM or SIGINT at
random moments and relaunched, and now and then a random checkpoint is
truncated in between. After every launch the run has either resumed
exactly or stopped with a one-line message, and it never trained from a
wrong state: every checkpoint it ever wrote is bit for bit the
uninterrupted run's checkpoint of that step, and so is its end.

`MF_FAULT_SEED=N` runs another sequence of faults (the test's name shows
the seed); a loop over seeds makes a soak test.
"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mf_jax import checkpointing
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_STEPS = 80
OVERRIDES = {"model.hidden_size": 128, "model.depth": 2,
             "training.batch_size": 128, "training.log_every_steps": 1,
             "training.num_steps": NUM_STEPS,
             "checkpoint.every_steps": 10, "checkpoint.max_to_keep": 3,
             "eval.every_steps": 0, "sample.every_steps": 0}
SEEDS = [int(os.environ["MF_FAULT_SEED"])] if "MF_FAULT_SEED" in os.environ \
    else [1]
LAUNCHES = 5


def launch(workdir, *extra, **overrides):
  args = [sys.executable, "-m", "mf_jax.main", "--config=configs/toy2d.py",
          f"--workdir={workdir}", *extra,
          *[f"--config.{k}={v}" for k, v in {**OVERRIDES,
                                              **overrides}.items()]]
  return subprocess.Popen(args, cwd=REPO, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def config():
  c = toy2d.get_config()
  for key, value in OVERRIDES.items():
    group, field = key.split(".")
    c[group][field] = value
  return c


def saved_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if (
      os.path.isdir(root)) else []


def read(workdir, step):
  """The state of checkpoint `step`, or None if it does not verify."""
  exp = trainer.Experiment(config(), workdir)
  try:
    state, _ = exp.restore(step=step)
    return jax.device_get(state)
  except checkpointing.CheckpointError:
    return None
  finally:
    exp.checkpointer.close()


class Straight:
  """The uninterrupted run, saved at every step (a stop signal saves off
  the periodic schedule), read on demand."""

  def __init__(self, workdir):
    self.workdir, self._states = workdir, {}

  def __getitem__(self, step):
    if step not in self._states:
      self._states[step] = read(self.workdir, step)
    return self._states[step]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = launch(workdir, **{"checkpoint.every_steps": 1,
                            "checkpoint.max_to_keep": NUM_STEPS})
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert saved_steps(workdir) == list(range(1, NUM_STEPS + 1))
  return Straight(workdir)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def interrupt(proc, rng, workdir):
  """Waits until training runs, then a random while, then sends a random
  signal (or lets the run end). Returns the signal sent, or None."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  size = lambda: os.path.getsize(metrics) if os.path.exists(metrics) else 0
  logged_before = size()
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if size() > logged_before:  # this launch is training
      break
    time.sleep(0.05)
  time.sleep(rng.uniform(0.0, 2.5))
  if proc.poll() is not None or rng.random() < 0.15:
    return None
  signum = rng.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
  proc.send_signal(signum)
  return signum


def truncate_one(workdir, rng):
  steps = saved_steps(workdir)
  if not steps:
    return None
  step = rng.choice(steps)
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  for root, _, names in os.walk(state_dir):
    for name in names:
      open(os.path.join(root, name), "w").close()
  return step


@pytest.mark.parametrize("seed", SEEDS)
def test_random_kills_and_damage_never_train_from_a_wrong_state(
    straight, tmp_path, seed):
  rng = random.Random(seed)
  workdir = str(tmp_path / "run")
  damaged, history = set(), []
  fresh = False
  for _ in range(LAUNCHES):
    if rng.random() < 0.3:
      damaged.add(truncate_one(workdir, rng))
    proc = launch(workdir, *(["--start_fresh"] if fresh else []))
    signum = interrupt(proc, rng, workdir)
    _, err = proc.communicate(timeout=300)
    history.append((signum and signal.Signals(signum).name, proc.returncode))
    fresh = False
    if signum is not None and proc.returncode == -signum:
      pass  # killed (SIGTERM before the trainer's handlers exist)
    elif signum == signal.SIGINT and err.rstrip().endswith(
        "KeyboardInterrupt"):
      pass  # Ctrl-C during start-up, before anything was trained
    elif proc.returncode != 0:
      # Stopped by itself: one line that says why and what to do.
      line = err.strip().splitlines()[-1]
      assert line.startswith("mf_jax: CheckpointError: No readable "
                             "checkpoint"), (history, err[-3000:])
      assert "--start_fresh" in line
      fresh = True
    for step in saved_steps(workdir):
      state = read(workdir, step)
      if state is None:  # a checkpoint this test truncated
        assert step in damaged, (step, history)
      else:
        assert_same(state, straight[step])
  proc = launch(workdir, *(["--start_fresh"] if fresh else []))
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, (history, err[-3000:])
  assert_same(read(workdir, NUM_STEPS), straight[NUM_STEPS])
