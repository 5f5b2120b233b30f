"""The trainer end to end: resume is exact, eval writes its JSON, the CLI."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mf_jax import config_lib
from mf_jax import sharding
from mf_jax.evaluation import evaluator as evaluator_lib
from mf_jax.training import state as state_lib
from mf_jax.training import step as step_lib
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_toy_config(objective="meanflow", num_steps=24):
  c = toy2d.get_config(f"objective={objective}")
  c.model.update(hidden_size=32, depth=1)
  c.training.update(num_steps=num_steps, batch_size=64, log_every_steps=4)
  c.checkpoint.update(every_steps=8, async_save=True)
  c.eval.update(every_steps=24, nfe=(1, 2), num_samples=400, batch_size=200)
  c.sample.update(every_steps=24)
  return c


def final_state(config, workdir):
  exp = trainer.Experiment(config, workdir)
  state, step = exp.restore()
  exp.checkpointer.close()
  return jax.device_get(state), step


def test_resume_gives_the_uninterrupted_run(tmp_path):
  straight = str(tmp_path / "straight")
  trainer.train_and_evaluate(tiny_toy_config(num_steps=24), straight)
  # The same run stopped after step 8 (its later checkpoints lost), resumed.
  # (Not a run with num_steps=8: the cosine schedule depends on num_steps.)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  for step in (16, 24):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  trainer.train_and_evaluate(tiny_toy_config(num_steps=24), resumed)
  a, step_a = final_state(tiny_toy_config(), straight)
  b, step_b = final_state(tiny_toy_config(), resumed)
  assert step_a == step_b == 24
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # Different runs would differ: the comparison is not vacuous.
  assert not np.array_equal(jax.tree.leaves(a.params)[0],
                            jax.tree.leaves(a.ema_params)[0])


def test_eval_json_and_samples(tmp_path):
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(tiny_toy_config(), workdir)
  with open(os.path.join(workdir, "eval", "24.json")) as f:
    written = json.load(f)
  assert written == results
  assert set(written) == {"nfe1/energy_distance", "nfe2/energy_distance"}
  assert all(np.isfinite(v) for v in written.values())
  assert os.path.exists(os.path.join(workdir, "samples", "24_nfe1.png"))
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  logged = [json.loads(line) for line in lines]
  assert {"loss", "mse", "v_mse", "grad_norm"} <= set(logged[0])
  # eval mode on the saved checkpoint reproduces the training-time figures,
  # also when the 2-step schedule is written out as explicit times.
  config = tiny_toy_config()
  config.eval.nfe = (1, "1,0.5,0")
  again = trainer.evaluate_checkpoint(config, workdir)
  assert again == pytest.approx({
      "nfe1/energy_distance": results["nfe1/energy_distance"],
      "nfe2[1,0.5,0]/energy_distance": results["nfe2/energy_distance"]},
      rel=1e-5)
  config.eval.nfe = (1, "1,0.5")
  with pytest.raises(ValueError, match="descend from 1 to 0"):
    trainer.Experiment(config, workdir)


def _cli(*args, timeout=300):
  return subprocess.run(
      [sys.executable, "-m", "mf_jax.main", *args], cwd=REPO,
      capture_output=True, text=True, timeout=timeout)


def test_cli_train_eval_sample(tmp_path):
  workdir = str(tmp_path / "cli")
  overrides = ["--config.model.hidden_size=32", "--config.model.depth=1",
               "--config.training.num_steps=6", "--config.training.batch_size=32",
               "--config.checkpoint.every_steps=6", "--config.eval.every_steps=6",
               "--config.eval.num_samples=200", "--config.eval.batch_size=200",
               "--config.sample.every_steps=6"]
  config = "--config=configs/toy2d.py:objective=flow_matching,dataset=moons"
  done = _cli(config, f"--workdir={workdir}", *overrides)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "nfe1/energy_distance" in json.loads(done.stdout.splitlines()[-1])
  done = _cli(config, f"--workdir={workdir}", "--mode=sample", "--nfe=2",
              *overrides)
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "samples", "6_nfe2.png"))


def test_cli_rejects_bad_input_before_compiling(tmp_path):
  done = _cli("--config=configs/toy2d.py:objective=meanflw",
              f"--workdir={tmp_path}")
  assert done.returncode != 0
  assert "Unknown objective.name 'meanflw'" in done.stderr
  done = _cli("--config=configs/toy2d.py", f"--workdir={tmp_path}",
              "--config.training.batch_size=12")
  assert done.returncode != 0 and "not divisible" in done.stderr
  # batch_size=0 passed the divisibility check and died in a reshape;
  # eval.num_samples=0 failed at the first evaluation. Both, in one line.
  done = _cli("--config=configs/toy2d.py", f"--workdir={tmp_path}",
              "--config.training.batch_size=0",
              "--config.eval.num_samples=0")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "ValueError: Invalid config: training.batch_size=0 (must be >= 1); "
      "eval.num_samples=0 (must be >= 1 when eval.every_steps > 0 or FID "
      "is configured).")
  assert os.listdir(tmp_path) == []  # nothing written: no config.json


def _run_until_checkpoint_then_kill(args, checkpoints, min_step):
  """Starts the CLI and SIGKILLs it once a checkpoint >= min_step exists
  (at whatever step it is then: the kill lands mid-step or mid-save)."""
  proc = subprocess.Popen([sys.executable, "-m", "mf_jax.main", *args],
                          cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(checkpoints) and any(
        name.isdigit() and int(name) >= min_step
        for name in os.listdir(checkpoints)):
      break
    time.sleep(0.05)
  proc.kill()
  proc.wait()


def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path):
  """A run killed hard twice (after a checkpoint, and again after a later
  one of the relaunched run), then relaunched, ends where an uninterrupted
  run ends, bit for bit."""
  overrides = ["--config.model.hidden_size=32", "--config.model.depth=1",
               "--config.training.num_steps=200",
               "--config.training.batch_size=64",
               "--config.checkpoint.every_steps=25",
               "--config.eval.every_steps=0", "--config.sample.every_steps=0"]
  config = "--config=configs/toy2d.py"
  killed = str(tmp_path / "killed")
  checkpoints = os.path.join(killed, "checkpoints")
  for _ in range(2):  # each time 2 checkpoints past the last one
    saved = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if (
        os.path.isdir(checkpoints)) else []
    _run_until_checkpoint_then_kill([config, f"--workdir={killed}",
                                     *overrides], checkpoints,
                                    max(saved, default=0) + 50)
  assert _cli(config, f"--workdir={killed}", *overrides).returncode == 0
  straight = str(tmp_path / "straight")
  assert _cli(config, f"--workdir={straight}", *overrides).returncode == 0
  c = tiny_toy_config(num_steps=200)
  a, step_a = final_state(c, straight)
  b, step_b = final_state(c, killed)
  assert step_a == step_b == 200
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_meanflow_one_step_beats_flow_matching_on_checkerboard(tmp_path):
  """The point of MeanFlow, in small: after the same short training, one
  MeanFlow step lands much closer to the checkerboard than one Euler step of
  flow matching, whose one-step map can only reach the conditional mean."""
  one_step = {}
  for objective in ("meanflow", "flow_matching"):
    c = tiny_toy_config(objective, num_steps=1500)
    c.model.update(hidden_size=128, depth=2)
    c.mesh.num_devices = 1  # a 2-D MLP gains nothing from 8 fake devices
    c.training.update(batch_size=256, log_every_steps=500)
    c.checkpoint.every_steps = 1500
    c.eval.update(every_steps=1500, nfe=(1,), num_samples=2000,
                  batch_size=1000)
    c.sample.every_steps = 0
    results = trainer.train_and_evaluate(c, str(tmp_path / objective))
    one_step[objective] = results["nfe1/energy_distance"]
  assert one_step["meanflow"] < 0.5 * one_step["flow_matching"], one_step


def test_no_sample_only_evaluation_without_a_score():
  """Latent samples have no score without FID: the evaluator draws none
  (an ImageNet config would otherwise sample 50,000 for nothing)."""
  c = config_lib.imagenet256_config("S/4", 1.0, 0.0, 0.0, 1.0)
  c.eval.update(batch_size=8, num_samples=16)

  def u_fn(*args, **kwargs):
    raise AssertionError("sampled")

  evaluator = evaluator_lib.Evaluator(c, u_fn, sharding.make_mesh(c.mesh),
                                      (32, 32, 4))
  assert not evaluator.scores_samples
  assert evaluator({}, jax.random.key(0)) == {}
  c.data.name = "digits"
  assert evaluator_lib.Evaluator(c, u_fn, sharding.make_mesh(c.mesh),
                                 (8, 8, 1)).scores_samples


def _steps_on_random_batches(config, count, checked=True):
  """(metrics per step, state after, the first state's leaf) of `count`
  steps of config's compiled step from a fresh state."""
  exp = trainer.Experiment(config, workdir="")
  step, _ = exp.compile_train_step(checked=checked)
  state = exp.new_state()
  first_leaf = jax.tree.leaves(state.params)[0]
  batch_spec = exp.abstract_batch()
  rng = np.random.default_rng(0)
  logged = []
  for _ in range(count):
    batch = {k: jax.device_put(
        rng.standard_normal(s.shape).astype(s.dtype), s.sharding)
             for k, s in batch_spec.items()}
    state, metrics = step(state, batch, jax.random.key(0))
    logged.append(jax.device_get(metrics))
  return logged, state, first_leaf


def test_norms_and_donation_by_backend():
  c = tiny_toy_config(num_steps=5)
  c.training.log_every_steps = 2
  logged, state, first_leaf = _steps_on_random_batches(c, 5)
  assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
             for m in logged)
  # The norm is the updated parameters' own.
  assert logged[-1]["param_norm"] == pytest.approx(
      float(np.sqrt(sum(np.sum(np.square(x))
                        for x in jax.tree.leaves(state.params)))), rel=1e-5)
  # The log steps' program adds only checks and norms: the other steps'
  # program leaves the same state and metrics.
  plain, plain_state, _ = _steps_on_random_batches(c, 5, checked=False)
  assert not {"grad_norm", "param_norm"} & set(plain[-1])
  for key, value in plain[-1].items():
    np.testing.assert_array_equal(value, logged[-1][key])
  for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # 'auto' on CPU keeps the state's buffers; 'always' hands them over.
  assert not first_leaf.is_deleted()
  c.training.donate_state = "always"
  _, _, first_leaf = _steps_on_random_batches(c, 1)
  assert first_leaf.is_deleted()


def _state_of(params, tx):
  zero = jnp.zeros((), jnp.int32)
  return state_lib.TrainState(
      step=zero, params=params, opt_state=tx.init(params),
      ema_params={"0.9": params}, target_params={}, nonfinite_step=zero,
      nonfinite_what=zero, skipped_steps=zero)


def test_a_nan_gradient_under_a_finite_loss_drops_the_update():
  """The step checks the loss and the updated parameters, not the
  gradients on their own: Adam must carry a NaN gradient into the
  parameters (even at lr 0), so the update is still dropped."""
  params = {"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)}

  def loss_fn(p, batch, rng, context):
    del batch, rng, context  # sqrt's derivative at 0 is inf: inf * 0 = NaN
    value = jnp.sum(jnp.sqrt(jnp.abs(p["w"]) * 0)) + jnp.sum(p["b"] ** 2)
    return value, {"loss": value}

  for lr in (1e-3, 0.0):
    tx = optax.adamw(lr)
    state = _state_of(params, tx)
    new, metrics = step_lib.train_step(
        state, {}, jax.random.key(0), {}, loss_fn=loss_fn, tx=tx,
        schedule=lambda step: lr)
    assert np.isfinite(metrics["loss"])
    assert int(new.skipped_steps) == 1 and int(new.nonfinite_step) == 1
    assert int(new.nonfinite_what) == (step_lib.NONFINITE_GRAD
                                       | step_lib.NONFINITE_PARAMS)
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state,
                                     new.ema_params)),
                    jax.tree.leaves((params, state.opt_state,
                                     state.ema_params))):
      np.testing.assert_array_equal(a, b)


def test_policy_stop_records_the_first_nonfinite_step_and_keeps_it():
  """drop_nonfinite=False: no select, no step counts as skipped. lr = 1e38
  moves w by -1e38 a step (Adam's update of a constant gradient is 1), so
  step 4's update overflows to -inf while its loss (w before the update)
  is finite: a checked step names step 4 and the parameters, an unchecked
  one only sees step 5's loss."""
  def loss_fn(p, batch, rng, context):
    del batch, rng, context
    return p["w"][0], {"loss": p["w"][0]}

  tx = optax.adam(1e38)
  for checked, first, what in ((True, 4, step_lib.NONFINITE_PARAMS),
                               (False, 5, step_lib.NONFINITE_LOSS)):
    state = _state_of({"w": np.ones(1, np.float32)}, tx)
    for _ in range(6):
      state, _ = step_lib.train_step(
          state, {}, jax.random.key(0), {}, loss_fn=loss_fn, tx=tx,
          schedule=lambda step: 1e38, checked=checked, drop_nonfinite=False)
    assert int(state.nonfinite_step) == first, checked
    assert int(state.nonfinite_what) == what, checked
    assert int(state.skipped_steps) == 0
    assert not np.isfinite(np.asarray(state.params["w"])).any()
