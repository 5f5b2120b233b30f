"""alpha-Flow: its curriculum, its target at alpha = 1, in between and at the
MeanFlow limit, and the fixed points of its loss on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import objectives
from mf_jax.objectives import alpha_flow
from mf_jax.objectives import common
from mf_jax.objectives import meanflow
from tests.gaussian_flow import exact_u, marginal_velocity, MU, S


def _config(**objective):
  c = config_lib.base_config()
  c.objective.update(name="alpha_flow", **objective)
  c.training.num_steps = 1000
  return c


def test_curriculum_is_the_official_sigmoid():
  settings = _config(alpha_start_step=200, alpha_end_step=600).objective
  alpha = lambda k: float(alpha_flow.alpha_at(k, settings, 600))
  assert alpha(0) == alpha(200) == 1.0  # snapped: sigmoid(-12.5) ~ 4e-6
  assert alpha(400) == pytest.approx(0.5)
  assert alpha(600) == alpha(1000) == 0.0
  # In between: a0 + (a1 - a0) sigmoid(gamma (k - mid) / span), by hand.
  assert alpha(450) == pytest.approx(1 - 1 / (1 + np.exp(-25 * 50 / 400)))
  values = [alpha(k) for k in range(0, 1001, 10)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  # Values within alpha_clamp of 0 switch to the exact MeanFlow target.
  assert min(a for a in values if a > 0) >= settings.alpha_clamp


def test_curriculum_errors_before_compiling():
  with pytest.raises(ValueError, match="after training.num_steps"):
    objectives.validate(_config(alpha_end_step=2000))
  with pytest.raises(ValueError, match="alpha_start_step"):
    objectives.validate(_config(alpha_start_step=700, alpha_end_step=600))
  with pytest.raises(ValueError, match="alpha_schedule"):
    objectives.validate(_config(alpha_schedule="cosine"))
  objectives.validate(_config())  # -1: the curriculum ends at num_steps


def _net(params, z, t, h, y, train):
  """A small nonlinear field of (z, t, h, y) with parameters (a, b)."""
  del train
  t_, h_ = common.broadcast_to(t, z), common.broadcast_to(h, z)
  y_ = common.broadcast_to(y.astype(z.dtype), z)
  return params["a"] * jnp.tanh(z) * (1 + t_) + params["b"] * h_ + 0.1 * y_


def _batch_and_draws(n=8, dim=3):
  rng = np.random.default_rng(0)
  t = rng.uniform(0.3, 1.0, n).astype(np.float32)
  r = np.where(np.arange(n) % 4 == 0, t, t * rng.uniform(0, 0.9, n))
  batch = {"x": rng.standard_normal((n, dim), np.float32),
           "y": (np.arange(n) % 3).astype(np.int32)}
  draws = {"t": t, "r": r.astype(np.float32),
           "e": rng.standard_normal((n, dim), np.float32),
           "dropped": np.arange(n) % 3 == 1}
  return batch, draws


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
def test_target_by_hand(alpha):
  """u_tgt at alpha = 1 is v_g; in between alpha v_g + (1 - alpha) u(z'),
  z' = z_t - alpha (t - r) v_g; at 0 it is MeanFlow's target. Guided."""
  settings = _config(guidance_omega=1.5, guidance_kappa=0.2,
                     alpha_schedule="constant", alpha_initial=alpha,
                     adaptive_p=0.0).objective
  params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.4)}
  batch, draws = _batch_and_draws()
  t, r = draws["t"], draws["r"]
  mf = meanflow.terms(_net, params, batch, draws, settings, 3)
  v_g, z, y = mf["v_g"], mf["z"], mf["y"]
  if alpha == 1.0:
    expect = v_g
  elif alpha == 0.0:
    expect = mf["u_target"]
  else:
    delta = alpha * (t - r)
    z_mid = z - delta[:, None] * v_g
    u_rest = _net(params, z_mid, t - delta, (1 - alpha) * (t - r), y, True)
    expect = np.where((r < t)[:, None], alpha * v_g + (1 - alpha) * u_rest,
                      v_g)
  context = objectives.Context(step=jnp.int32(0), num_steps=1000)
  value, metrics = alpha_flow.loss(_net, params, batch, draws, settings, 3,
                                   context)
  u = _net(params, z, t, t - r, y, True)
  sq_err = np.sum((np.asarray(u) - expect) ** 2, axis=-1)
  weight = np.where((r < t) & (alpha > 0), alpha, 1.0)
  np.testing.assert_allclose(value, np.mean(weight * sq_err), rtol=1e-5)
  np.testing.assert_allclose(metrics["mse"], np.mean(sq_err), rtol=1e-5)
  assert float(metrics["alpha"]) == pytest.approx(alpha)


def _mean_gradient(u_model, alpha, params, n=200_000):
  """The loss gradient, Monte Carlo over n Gaussian samples (1-D), r < t."""
  settings = _config(alpha_schedule="constant", alpha_initial=alpha,
                     adaptive_p=0.0, class_dropout=0.0).objective
  rng = np.random.default_rng(1)
  t = rng.uniform(0.2, 1.0, n).astype(np.float32)
  batch = {"x": (MU + S * rng.standard_normal((n, 1))).astype(np.float32),
           "y": np.zeros(n, np.int32)}
  draws = {"t": t, "r": (t * rng.uniform(0, 0.8, n)).astype(np.float32),
           "e": rng.standard_normal((n, 1)).astype(np.float32),
           "dropped": np.zeros(n, bool)}
  context = objectives.Context(step=jnp.int32(0), num_steps=1)
  loss = lambda p: alpha_flow.loss(u_model, p, batch, draws, settings, 0,
                                   context)[0]
  grads = jax.jit(jax.grad(loss))(params)
  return np.array([grads["a"], grads["b"]])


def _scaled(field):
  def u_model(params, z, t, h, y, train):
    return field(z, t, h) * (1 + params["a"]) + params["b"]
  return u_model


@pytest.mark.parametrize("alpha,field", [
    # The MeanFlow limit: the fixed point is the exact average velocity.
    (0.0, lambda z, t, h: exact_u(None, z, t, h, None, False)),
    # Trajectory flow matching: the instantaneous velocity, for every h.
    (1.0, lambda z, t, h: marginal_velocity(z, t)),
])
def test_expected_gradient_vanishes_at_the_fixed_point(alpha, field):
  u_model = _scaled(field)
  zero = {"a": jnp.float32(0.0), "b": jnp.float32(0.0)}
  off = {"a": jnp.float32(0.1), "b": jnp.float32(0.1)}
  at_fixed_point = _mean_gradient(u_model, alpha, zero)
  perturbed = _mean_gradient(u_model, alpha, off)
  assert np.linalg.norm(at_fixed_point) < 0.03 * np.linalg.norm(perturbed), (
      at_fixed_point, perturbed)
