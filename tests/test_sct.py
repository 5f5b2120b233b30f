"""sCT: the TrigFlow conversion, the tangent against finite differences, the
fixed point on Gaussian data, the learned weight's head, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import models
from mf_jax import objectives
from mf_jax.objectives import consistency
from mf_jax.objectives import sct
from tests.gaussian_flow import exact_u, MU, S


def _config(**objective):
  c = config_lib.base_config()
  c.model.update(name="mlp", in_channels=3, hidden_size=32, depth=2,
                 num_classes=0, adaptive_weight_dim=16)
  c.objective.update({"name": "sct", "sct_warmup_steps": 100, **objective})
  c.training.num_steps = 1000
  return c


def _mlp_u_fn(dim=16):
  model = models.MLP(hidden_size=32, depth=2, adaptive_weight_dim=dim)

  def u_fn(params, z, t, h, y, train, **extras):
    return model.apply({"params": params}, z, t, h, y, train=train, **extras)
  return model, u_fn


def _params(model, batch, seed=1, dtype=np.float32):
  """Random parameters of the model's shapes (numpy: an init would compile
  a random-number kernel per leaf, tens of seconds on two cores), so u and
  w(t) are non-trivial functions of (z, t)."""
  shapes = models.abstract_params(model, batch["x"].shape[1:])
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: (0.3 * rng.standard_normal(a.shape)).astype(dtype), shapes)


def _batch(n, dim, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  batch = {"x": rng.standard_normal((n, dim)).astype(dtype),
           "y": np.zeros(n, np.int32)}
  draws = {"t": rng.uniform(0.05, 0.95, n).astype(dtype),
           "e": rng.standard_normal((n, dim)).astype(dtype),
           "dropped": np.zeros(n, bool)}
  return batch, draws


def test_trigflow_conversion_is_the_consistency_function():
  """cos s x_s - sigma_d sin s F(x_s, s) is z_t - t u(z_t, t, h = t) at the
  same (x, e), and the angle <-> time maps invert each other."""
  model, u_fn = _mlp_u_fn()
  batch, draws = _batch(16, 3)
  params = _params(model, batch)
  sigma_d = 0.5
  t = jnp.asarray(draws["t"])
  s = sct.t_to_angle(t, sigma_d)
  np.testing.assert_allclose(sct.angle_to_t(s, sigma_d), t, rtol=1e-6)
  # EDM's noise-to-signal ratio of both states: sigma_d tan s = t / (1 - t).
  np.testing.assert_allclose(sigma_d * np.tan(s), t / (1 - t), rtol=1e-5)
  x, e = batch["x"], draws["e"]
  cos, sin = np.cos(s)[:, None], np.sin(s)[:, None]
  x_s = cos * x + sin * sigma_d * e
  z_t = (1 - t[:, None]) * x + t[:, None] * e

  @jax.jit
  def both_forms():
    f_out, _ = sct.trigflow_output(u_fn, params, x_s, s, batch["y"],
                                   sigma_d, {})
    return cos * x_s - sigma_d * sin * f_out, consistency.consistency_fn(
        u_fn, params, z_t, t, batch["y"], True)
  trigflow, expect = both_forms()
  np.testing.assert_allclose(trigflow, expect, rtol=1e-5, atol=1e-5)


def test_tangent_is_the_derivative_of_f_along_the_path():
  """g before normalisation, after the warm-up, is cos s df/ds: compared
  with a central difference of f(z_t(s), t(s)) = z_t - t u(z_t, t, t) along
  the path of one (x, e), on a small MLP, in float64."""
  with jax.enable_x64(True):
    model, u_fn = _mlp_u_fn()
    batch, draws = _batch(8, 3, np.float64)
    params = _params(model, batch, dtype=np.float64)
    settings = _config(sct_warmup_steps=10).objective
    terms = jax.jit(lambda step: sct.terms(u_fn, params, batch, draws,
                                           settings, 0, step))
    out = terms(10)
    g_raw = out["g"] * (out["g_norm"] + settings.sct_tangent_c)[:, None]

    sigma_d, x, e = settings.sct_sigma_d, batch["x"], draws["e"]

    @jax.jit
    def f_at(s):
      t = sct.angle_to_t(s, sigma_d)
      z_t = (1 - t[:, None]) * x + t[:, None] * e
      return consistency.consistency_fn(u_fn, params, z_t, t, batch["y"],
                                        True)

    s, eps = out["s"], 1e-5
    dfds = (f_at(s + eps) - f_at(s - eps)) / (2 * eps)
    np.testing.assert_allclose(g_raw, np.cos(s)[:, None] * dfds,
                               rtol=1e-6, atol=1e-8)
    # Half-way through the warm-up only the derivative terms are halved.
    half = terms(5)
    fm = -np.cos(s)[:, None] ** 2 * (sigma_d * out["F"] - (
        np.cos(s)[:, None] * sigma_d * e - np.sin(s)[:, None] * x))
    np.testing.assert_allclose(
        half["g"] * (half["g_norm"] + settings.sct_tangent_c)[:, None],
        fm + 0.5 * (g_raw - fm), rtol=1e-9, atol=1e-12)
    assert float(sct.warmup(5, 10)) == 0.5


def test_tangent_normalisation_and_loss_by_hand():
  """g / (||g|| + c), and e^{-w}/D ||F - sg(F) - g||^2 + w = e^{-w}/D
  ||g||^2 + w in value, with w from the model's head."""
  model, u_fn = _mlp_u_fn()
  batch, draws = _batch(8, 3)
  params = _params(model, batch, seed=2)
  settings = _config().objective
  context = objectives.Context(step=jnp.int32(1000), num_steps=1000)
  out, w, (value, metrics) = jax.jit(lambda: (
      sct.terms(u_fn, params, batch, draws, settings, 0, step=1000),
      model.apply({"params": params}, batch["x"], draws["t"], draws["t"],
                  batch["y"], with_logvar=True)[1],
      sct.loss(u_fn, params, batch, draws, settings, 0, context)))()
  norms = np.linalg.norm(out["g"], axis=-1)
  np.testing.assert_allclose(norms, out["g_norm"] / (out["g_norm"] + 0.1),
                             rtol=1e-5)
  np.testing.assert_allclose(out["logvar"], w, rtol=1e-5, atol=1e-7)
  expect = np.mean(np.exp(-w) / 3 * norms**2 + w)
  np.testing.assert_allclose(value, expect, rtol=1e-5)
  assert float(metrics["warmup"]) == 1.0


def _gaussian_model(field):
  """(1 + a) field + b, and w(t) = c t: a stand-in network with a head."""
  def u_fn(params, z, t, h, y, train, with_logvar=False):
    u = field(z, t, h) * (1 + params["a"]) + params["b"]
    return (u, params["c"] * t) if with_logvar else u
  return u_fn


def _antithetic_gaussian_batch(n):
  """n pairs (x, e), (x', e') of Gaussian data and noise with the same z_t:
  the second is the first reflected through E[(x, e) | z_t]. Both are drawn
  from the joint law, so the pairs are an unbiased Monte Carlo sample, and
  whatever is odd in the deviation from E[. | z_t] cancels pair by pair."""
  rng = np.random.default_rng(1)
  t = np.clip(1 / (1 + np.exp(1.0 - 1.4 * rng.standard_normal(n))),
              1e-3, 1 - 1e-3)
  x = MU + S * rng.standard_normal(n)
  e = rng.standard_normal(n)
  z = (1 - t) * x + t * e
  var_z = (1 - t) ** 2 * S**2 + t**2
  x_mean = MU + (1 - t) * S**2 / var_z * (z - (1 - t) * MU)
  e_mean = t / var_z * (z - (1 - t) * MU)
  x, e, t = (np.concatenate([a, b]) for a, b in
             ((x, 2 * x_mean - x), (e, 2 * e_mean - e), (t, t)))
  batch = {"x": x[:, None].astype(np.float32), "y": np.zeros(2 * n, np.int32)}
  draws = {"t": t.astype(np.float32), "e": e[:, None].astype(np.float32),
           "dropped": np.zeros(2 * n, bool)}
  return batch, draws


def _mean_gradient(u_fn, params, step, n=50_000):
  """The loss gradient w.r.t. (a, b), Monte Carlo over 2n Gaussian samples
  (antithetic pairs) at the paper's time distribution."""
  settings = _config(sct_warmup_steps=100).objective
  batch, draws = _antithetic_gaussian_batch(n)
  context = objectives.Context(step=jnp.int32(step), num_steps=1000)
  loss = lambda p: sct.loss(u_fn, p, batch, draws, settings, 0, context)[0]
  grads = jax.jit(jax.grad(loss))(params)
  return np.array([grads["a"], grads["b"]])


def test_expected_gradient_vanishes_for_the_exact_flow_map():
  """Gaussian data, the exact flow map to data as the network (h = t): the
  expected sCT gradient vanishes after the warm-up (given z_t the tangent
  is affine in the Gaussian (x, e), with mean 0 there, and its
  normalisation is odd), not for a perturbed network, and not during the
  warm-up, whose fixed point is the diffusion loss's."""
  u_fn = _gaussian_model(lambda z, t, h: exact_u(None, z, t, h, None, False))
  zero = {"a": jnp.float32(0.0), "b": jnp.float32(0.0),
          "c": jnp.float32(0.3)}
  off = dict(zero, a=jnp.float32(0.1), b=jnp.float32(0.1))
  at_fixed_point = _mean_gradient(u_fn, zero, step=100)
  perturbed = _mean_gradient(u_fn, off, step=100)
  warming_up = _mean_gradient(u_fn, zero, step=0)
  assert np.linalg.norm(at_fixed_point) < 0.01 * np.linalg.norm(perturbed), (
      at_fixed_point, perturbed)
  assert np.linalg.norm(at_fixed_point) < 0.01 * np.linalg.norm(warming_up), (
      at_fixed_point, warming_up)


@pytest.mark.parametrize("name", ["mlp", "dit"])
def test_weight_head_lives_in_params_and_only_when_asked(name):
  """adaptive_weight_dim = 0 builds exactly the old tree; > 0 adds the head
  under 'adaptive_weight' only, u unchanged, w(t) = 0 at init."""
  base = config_lib.base_config().model
  if name == "mlp":
    base.update(name="mlp", in_channels=2, hidden_size=32, depth=2,
                num_classes=0)
    shape = (2,)
  else:
    base.update(variant="", input_size=8, in_channels=1, patch_size=4,
                hidden_size=16, depth=1, num_heads=2, num_classes=10)
    shape = (8, 8, 1)
  plain = models.build_model(base)
  head_config = base.copy_and_resolve_references()
  head_config.adaptive_weight_dim = 16
  with_head = models.build_model(head_config)
  p_plain = models.abstract_params(plain, shape)
  p_head = models.abstract_params(with_head, shape)
  assert set(p_head) - set(p_plain) == {"adaptive_weight"}
  assert (models.param_count(p_head) - models.param_count(p_plain)
          == 16 * 16 + 16 + 16 + 1)
  z = np.random.default_rng(1).standard_normal((4, *shape), np.float32)
  t = jnp.linspace(0.1, 0.9, 4)
  y = jnp.zeros((4,), jnp.int32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), p_head)
  head_free = {k: v for k, v in params.items() if k != "adaptive_weight"}
  (u, w), u_alone, u_plain = jax.jit(lambda: (
      with_head.apply({"params": params}, z, t, t, y, with_logvar=True),
      with_head.apply({"params": params}, z, t, t, y),
      plain.apply({"params": head_free}, z, t, t, y)))()
  np.testing.assert_array_equal(u, u_alone)
  np.testing.assert_array_equal(u, u_plain)
  assert w.shape == (4,)
  with pytest.raises(ValueError, match="adaptive_weight_dim"):
    jax.eval_shape(lambda: plain.apply({"params": head_free}, z, t, t, y,
                                       with_logvar=True))


def test_bad_settings_fail_in_one_line():
  c = _config()
  c.model.adaptive_weight_dim = 0
  with pytest.raises(ValueError, match="adaptive_weight_dim") as err:
    objectives.validate(c)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="warm-up never finishes"):
    objectives.validate(_config(sct_warmup_steps=1000))
  with pytest.raises(ValueError, match="sct_sigma_d"):
    objectives.validate(_config(sct_sigma_d=0.0))
  objectives.validate(_config())


def test_draw_is_the_papers_lognormal_sigma():
  """sigma = t / (1 - t) of the drawn times is lognormal(P_mean, P_std)."""
  settings = _config().objective
  batch = {"x": jnp.zeros((20_000, 2)), "y": jnp.zeros((20_000,), jnp.int32)}
  draws = sct.draw(jax.random.key(3), batch, settings, 0)
  log_sigma = np.log(draws["t"] / (1 - draws["t"]))
  assert abs(log_sigma.mean() - settings.sct_p_mean) < 0.05
  assert abs(log_sigma.std() - settings.sct_p_std) < 0.05
