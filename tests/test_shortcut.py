"""Shortcut models: the two-half-step target by hand, the row layout of the
draws, the fixed point of the loss on Gaussian data, the config errors, and
a short checkerboard run."""

import functools
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import objectives
from mf_jax.objectives import common
from mf_jax.objectives import shortcut
from mf_jax.training import trainer
from tests.gaussian_flow import exact_u, marginal_velocity, MU, S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(**objective):
  c = config_lib.base_config()
  c.objective.update(name="shortcut", adaptive_p=0.0, **objective)
  c.training.ema_decays = (0.999,)
  c.eval.nfe = (1, 2)
  return c


def _net(params, z, t, h, y, train):
  """A small nonlinear field of (z, t, h, y) with parameters (a, b)."""
  del train
  t_, h_ = common.broadcast_to(t, z), common.broadcast_to(h, z)
  y_ = common.broadcast_to(y.astype(z.dtype), z)
  return (params["a"] * jnp.tanh(z) * (1 + t_) + params["b"] * (1 + 3 * h_)
          + 0.3 * y_)


def _np_net(params, z, t, h, y):
  a, b = float(params["a"]), float(params["b"])
  return (a * np.tanh(z) * (1 + t[:, None]) + b * (1 + 3 * h[:, None])
          + 0.3 * y[:, None])


@pytest.mark.parametrize("fm_step,split,target", [
    ("min", "code", "ema"),  # the official code
    ("zero", "disjoint", "online"),  # the paper
])
def test_two_half_step_target_by_hand(fm_step, split, target):
  """M = 8, batch 8, half bootstrap: levels d = 1/4, 1/2, 1, 1 then four
  flow-matching rows; CFG 1.5 on the d = 1/4 row; clip 0.6."""
  num_classes, clip, w = 3, 0.6, 1.5
  settings = _config(shortcut_max_steps=8, shortcut_bootstrap_fraction=0.5,
                     shortcut_fm_step=fm_step, shortcut_batch_split=split,
                     shortcut_target=target, shortcut_clip=clip,
                     shortcut_bootstrap_cfg_scale=w).objective
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 3))
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  e = rng.standard_normal((8, 3))
  d = np.array([1 / 4, 1 / 2, 1, 1])
  fm_h = 1 / 8 if fm_step == "min" else 0.0
  t = np.array([3 / 4, 1 / 2, 1, 1, 3 / 8, 1 / 8, 1, 5 / 8])
  h = np.concatenate([d, np.full(4, fm_h)])
  dropped = np.array([0, 0, 0, 0, 0, 1, 0, 1], bool)
  online = {"a": np.float32(0.7), "b": np.float32(-0.4)}
  ema = {"a": np.float32(0.5), "b": np.float32(0.2)}
  tgt = online if target == "online" else ema

  # By hand, in float64.
  src = [0, 1, 2, 3] + ([0, 1, 2, 3] if split == "code" else [4, 5, 6, 7])
  xr, yr = x[src], y[src]
  z = (1 - t[:, None]) * xr + t[:, None] * e
  v = e - xr
  half = d / 2
  half_in = np.where(half == 1 / 8, fm_h, half)

  def jump(z_b, t_b):
    s = _np_net(tgt, z_b, t_b, half_in, yr[:4])
    null = _np_net(tgt, z_b, t_b, half_in, np.full(4, num_classes))
    s[0] = null[0] + w * (s[0] - null[0])  # only the smallest level
    return s

  s1 = jump(z[:4], t[:4])
  z_mid = z[:4] - half[:, None] * s1
  s2 = jump(np.clip(z_mid, -clip, clip), t[:4] - half)
  boot = (s1 + s2) / 2
  for raw in (z_mid, boot):  # both clips bite, on some entries
    assert 0 < np.mean(np.abs(raw) > clip) < 0.5
  boot = np.clip(boot, -clip, clip)
  target_rows = np.concatenate([boot, v[4:]])
  y_in = np.where(dropped, num_classes, yr)
  u = _np_net(online, z, t, h, y_in)
  sq_err = np.sum((u - target_rows) ** 2, axis=-1)

  batch = {"x": x.astype(np.float32), "y": y.astype(np.int32)}
  draws = {"t": t.astype(np.float32), "h": h.astype(np.float32),
           "e": e.astype(np.float32), "dropped": dropped}
  context = objectives.Context(step=jnp.int32(0),
                               ema_params={"0.999": ema, "0.9999": online})
  value, metrics = shortcut.loss(_net, online, batch, draws, settings,
                                 num_classes, context)
  np.testing.assert_allclose(value, np.mean(sq_err), rtol=1e-5)
  np.testing.assert_allclose(metrics["bootstrap_mse"], np.mean(sq_err[:4]),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["v_mse"], np.mean(sq_err[4:]),
                             rtol=1e-5)
  # The target carries no gradient: d loss / d params is that of
  # mean ||u - sg(target)||^2 with the target held fixed.
  grads = jax.grad(lambda p: shortcut.loss(
      _net, p, batch, draws, settings, num_classes, context)[0])(online)
  def fixed(p):
    u = _net(p, jnp.asarray(z, jnp.float32), t.astype(np.float32),
             h.astype(np.float32), jnp.asarray(y_in), True)
    return jnp.mean(jnp.sum((u - target_rows.astype(np.float32)) ** 2, -1))
  expect = jax.grad(fixed)(online)
  for k in ("a", "b"):
    np.testing.assert_allclose(grads[k], expect[k], rtol=1e-4)


def test_draws_follow_the_official_layout():
  """Batch 256 at 1/8 (bootstrap_every = 8), M = 128: 32 bootstrap rows,
  4 per level from d = 1/64 up to d = 1 plus the 4 left over at d = 1,
  each t on its own d-grid; 224 flow-matching rows on the 1/128 grid with
  h = 1/128, the only rows whose labels drop."""
  settings = _config(shortcut_bootstrap_fraction=0.125,
                     class_dropout=0.5).objective
  batch = {"x": jnp.zeros((256, 2)), "y": jnp.ones((256,), jnp.int32)}
  draw = lambda settings: jax.jit(lambda rng, b: shortcut.draw(
      rng, b, settings, 10))(jax.random.key(3), batch)
  draws = draw(settings)
  t, h = np.asarray(draws["t"]), np.asarray(draws["h"])
  expect_d = np.concatenate([np.repeat(2.0 ** -np.arange(6, -1, -1), 4),
                             np.ones(4)])
  np.testing.assert_array_equal(h[:32], expect_d)
  np.testing.assert_array_equal(h[32:], 1 / 128)
  cells = t / np.concatenate([expect_d, np.full(224, 1 / 128)])
  np.testing.assert_array_equal(cells, np.round(cells))
  assert cells.min() >= 1 and (t <= 1).all() and t[32:].min() < 0.5
  dropped = np.asarray(draws["dropped"])
  assert not dropped[:32].any() and 0.3 < dropped[32:].mean() < 0.7
  # The paper's d = 0 moves only the flow-matching rows' h.
  zero = _config(shortcut_bootstrap_fraction=0.125,
                 shortcut_fm_step="zero").objective
  h0 = np.asarray(draw(zero)["h"])
  np.testing.assert_array_equal(h0[:32], expect_d)
  np.testing.assert_array_equal(h0[32:], 0.0)


def _exact_field(z, t, h):
  """The exact average velocity for h > 0, the marginal velocity at 0."""
  safe_h = jnp.where(h > 0, h, 1.0)
  return jnp.where(common.broadcast_to(h > 0, z),
                   exact_u(None, z, t, safe_h, None, False),
                   marginal_velocity(z, t))


@functools.cache
def _mean_gradient_fn(n=2**18):
  """params -> the loss gradient at u = exact * (1 + a) + b, Monte Carlo
  over n Gaussian samples (1-D); the paper's d = 0 flow-matching rows."""
  settings = _config(shortcut_fm_step="zero", shortcut_clip=0.0,
                     class_dropout=0.0).objective

  def u_model(p, z, t, h, y, train):
    del y, train
    return _exact_field(z, t, h) * (1 + p["a"]) + p["b"]

  def gradient(params):
    rng_x, rng_draw = jax.random.split(jax.random.key(1))
    batch = {"x": MU + S * jax.random.normal(rng_x, (n, 1)),
             "y": jnp.zeros(n, jnp.int32)}
    draws = shortcut.draw(rng_draw, batch, settings, 0)

    def loss(p):
      context = objectives.Context(step=jnp.int32(0),
                                   ema_params={"0.999": p})
      return shortcut.loss(u_model, p, batch, draws, settings, 0,
                           context)[0]
    grads = jax.grad(loss)(params)
    return jnp.stack([grads["a"], grads["b"]])
  return jax.jit(gradient)


def test_expected_gradient_vanishes_at_the_exact_average_velocity():
  """Two exact half steps compose into the exact full step, and the
  conditional velocity averages to the marginal one: the exact flow map is
  a fixed point of the loss (up to the trapezoidal half steps at h = 0 of
  the smallest level, and Monte Carlo noise: the ratio is ~0.004 here, and
  ~0.2 with the midpoint's sign flipped), a perturbed one is not. The
  target is the EMA copy, here equal to the parameters."""
  zero = {"a": jnp.float32(0.0), "b": jnp.float32(0.0)}
  off = {"a": jnp.float32(0.25), "b": jnp.float32(0.25)}
  at_fixed_point = _mean_gradient_fn()(zero)
  perturbed = _mean_gradient_fn()(off)
  assert np.linalg.norm(at_fixed_point) < 0.03 * np.linalg.norm(perturbed), (
      at_fixed_point, perturbed)


@pytest.mark.parametrize("change,message", [
    (dict(eval_nfe=(1, 3)), "eval.nfe has 3 steps"),
    (dict(eval_nfe=(1, 256)), "eval.nfe has 256 steps"),
    (dict(sample_nfe=6), "sample.nfe has 6 steps"),
    (dict(timesteps="1,0.6,0"), "sample.timesteps has '1,0.6,0'"),
    (dict(timesteps="1,0.75,0.25,0"), "the step 0.75 -> 0.25 is not"),
    (dict(shortcut_target_ema=0.9999),
     r"shortcut_target_ema=0.9999 must be one of training.ema_decays"),
    (dict(shortcut_max_steps=100), "shortcut_max_steps=100"),
    (dict(shortcut_bootstrap_fraction=0.02), "fewer than the 7 step sizes"),
    (dict(shortcut_fm_step="half"), "Unknown objective.shortcut_fm_step"),
    (dict(shortcut_bootstrap_cfg_scale=1.5), "needs a class-conditional"),
])
def test_config_errors_are_one_line(change, message):
  c = _config()
  c.model.num_classes = 0
  c.training.batch_size = 256
  c.eval.nfe = (1, 2, 4, 128, "ode", "heun8")
  c.sample.timesteps = "1,0.5,0.25,0"
  objectives.validate(c)  # valid before the change
  c.eval.nfe = change.pop("eval_nfe", c.eval.nfe)
  if "sample_nfe" in change:
    c.sample.update(nfe=change.pop("sample_nfe"), timesteps="")
  c.sample.timesteps = change.pop("timesteps", c.sample.timesteps)
  c.objective.update(**change)
  with pytest.raises(ValueError, match=message) as error:
    objectives.validate(c)
  assert "\n" not in str(error.value)


def test_online_target_needs_no_ema():
  c = _config(shortcut_target="online")
  c.training.ema_decays = (0.9999,)
  objectives.validate(c)
  c.objective.shortcut_target = "ema"
  with pytest.raises(ValueError, match="shortcut_target_ema"):
    objectives.validate(c)


def test_imagenet_config_is_the_official_setting():
  """README's ImageNet-256 DiT-B command and train.py's defaults."""
  c = importlib.import_module("configs.imagenet256_shortcut_b2").get_config()
  objectives.validate(c)
  o = c.objective
  assert (c.model.variant, c.training.batch_size, c.training.num_steps) == (
      "B/2", 256, 810_000)
  assert (o.shortcut_max_steps, o.shortcut_bootstrap_fraction) == (128, 1 / 8)
  assert (o.shortcut_target, o.shortcut_target_ema) == ("ema", 0.999)
  assert (o.shortcut_bootstrap_cfg_scale, o.class_dropout) == (1.5, 0.1)
  assert (o.shortcut_fm_step, o.shortcut_clip, o.adaptive_p) == ("min", 4, 0)
  opt = c.optimizer
  assert (opt.name, opt.lr, opt.b1, opt.b2, opt.weight_decay) == (
      "adamw", 1e-4, 0.9, 0.999, 0.1)
  assert (opt.schedule, opt.warmup_steps) == ("constant", 0)


def test_short_checkerboard_run_improves_one_step(tmp_path):
  """300 steps of a small MLP (one device: the compile is most of the
  time): the 1-NFE energy distance falls well below the untrained
  network's (0.040 -> 0.012 when written)."""
  c = toy2d.get_config("objective=shortcut,dataset=checkerboard")
  c.model.update(hidden_size=64, depth=2)
  c.training.update(num_steps=300, batch_size=256, log_every_steps=300)
  c.checkpoint.every_steps = 300
  c.eval.update(every_steps=300, nfe=(1,), num_samples=2000, batch_size=1000)
  c.sample.every_steps = 0
  c.mesh.num_devices = 1
  exp = trainer.Experiment(c, str(tmp_path))
  start = exp.make_evaluator()(exp.eval_params(exp.new_state()),
                               jax.random.key(1))["nfe1/energy_distance"]
  end = trainer.train_and_evaluate(c, str(tmp_path))["nfe1/energy_distance"]
  assert end < 0.5 * start, (start, end)
