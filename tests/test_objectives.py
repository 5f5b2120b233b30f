"""Objectives: the MeanFlow identity on Gaussian data, the JVP, guidance."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import objectives
from mf_jax.objectives import common
from mf_jax.objectives import guidance
from mf_jax.objectives import meanflow
from mf_jax.objectives import time_samplers
from tests.gaussian_flow import exact_u, marginal_velocity, MU, S, sigma

def _times(n, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.uniform(0.2, 1.0, n)
  r = t * rng.uniform(0.0, 0.9, n)
  return jnp.asarray(t, jnp.float32), jnp.asarray(r, jnp.float32)


def test_meanflow_target_equals_true_average_velocity():
  with jax.enable_x64(True):
    t, r = _times(64)
    t, r = t.astype(jnp.float64), r.astype(jnp.float64)
    z = jax.random.normal(jax.random.key(0), (64, 3), jnp.float64) * 2
    v = marginal_velocity(z, t)
    u, target = meanflow.prediction_and_target(exact_u, None, z, r, t, None, v)
    np.testing.assert_allclose(target, u, rtol=1e-10, atol=1e-10)


def test_meanflow_target_with_conditional_velocity_is_unbiased():
  """Averaged over (x, e) given z_t, the sampled target is the true u."""
  t, r = jnp.float32(0.7), jnp.float32(0.2)
  z0 = jnp.float32(0.4)
  n = 200_000
  # Posterior x | z_t is Gaussian; e follows from z_t = (1 - t) x + t e.
  var_t = sigma(t) ** 2
  post_mean = MU + (1 - t) * S**2 / var_t * (z0 - (1 - t) * MU)
  post_std = jnp.sqrt(S**2 - ((1 - t) * S**2) ** 2 / var_t)
  x = post_mean + post_std * jax.random.normal(jax.random.key(1), (n, 1))
  e = (z0 - (1 - t) * x) / t
  z = jnp.full((n, 1), z0)
  t_b, r_b = jnp.full((n,), t), jnp.full((n,), r)
  _, target = meanflow.prediction_and_target(exact_u, None, z, r_b, t_b,
                                             None, e - x)
  u_true = exact_u(None, z[:1], t_b[:1], t_b[:1] - r_b[:1], None, False)
  np.testing.assert_allclose(jnp.mean(target), u_true[0, 0], atol=5e-3)


def _mlp_u_fn():
  from mf_jax import models  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse_arg(None, name="mlp", hidden_size=32, depth=2,
                             num_classes=3, time_inputs="t,h")
  model = models.build_model(cfg)
  z = jnp.ones((1, 2))
  params = model.init(jax.random.key(0), z, jnp.ones(1), jnp.ones(1),
                      jnp.zeros(1, jnp.int32))["params"]
  # Perturb (output layers start at zero) so derivatives are non-trivial.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  def u_fn(params, z, t, h, y, train):
    return model.apply({"params": params}, z, t, h, y, train=train)
  return u_fn, params


def test_jvp_matches_finite_difference_of_u_along_trajectory():
  """du/dt from the JVP equals d/ds u(z + s v, r, t + s) at s = 0."""
  u_fn, params = _mlp_u_fn()
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    t, r = _times(16, seed=3)
    t, r = t.astype(jnp.float64), r.astype(jnp.float64)
    z = jax.random.normal(jax.random.key(2), (16, 2), jnp.float64)
    v = jax.random.normal(jax.random.key(3), (16, 2), jnp.float64)
    y = jnp.arange(16) % 3
    u, target = meanflow.prediction_and_target(u_fn, params, z, r, t, y, v)
    dudt = (v - target) / common.broadcast_to(t - r, z)

    def along(s):
      return u_fn(params, z + s * v, t + s, t + s - r, y, True)
    eps = 1e-6
    fd = (along(eps) - along(-eps)) / (2 * eps)
    np.testing.assert_allclose(dudt, fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(u, along(0.0), rtol=1e-12)


def _config(**objective):
  c = config_lib.base_config()
  c.objective.update(**objective)
  return c.objective


def test_sample_t_r_fraction_and_order():
  cfg = _config(fraction_r_neq_t=0.25)
  t, r = time_samplers.sample_t_r(jax.random.key(0), 200_000, cfg)
  assert bool(jnp.all(r <= t)) and bool(jnp.all((t >= 0) & (t <= 1)))
  assert abs(float(jnp.mean(r < t)) - 0.25) < 0.01
  # The mask is random, not by batch position: both halves carry r != t.
  half = 100_000
  assert abs(float(jnp.mean(r[:half] < t[:half])) -
             float(jnp.mean(r[half:] < t[half:]))) < 0.01


def _loss_fn(name, cfg, u_fn, num_classes):
  """(params, batch, rng) -> (loss, metrics): draws, then the loss."""
  objective = objectives.get(name)
  context = objectives.Context(step=jnp.int32(0))

  def loss_fn(params, batch, rng):
    draws = objective.draw(rng, batch, cfg, num_classes, context)
    return objective.loss(u_fn, params, batch, draws, cfg, num_classes,
                          context)
  return loss_fn


def test_meanflow_with_r_equal_t_is_flow_matching():
  """Given the same draws with r = t, MeanFlow's loss is flow matching's."""
  u_fn, params = _mlp_u_fn()
  batch = {"x": jax.random.normal(jax.random.key(4), (32, 2)),
           "y": jnp.arange(32, dtype=jnp.int32) % 3}
  cfg = _config(class_dropout=0.5)
  draws = meanflow.draw(jax.random.key(5), batch, cfg, 3)
  assert 0 < int(jnp.sum(draws["dropped"])) < 32
  draws["r"] = draws["t"]
  mf, mf_metrics = meanflow.loss(u_fn, params, batch, draws, cfg, 3)
  fm, fm_metrics = objectives.get("flow_matching").loss(
      u_fn, params, batch, draws, cfg, 3)
  np.testing.assert_allclose(mf, fm, rtol=1e-5)
  np.testing.assert_allclose(mf_metrics["mse"], fm_metrics["mse"], rtol=1e-5)
  # And flow matching is the squared error to v = e - x at h = 0.
  t = draws["t"]
  z, v = common.interpolate(batch["x"], draws["e"], t)
  y = jnp.where(draws["dropped"], 3, batch["y"])
  u = u_fn(params, z, t, jnp.zeros_like(t), y, True)
  np.testing.assert_allclose(fm_metrics["mse"],
                             jnp.mean(jnp.sum((u - v) ** 2, -1)), rtol=1e-5)


@pytest.mark.parametrize("passes", guidance.PASSES)
def test_guidance_matches_formula_in_its_passes(passes):
  calls = []

  def u_fn(params, z, t, h, y, train):
    calls.append(z.shape[0])
    # A label-dependent velocity field with h = 0.
    return z * (1 + y[:, None]) + t[:, None] + params

  z = jax.random.normal(jax.random.key(0), (8, 2))
  t = jnp.linspace(0.05, 0.95, 8)
  y = jnp.arange(8, dtype=jnp.int32) % 3
  v = jnp.ones((8, 2))
  cfg = _config(guidance_omega=0.6, guidance_kappa=0.3, guidance_t_start=0.2,
                guidance_t_end=0.7, guidance_passes=passes)
  v_g = guidance.guided_velocity(u_fn, 0.0, z, t, y, v, cfg, num_classes=3)
  # v_uncond and v_cond: two calls, or one on the doubled batch.
  assert calls == ([8, 8] if passes == "separate" else [16])
  v_u = u_fn(0.0, z, t, 0 * t, jnp.full_like(y, 3), False)
  v_c = u_fn(0.0, z, t, 0 * t, y, False)
  expect = 0.6 * v + 0.1 * v_u + 0.3 * v_c
  inside = ((t >= 0.2) & (t <= 0.7))[:, None]
  np.testing.assert_allclose(v_g, jnp.where(inside, expect, v), rtol=1e-6)

  calls.clear()
  cfg0 = _config(guidance_omega=2.0, guidance_kappa=0.0)
  v_g0 = guidance.guided_velocity(u_fn, 0.0, z, t, y, v, cfg0, num_classes=3)
  assert calls == [8]  # kappa = 0: only v_uncond
  np.testing.assert_allclose(v_g0, 2 * v - v_u, rtol=1e-6)


@pytest.mark.parametrize("name", ["flow_matching", "meanflow"])
def test_unknown_settings_fail_early(name):
  def config(**objective):
    c = config_lib.base_config()
    c.objective.update(**objective)
    return c
  with pytest.raises(ValueError, match="objective.name"):
    objectives.validate(config(name="meanflw"))
  with pytest.raises(ValueError, match="time_sampler"):
    objectives.validate(config(name=name, time_sampler="beta"))
  with pytest.raises(ValueError, match="jvp_tangent"):
    objectives.validate(config(name="meanflow", jvp_tangent="v,1"))


@pytest.mark.parametrize("name", ["flow_matching", "meanflow"])
def test_loss_decreases_on_toy_data(name):
  import optax  # pylint: disable=g-import-not-at-top
  from mf_jax.data import toy2d  # pylint: disable=g-import-not-at-top
  u_fn, params = _mlp_u_fn()
  cfg = _config(name=name, class_dropout=0.0, adaptive_p=0.0)
  loss_fn = _loss_fn(name, cfg, u_fn, num_classes=0)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  def held_out_loss(params):
    rng = np.random.default_rng(123)
    batches = [{"x": jnp.asarray(toy2d.sample("moons", 1024, rng)),
                "y": jnp.zeros(1024, jnp.int32)} for _ in range(4)]
    return np.mean([loss_fn(params, b, jax.random.key(1000 + i))[0]
                    for i, b in enumerate(batches)])

  before = held_out_loss(params)
  rng = np.random.default_rng(0)
  for i in range(300):
    batch = {"x": jnp.asarray(toy2d.sample("moons", 256, rng)),
             "y": jnp.zeros(256, jnp.int32)}
    params, opt_state, _ = step(params, opt_state, batch, jax.random.key(i))
  assert held_out_loss(params) < 0.85 * before
