"""Nothing lost, nothing silently wrong: each fault is made the way a user
would meet it (a changed width, truncated or bit-flipped checkpoints, lr =
1e30, a save that fails, a failing evaluation, signals) and the outcome is
checked: the message, the exit status, what is on disk, and that a resumed
run equals an uninterrupted one."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from mf_jax import checkpointing
from mf_jax.training import resume
from mf_jax.training import signals as signals_lib
from mf_jax.training import step as step_lib
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position

# The toy MLP, tiny; checkpoints every 4 steps, no evaluation or grids.
OVERRIDES = {"model.hidden_size": 32, "model.depth": 1,
             "training.batch_size": 64, "training.log_every_steps": 4,
             "checkpoint.every_steps": 4, "checkpoint.max_to_keep": 10,
             "eval.every_steps": 0, "sample.every_steps": 0}


def config(num_steps=12, **changes):
  c = toy2d.get_config()
  for key, value in {**OVERRIDES, **changes}.items():
    group, field = key.split(".")
    c[group][field] = value
  c.training.num_steps = num_steps
  return c


def cli(workdir, num_steps, *extra, wait=True):
  args = [sys.executable, "-m", "mf_jax.main", "--config=configs/toy2d.py",
          f"--workdir={workdir}", f"--config.training.num_steps={num_steps}",
          *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if not wait:
    return subprocess.Popen(args, cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  return subprocess.run(args, cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=300)


def last_line(text):
  return text.strip().splitlines()[-1]


def entries(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def restored(c, workdir, step=None):
  exp = trainer.Experiment(c, workdir)
  state, at = exp.restore(step=step)
  exp.checkpointer.close()
  return jax.device_get(state), at


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 12-step run, every 4th step kept."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  trainer.train_and_evaluate(config(), workdir)
  return workdir


def copy_run(straight_dir, tmp_path, keep_steps):
  """The straight run as if it had been stopped after `max(keep_steps)`."""
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_dir, workdir)
  for name in entries(workdir):
    if name.isdigit() and int(name) not in keep_steps:
      shutil.rmtree(os.path.join(workdir, "checkpoints", name))
  return workdir


def damage(workdir, step, how):
  """Truncates every file of a checkpoint's state, or flips one bit in the
  middle of each of its data files (orbax keeps several; any of them may
  hold the values)."""
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(root, name) for root, _, names in os.walk(state_dir)
           for name in names]
  if how == "truncate":
    for path in files:
      open(path, "w").close()
    return
  for path in files:
    if os.path.basename(os.path.dirname(path)) != "d":
      continue
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0x10]))


def test_changed_width_stops_with_one_line_and_changes_nothing(straight,
                                                                tmp_path):
  workdir = copy_run(straight, tmp_path, {4, 8})
  before = entries(workdir)
  config_json = open(os.path.join(workdir, "config.json")).read()
  done = cli(workdir, 12, "--config.model.hidden_size=64")
  assert done.returncode == 1, done.stderr[-2000:]
  line = last_line(done.stderr)
  assert line.startswith("mf_jax: Mismatch: Checkpoint 8 does not fit"), line
  assert "params/" in line and "float32[64" in line
  assert "model.hidden_size: 32 -> 64" in line and "--start_fresh" in line
  assert entries(workdir) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_json
  # Asked to, it archives the old run and starts one of the new width.
  c = config(**{"model.hidden_size": 64})
  trainer.train_and_evaluate(c, workdir, start_fresh=True)
  archived = os.path.join(workdir, "checkpoints.archived-1")
  assert sorted(os.listdir(archived)) == before
  state, step = restored(c, workdir)
  assert step == 12 and state.params["input_proj"]["kernel"].shape[-1] == 64


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_latest_is_moved_aside_and_the_run_is_exact(straight,
                                                            tmp_path, how,
                                                            caplog):
  workdir = copy_run(straight, tmp_path, {4, 8})
  damage(workdir, 8, how)
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config(), workdir)
  assert "Checkpoint at step 8 is unreadable" in caplog.text
  assert entries(workdir) == ["12", "4", "8", "unreadable_8"]
  # Step 8 was saved again (orbax skips steps it already lists), and the
  # run from step 4 is the uninterrupted one.
  for step in (8, 12):
    assert_same(restored(config(), workdir, step)[0],
                restored(config(), straight, step)[0])


def test_no_readable_checkpoint_stops_until_told_to_start_fresh(straight,
                                                                tmp_path):
  workdir = copy_run(straight, tmp_path, {4, 8})
  for step in (4, 8):
    damage(workdir, step, "truncate")
  with pytest.raises(checkpointing.CheckpointError,
                     match="No readable checkpoint.*step 8: .*step 4: .*"
                     "nothing was moved.*--start_fresh"):
    trainer.train_and_evaluate(config(), workdir)
  assert entries(workdir) == ["4", "8"]
  trainer.train_and_evaluate(config(), workdir, start_fresh=True)
  assert sorted(os.listdir(os.path.join(
      workdir, "checkpoints.archived-1"))) == ["4", "8"]
  assert_same(restored(config(), workdir)[0], restored(config(), straight)[0])


def test_step_flag_resumes_there_and_moves_later_ones_aside(straight,
                                                            tmp_path):
  workdir = copy_run(straight, tmp_path, {4, 8, 12})
  trainer.train_and_evaluate(config(), workdir, step=4)
  assert entries(workdir) == ["12", "4", "8", "superseded_12",
                              "superseded_8"]
  assert_same(restored(config(), workdir)[0], restored(config(), straight)[0])
  with pytest.raises(checkpointing.CheckpointError, match="saved steps"):
    trainer.train_and_evaluate(config(), workdir, step=5)


def test_nothing_to_train_says_so(straight, tmp_path, caplog):
  workdir = copy_run(straight, tmp_path, {4, 8, 12})
  with caplog.at_level(logging.WARNING):
    assert trainer.train_and_evaluate(config(num_steps=12), workdir) == {}
  assert "nothing to train" in caplog.text
  assert entries(workdir) == ["12", "4", "8"]


def test_lr_1e30_stops_at_the_first_nonfinite_step_and_saves_none(tmp_path):
  """Step 1 blows the parameters up to ~1e30 (finite); step 2's loss is
  inf. The run stops naming step 2 and the loss, though the first log
  step is 4; the checkpoints on disk are the finite ones."""
  workdir = str(tmp_path / "run")
  done = cli(workdir, 12, "--config.optimizer.lr=1e30",
             "--config.checkpoint.every_steps=1")
  assert done.returncode == 1, done.stderr[-2000:]
  line = last_line(done.stderr)
  assert line.startswith("mf_jax: NonFiniteError: Non-finite loss"), line
  assert "at step 2 " in line or "at step 2;" in line, line
  assert entries(workdir) == ["1"]
  state, _ = restored(config(**{"optimizer.lr": 1e30}), workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_stop_policy_ends_before_a_sample_grid_reads_the_state(tmp_path):
  """Policy 'stop' keeps a non-finite step's update (no select over the
  state); a sample grid between log steps must not draw from it."""
  workdir = str(tmp_path / "run")
  c = config(num_steps=12, **{"optimizer.lr": 1e30,
                              "training.log_every_steps": 100,
                              "checkpoint.every_steps": 0,
                              "sample.every_steps": 3})
  with pytest.raises(step_lib.NonFiniteError, match="at step 2"):
    trainer.train_and_evaluate(c, workdir)
  for written in ("samples", "checkpoints"):
    path = os.path.join(workdir, written)
    assert not os.path.exists(path) or not os.listdir(path), written


def test_skip_policy_drops_nonfinite_updates(tmp_path):
  workdir = str(tmp_path / "run")
  c = config(num_steps=8, **{"optimizer.lr": 1e30,
                             "training.on_nonfinite": "skip"})
  trainer.train_and_evaluate(c, workdir)
  after_1 = str(tmp_path / "one")
  trainer.train_and_evaluate(config(num_steps=1, **{"optimizer.lr": 1e30}),
                             after_1)
  state, _ = restored(c, workdir)
  assert int(state.skipped_steps) == 7 and int(state.nonfinite_step) == 2
  assert_same(state.params, restored(c, after_1)[0].params)
  records = [json.loads(line) for line in open(
      os.path.join(workdir, "metrics.jsonl")) if "skipped_steps" in line]
  assert records[-1]["skipped_steps"] == 7


def test_failed_eval_is_logged_and_training_goes_on(tmp_path, monkeypatch,
                                                    caplog):
  def broken(*args):
    raise RuntimeError("wrong Inception file")
  monkeypatch.setattr(trainer, "evaluate", broken)
  c = config(num_steps=8, **{"eval.every_steps": 4})
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.ERROR):
    trainer.train_and_evaluate(c, workdir)
  assert "Evaluation at step 4 failed" in caplog.text
  assert "RuntimeError: wrong Inception file" in caplog.text  # traceback
  assert entries(workdir) == ["4", "8"]
  # Fatal when asked; the checkpoint of that step is saved before.
  c.eval.errors_fatal = True
  with pytest.raises(RuntimeError, match="wrong Inception file"):
    trainer.train_and_evaluate(c, str(tmp_path / "fatal"))
  assert entries(str(tmp_path / "fatal")) == ["4"]


def test_failed_save_raises_with_its_cause_and_cleans_up(tmp_path,
                                                         monkeypatch):
  """The disk fills up while the meta record of step 8 is being written
  (asynchronously): the run stops at once naming the cause, and no
  temporary folder is left."""
  path_type = type(epath.Path(str(tmp_path)))
  write_text = path_type.write_text

  def full_disk(self, *args, **kwargs):
    if "orbax-checkpoint-tmp" in str(self) and "/8." in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", full_disk)
  workdir = str(tmp_path / "run")
  with pytest.raises(checkpointing.CheckpointError) as e:
    trainer.train_and_evaluate(config(), workdir)
  assert str(e.value).endswith("No space left on device"), e.value
  assert "Saving" in str(e.value)
  assert entries(workdir) == ["4"]


def tiny_filesystem(path):
  """A 400 KiB tmpfs at `path`, or None where mounting is not allowed."""
  os.makedirs(path)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs",
                         path], capture_output=True, check=False)
  return path if done.returncode == 0 else None


def test_full_disk_stops_with_the_cause_on_the_last_line(tmp_path):
  workdir = tiny_filesystem(str(tmp_path / "tiny"))
  if workdir is None:
    pytest.skip("cannot mount a tmpfs here (not root?)")
  try:
    # ~70k parameters x (params, 2 Adam moments, EMA) fills 400 KiB.
    done = cli(workdir, 12, "--config.model.hidden_size=128",
               "--config.model.depth=2")
    assert done.returncode == 1, done.stderr[-2000:]
    line = last_line(done.stderr)
    assert line.startswith("mf_jax: CheckpointError: Saving"), line
    assert line.endswith("No space left on device"), line
    leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints"))
                 if "tmp" in n]
    assert not leftovers, leftovers
  finally:
    subprocess.run(["umount", workdir], check=False)


def wait_for_logged_step(workdir, proc, step, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    if os.path.exists(path) and any(
        json.loads(line).get("step", 0) >= step
        for line in open(path).read().splitlines() if line.endswith("}")):
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not logged")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_save_then_exit(tmp_path, signum):
  workdir = str(tmp_path / "run")
  proc = cli(workdir, 100_000, "--config.training.log_every_steps=1",
             "--config.checkpoint.every_steps=0", wait=False)
  wait_for_logged_step(workdir, proc, 3)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  (stopped,) = [int(n) for n in entries(workdir)]
  assert 3 <= stopped < 100_000
  assert f"{signal.Signals(signum).name} received" in err


def test_second_sigint_exits_at_once():
  """The first Ctrl-C asks for a save; the second raises at once, and the
  previous handlers are back afterwards."""
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with signals_lib.StopSignals() as signals:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)  # Python runs handlers between bytecodes
      assert signals.received == signal.SIGINT and signals.stop_at(1)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before


def test_early_and_time_based_saves(tmp_path):
  """No periodic saves: one early save at step 3, then one at every log
  step (every_secs is tiny), and the last step."""
  workdir = str(tmp_path / "run")
  c = config(num_steps=10, **{"checkpoint.every_steps": 0,
                              "checkpoint.first_step": 3,
                              "checkpoint.every_secs": 1e-6})
  trainer.train_and_evaluate(c, workdir)
  assert sorted(int(n) for n in entries(workdir)) == [3, 4, 8, 10]


def test_config_change_that_fits_is_said(straight, tmp_path, caplog):
  workdir = copy_run(straight, tmp_path, {4})
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config(**{"training.batch_size": 32}),
                               workdir)
  assert "changed config fields" in caplog.text
  assert "training.batch_size: 64 -> 32" in caplog.text


def test_config_changes_lists_fields():
  old = json.loads(config().to_json_best_effort())
  new = config(**{"model.depth": 3})
  assert resume.config_changes(old, new) == ["model.depth: 1 -> 3"]
  assert resume.config_changes(old, config()) == []
