"""Bad command lines and unwritable outputs fail at once, in one line.

Each fault is reproduced the way a user meets it (the CLI, a read-only
workdir); what is asserted is the last line of stderr (a traceback's own
last line is the exception's message), the exit status, and that nothing
was computed or written first.
"""

import os
import stat
import subprocess
import sys

import pytest

from mf_jax import main as main_lib
from mf_jax import preflight
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = ["--config=configs/toy2d.py", "--config.model.hidden_size=32",
        "--config.model.depth=1", "--config.training.num_steps=4",
        "--config.training.batch_size=64", "--config.checkpoint.every_steps=4",
        "--config.eval.every_steps=0", "--config.sample.every_steps=0",
        "--config.eval.num_samples=200", "--config.eval.batch_size=200"]


def tiny_config():
  c = toy2d.get_config()
  c.model.update(hidden_size=32, depth=1)
  c.training.update(num_steps=4, batch_size=64)
  c.checkpoint.update(every_steps=4, async_save=False)
  c.eval.update(every_steps=0, num_samples=200, batch_size=200)
  c.sample.update(every_steps=0)
  return c


def _cli(*args):
  done = subprocess.run([sys.executable, "-m", "mf_jax.main", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  return done.returncode, done.stderr.strip().splitlines()[-1]


NFE_MESSAGE = ("is not a sampling schedule: expected a step count >= 1 or "
               "times descending from 1 to 0 such as '1,0.6,0'.")


@pytest.mark.parametrize("value", ["0", "abc"])
def test_cli_bad_nfe_names_the_flag(tmp_path, value):
  """--nfe=0 used to fall back to the config's NFE silently, and --nfe=abc
  failed in the sampler without naming the flag. The workdir has no
  checkpoint: the flag is checked first, before anything else runs."""
  workdir = tmp_path / "run"
  status, line = _cli(*TINY, f"--workdir={workdir}", "--mode=sample",
                      f"--nfe={value}")
  assert status == 1
  assert line == f"ValueError: --nfe={value!r} {NFE_MESSAGE}"
  assert not workdir.exists()


@pytest.mark.parametrize("value", ["-1", "1,0.6", "0,0.5,1", "", "1.5"])
def test_other_bad_nfe_values(value):
  with pytest.raises(ValueError) as error:
    main_lib.parse_nfe(value)
  assert str(error.value) == f"--nfe={value!r} {NFE_MESSAGE}"


def test_good_nfe_values():
  assert main_lib.parse_nfe(None) is None
  assert main_lib.parse_nfe("2") == 2
  assert main_lib.parse_nfe("1,0.6,0") == "1,0.6,0"


def test_cli_nfe_outside_sample_mode_is_an_error(tmp_path):
  """It used to be ignored: eval mode scores eval.nfe whatever --nfe says."""
  status, line = _cli(*TINY, f"--workdir={tmp_path}", "--mode=eval",
                      "--nfe=2")
  assert status == 1
  assert line == ("ValueError: --nfe is for --mode=sample; --mode=eval reads "
                  "eval.nfe (eval) or sample.nfe (grids).")


def _make_unwritable(directory) -> str:
  """Makes `directory`/eval impossible to create; returns how.

  chmod 0555 on the workdir is what a user meets, but root (these tests'
  user in containers) writes through any mode bits. So the chmod is tried
  first and, if a file can still be created, undone and replaced by a
  regular file named `eval`: its probe path lies under a file, which no
  user can create.
  """
  assert not os.path.exists(os.path.join(directory, "eval"))
  os.chmod(directory, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP
           | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
  test_file = os.path.join(directory, "root_can_write")
  try:
    with open(test_file, "w"):
      pass
  except PermissionError:
    return "chmod"
  os.remove(test_file)
  os.chmod(directory, 0o755)
  with open(os.path.join(directory, "eval"), "w") as f:
    f.write("a file where the eval folder should be")
  return "file"


def test_eval_on_an_unwritable_workdir_fails_before_computing(tmp_path,
                                                              monkeypatch):
  """--mode=eval on a read-only folder used to compute the whole evaluation,
  then fail to write it and print nothing."""
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(), workdir)  # a checkpoint to score
  how = _make_unwritable(workdir)
  try:
    status, line = _cli(*TINY, f"--workdir={workdir}", "--mode=eval")
    assert status == 1
    eval_dir = os.path.join(workdir, "eval")
    assert line.startswith(f"PermissionError: Cannot write evaluation results "
                           f"to {eval_dir} ("), (how, line)
    assert line.endswith("); use a --workdir this process can write.")
    # In process: nothing is built (so nothing restored or computed) first.
    def no_experiment(*args, **kwargs):
      raise AssertionError("an Experiment was built before the check")
    monkeypatch.setattr(trainer, "Experiment", no_experiment)
    with pytest.raises(PermissionError, match="Cannot write evaluation"):
      trainer.evaluate_checkpoint(tiny_config(), workdir)
  finally:
    os.chmod(workdir, 0o755)
  if how == "chmod":
    assert not os.path.exists(os.path.join(workdir, "eval"))


def test_writable_check_leaves_nothing_behind(tmp_path):
  """A mistyped workdir is not created by the check (eval then fails for
  want of a checkpoint, without an empty folder tree left behind)."""
  target = tmp_path / "typo" / "run" / "eval"
  preflight.check_writable(str(target), "evaluation results")
  assert os.listdir(tmp_path) == []
  (tmp_path / "kept").mkdir()
  preflight.check_writable(str(tmp_path / "kept"), "evaluation results")
  assert os.listdir(tmp_path / "kept") == []
