"""Score SDEs: VP and sub-VP marginals against their moment equations, the
loss and its fixed point, and the three samplers on a Gaussian target with
the exact score; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from mf_jax import config_lib
from mf_jax import objectives
from mf_jax import samplers
from mf_jax import sde_samplers
from mf_jax import sharding
from mf_jax.data import toy2d
from mf_jax.evaluation import distances
from mf_jax.evaluation import evaluator as evaluator_lib
from mf_jax.objectives import score_sde

BETA_MIN, BETA_MAX = 0.1, 20.0


def _config(**objective):
  c = config_lib.base_config()
  c.objective.update({"name": "score_sde", **objective})
  return c


def _paper_g2(kind, t):
  """g(t)^2 as Song et al. define the processes (their eqs. 11 and 12)."""
  beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
  if kind == "vp":
    return beta
  return beta * (1 - np.exp(-2 * BETA_MIN * t - (BETA_MAX - BETA_MIN) * t**2))


@pytest.mark.parametrize("kind", ["vp", "subvp"])
def test_marginals_solve_the_moment_equations(kind):
  """For dx = -1/2 beta x dt + g dw from x_0 = x: the mean m solves
  m' = -1/2 beta m, m(0) = 1, and the variance v' = -beta v + g^2, v(0) =
  0 (integrated here with scipy); the closed forms must match them."""
  sde = score_sde.sde_of(_config(sde=kind).objective)
  times = np.array([1e-3, 0.05, 0.2, 0.5, 0.8, 1.0])

  def moments(t, mv):
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    return [-0.5 * beta * mv[0], -beta * mv[1] + _paper_g2(kind, t)]

  solution = integrate.solve_ivp(moments, (0, 1), [1.0, 0.0], t_eval=times,
                                 rtol=1e-10, atol=1e-12)
  mean, var = solution.y
  np.testing.assert_allclose(sde.mean_coeff(times), mean, rtol=1e-5)
  np.testing.assert_allclose(sde.std(times), np.sqrt(var), rtol=1e-4)
  np.testing.assert_allclose(np.square(sde.diffusion(times)),
                             _paper_g2(kind, times), rtol=1e-5)
  # Draws of the marginal (score_sde.perturb) have these moments.
  x0 = np.full((200_000, 1), 2.0, np.float32)
  e = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
  draw = score_sde.perturb(sde, x0, e, np.full((200_000,), 0.2, np.float32))
  assert float(jnp.mean(draw)) == pytest.approx(2 * mean[2], abs=0.005)
  assert float(jnp.std(draw)) == pytest.approx(np.sqrt(var[2]), rel=0.01)


def test_subvp_variance_is_below_vp():
  """Song et al.: sub-VP's variance is bounded by VP's at every t."""
  vp = score_sde.sde_of(_config(sde="vp").objective)
  subvp = score_sde.sde_of(_config(sde="subvp").objective)
  t = np.linspace(0.01, 1, 50)
  assert np.all(subvp.std(t) < vp.std(t))


# Gaussian data N(MU, S^2 I): the marginal at t is N(m MU, m^2 S^2 + s^2).
MU, S = np.array([1.5, -0.5], np.float32), 0.5


def _exact_eps(sde):
  """The noise prediction of the exact score, -s(t) score, as a u_fn."""
  def u_fn(params, x, t, h, y, train):
    del h, y, train
    m, s = sde.mean_coeff(t)[:, None], sde.std(t)[:, None]
    var = m**2 * S**2 + s**2
    return (1 + params) * s * (x - m * MU) / var
  return u_fn


def test_loss_by_hand_and_its_fixed_point():
  """||eps(x_t, t) - e||^2 at x_t = m x + s e; its expected gradient
  vanishes for the exact noise prediction, not for a scaled one."""
  settings = _config(sde="vp").objective
  sde = score_sde.sde_of(settings)
  n = 100_000
  rng = np.random.default_rng(0)
  batch = {"x": (MU + S * rng.standard_normal((n, 2))).astype(np.float32),
           "y": np.zeros(n, np.int32)}
  draws = {"t": rng.uniform(1e-5, 1, n).astype(np.float32),
           "e": rng.standard_normal((n, 2)).astype(np.float32),
           "dropped": np.zeros(n, bool)}
  u_fn = _exact_eps(sde)
  loss = jax.jit(lambda p: score_sde.loss(u_fn, p, batch, draws, settings,
                                          0)[0])
  t = draws["t"][:, None]
  m = np.exp(-0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN)
  x_t = m * batch["x"] + np.sqrt(1 - m**2) * draws["e"]
  eps = np.sqrt(1 - m**2) * (x_t - m * MU) / (m**2 * S**2 + 1 - m**2)
  expect = np.mean(np.sum((eps - draws["e"]) ** 2, axis=-1))
  np.testing.assert_allclose(loss(jnp.float32(0.0)), expect, rtol=1e-4)
  grad = jax.jit(jax.grad(loss))
  assert abs(float(grad(jnp.float32(0.0)))) < 0.03 * abs(
      float(grad(jnp.float32(0.2))))


@pytest.mark.parametrize("kind,spec", [
    ("vp", "em200"), ("vp", "pc100"), ("subvp", "pc100"), ("vp", "heun20")])
def test_samplers_recover_a_gaussian_from_its_exact_score(kind, spec):
  """The reverse SDE (Euler-Maruyama, predictor-corrector) and the
  probability-flow ODE (Heun; the adaptive solver in the evaluator's test
  below) from N(0, I) at t = 1, with the exact score of N(MU, S^2 I): the
  samples' mean and standard deviation are the data's."""
  sde = score_sde.sde_of(_config(sde=kind).objective)
  n = 10_000
  noise = np.random.default_rng(1).standard_normal((n, 2)).astype(np.float32)
  labels = jnp.zeros((n,), jnp.int32)
  run = jax.jit(lambda key: sde_samplers.sample(
      _exact_eps(sde), jnp.float32(0.0), noise, labels, spec, sde=sde,
      rng=key))
  x, stats = run(jax.random.key(2))
  np.testing.assert_allclose(np.mean(x, 0), MU, atol=0.02)
  np.testing.assert_allclose(np.std(x, 0), [S, S], rtol=0.03)
  assert int(stats["nfe"]) == {"em200": 200, "pc100": 200, "heun20": 41}[spec]
  if spec != "heun20":  # stochastic: the key matters
    other, _ = run(jax.random.key(3))
    assert not np.allclose(x, other)
    np.testing.assert_array_equal(x, run(jax.random.key(2))[0])


def test_corrector_improves_a_short_predictor():
  """With few steps, Langevin corrections bring a coarse Euler-Maruyama
  chain closer to the target's spread (Song et al.'s point for PC)."""
  sde = score_sde.sde_of(_config(sde="vp").objective)
  noise = np.random.default_rng(1).standard_normal((10_000, 2)).astype(
      np.float32)
  labels = jnp.zeros((10_000,), jnp.int32)

  def spread_error(spec):
    x, _ = jax.jit(lambda: sde_samplers.sample(
        _exact_eps(sde), jnp.float32(0.0), noise, labels, spec, sde=sde,
        rng=jax.random.key(2)))()
    return np.abs(np.std(x, 0) - S).max()

  assert spread_error("pc10") < spread_error("em10")


def test_bad_input_fails_in_one_line():
  with pytest.raises(ValueError, match="Unknown objective.sde 'vpp'") as err:
    objectives.validate(_config(sde="vpp"))
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="beta_min"):
    objectives.validate(_config(sde_beta_min=30.0))
  with pytest.raises(ValueError, match="sde_sample_eps"):
    objectives.validate(_config(sde_sample_eps=0.0))
  # The SDE samplers' schedules on another objective.
  with pytest.raises(ValueError, match="only objective.name=score_sde"):
    sde_samplers.check_schedules((1, "pc100"), None)
  with pytest.raises(ValueError, match="score SDE"):
    samplers.sample(None, None, None, None, "em10", "euler")
  objectives.validate(_config(sde="subvp"))
  sde_samplers.check_schedules((1, "pc100", "em10", "ode"),
                               score_sde.sde_of(_config().objective))


def _eight_gaussians_eps(sde):
  """The exact noise prediction for toy2d's '8gaussians' (std 0.2 around
  eight points on a circle of radius 2): a Gaussian mixture at every t."""
  angles = np.arange(8) * np.pi / 4
  centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)

  def u_fn(params, x, t, h, y, train):
    del params, h, y, train
    m, s = sde.mean_coeff(t)[:, None], sde.std(t)[:, None]
    var = m**2 * 0.04 + s**2
    diff = x[:, None, :] - m[:, None] * centres[None]  # (B, 8, 2)
    resp = jax.nn.softmax(-jnp.sum(diff**2, -1) / (2 * var), axis=-1)
    return s * jnp.sum(resp[..., None] * diff, 1) / var
  return u_fn


def test_evaluator_reports_the_sde_samplers_on_a_mixture():
  """A score_sde run's evaluation through the Evaluator on 8 devices: the
  predictor-corrector and probability-flow samples of the exact score of
  '8gaussians' match its data (energy distance near 0, far below the
  prior's), under keys that name each sampler (Euler-Maruyama is the
  predictor-corrector's predictor)."""
  c = _config(sde="vp")
  c.data.name = "8gaussians"
  c.model.num_classes = 0
  c.eval.update(nfe=("pc50", "ode"), num_samples=1000, batch_size=1000)
  sde = score_sde.sde_of(c.objective)
  evaluator = evaluator_lib.Evaluator(c, _eight_gaussians_eps(sde),
                                      sharding.make_mesh(c.mesh), (2,))
  results = evaluator(None, jax.random.key(0))
  assert set(results) == {"pc50/energy_distance", "ode/energy_distance",
                          "ode/nfe_used"}
  prior = np.random.default_rng(0).standard_normal((1000, 2))
  prior_distance = distances.energy_distance(
      prior, toy2d.sample("8gaussians", 1000, np.random.default_rng(1)))
  for name in ("pc50", "ode"):
    assert results[f"{name}/energy_distance"] < 0.03 * prior_distance, (
        results, prior_distance)
  assert (results["ode/nfe_used"] - 2) % samplers.DOPRI5_NFE_PER_STEP == 0
