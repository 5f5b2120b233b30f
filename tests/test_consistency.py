"""Consistency models (CT, iCT, ECT): the Karras grid and the curricula by
hand, the lognormal index distribution against its closed form,
pseudo-Huber, the boundary condition, each loss against a hand computation
on a tiny network, the multistep sampler on Gaussian data, and the one-line
errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from configs import toy2d
from mf_jax import config_lib
from mf_jax import export
from mf_jax import models
from mf_jax import objectives
from mf_jax import samplers
from mf_jax.objectives import consistency
from mf_jax.objectives import ct
from mf_jax.objectives import ect
from mf_jax.objectives import ict
from mf_jax.training import init_from
from mf_jax.training import state as state_lib
from tests.gaussian_flow import exact_u, MU, S

GRID = (0.002, 80.0, 7.0)  # sigma_min, sigma_max, rho


def test_karras_grid_by_hand():
  # N = 3: the middle point is the mean of the ends' 7th roots, to the 7th.
  mid = ((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
  np.testing.assert_allclose(consistency.karras_sigmas(3, *GRID),
                             [0.002, mid, 80.0], rtol=1e-5)
  assert mid == pytest.approx(2.5152, abs=1e-3)  # 1.14090^7
  sigmas = np.asarray(consistency.karras_sigmas(18, *GRID))
  assert np.all(np.diff(sigmas) > 0)
  # rho = 1 is a uniform grid.
  np.testing.assert_allclose(consistency.karras_sigmas(5, 0.0, 4.0, 1.0),
                             [0, 1, 2, 3, 4], atol=1e-6)


def test_sigma_and_time_convert_both_ways():
  sigma = np.array([0.002, 0.5, 1.0, 80.0])
  t = np.asarray(consistency.sigma_to_t(sigma))
  np.testing.assert_allclose(t, [0.002 / 1.002, 1 / 3, 0.5, 80 / 81])
  np.testing.assert_allclose(consistency.t_to_sigma(t), sigma, rtol=1e-6)


@pytest.mark.parametrize("k, intervals", [
    # n = max(ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1), 1), s0 2, s1 150,
    # K 1000: k = 0: sqrt(4) - 1 = 1; k = 10: sqrt(0.01 * 22797 + 4) - 1 =
    # 14.23 -> 15; k = 500: sqrt(11402.5) - 1 = 105.78 -> 106; K: 150.
    (0, 1), (10, 15), (500, 106), (1000, 150)])
def test_ct_curricula_by_hand(k, intervals):
  n = int(consistency.ct_num_scales(k, 1000, 2, 150))
  assert n == intervals + 1
  mu = float(consistency.ct_target_decay(k, 1000, 2, 150, 0.9))
  assert mu == pytest.approx(0.9 ** (2 / intervals), rel=1e-6)


@pytest.mark.parametrize("k, points", [
    # K' = floor(800 / (log2 128 + 1)) = 100: 10, 20, 40, ..., 1280.
    (0, 11), (99, 11), (100, 21), (250, 41), (699, 641), (700, 1281),
    (799, 1281), (5000, 1281)])
def test_ict_doubling_by_hand(k, points):
  assert int(consistency.ict_num_scales(k, 800, 10, 1280)) == points


def test_ict_doubling_with_a_ratio_off_powers_of_two():
  # s1 / s0 = 100 / 3 -> floor 33, log2 33 = 5.04: K' = floor(1000 / 6.04)
  # = 165; capped at s1 = 100 (not 3 * 64 = 192).
  assert int(consistency.ict_num_scales(164, 1000, 3, 100)) == 4
  assert int(consistency.ict_num_scales(165, 1000, 3, 100)) == 7
  assert int(consistency.ict_num_scales(999, 1000, 3, 100)) == 101


@pytest.mark.parametrize("n", [2, 11, 41])
def test_lognormal_index_distribution_is_the_closed_form(n):
  probs = np.asarray(consistency.lognormal_index_probs(
      n, 64, *GRID, p_mean=-1.1, p_std=2.0), np.float64)
  assert probs.sum() == pytest.approx(1.0, abs=1e-6)
  assert np.all(probs[n - 1:] == 0)
  # The lognormal mass between adjacent levels, from scipy's normal cdf.
  sigmas = np.asarray(consistency.karras_sigmas(n, *GRID), np.float64)
  cdf = stats.norm.cdf(np.log(sigmas), loc=-1.1, scale=2.0)
  expected = np.diff(cdf) / (cdf[-1] - cdf[0])
  np.testing.assert_allclose(probs[:n - 1], expected, rtol=1e-4, atol=1e-7)


def test_lognormal_indices_follow_their_probabilities():
  n = 11
  indices = consistency.sample_lognormal_index(
      jax.random.key(0), (200_000,), n, 20, *GRID, -1.1, 2.0)
  counts = np.bincount(np.asarray(indices), minlength=20) / 200_000
  probs = np.asarray(consistency.lognormal_index_probs(n, 20, *GRID, -1.1,
                                                       2.0))
  np.testing.assert_allclose(counts, probs, atol=3e-3)
  assert counts[n - 1:].sum() == 0


def test_pseudo_huber():
  a = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  b = jnp.zeros_like(a)
  np.testing.assert_allclose(consistency.pseudo_huber(a, b, 0.0), [5, 0])
  c = 0.5
  np.testing.assert_allclose(consistency.pseudo_huber(a, b, c),
                             [math.sqrt(25.25) - 0.5, 0.0], rtol=1e-6)
  # Quadratic near 0 (||d||^2 / 2c), linear far away (||d|| - c).
  small = consistency.pseudo_huber(jnp.array([[1e-3, 0]]), b[:1], 1.0)
  assert float(small[0]) == pytest.approx(0.5e-6, rel=1e-3)
  # iCT's c: 0.00054 sqrt(D); CIFAR-10's D = 3072 gives 0.0299.
  assert consistency.huber_c(-1.0, (8, 32, 32, 3)) == pytest.approx(
      0.00054 * math.sqrt(3072))
  assert consistency.huber_c(0.1, (8, 2)) == 0.1


def test_boundary_condition():
  def net(params, z, t, h, y, train):
    del y, train
    return params * jnp.sin(z) + t[:, None] + 3 * h[:, None]

  z = jax.random.normal(jax.random.key(1), (4, 3))
  zero = jnp.zeros((4,))
  np.testing.assert_array_equal(
      consistency.consistency_fn(net, 2.0, z, zero, None, True), z)
  t = jnp.full((4,), 0.5)
  np.testing.assert_allclose(
      consistency.consistency_fn(net, 2.0, z, t, None, True),
      z - 0.5 * (2 * jnp.sin(z) + 0.5 + 1.5), rtol=1e-6)


def test_curriculum_with_s1_below_s0_is_one_line():
  with pytest.raises(ValueError, match="ct_s0=10 and ct_s1=5") as info:
    consistency.validate_curriculum("ct", 10, 5)
  assert "\n" not in str(info.value)


def _gaussian_noise(n=20_000, dim=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, dim))


@pytest.mark.parametrize("schedule", [1, 2, "1,0.45,0", "1,0.8,0.3,0.05,0"])
def test_consistency_sampler_with_the_exact_flow_map_lands_on_the_data(
    schedule):
  # exact_u(z, t, h = t) is the true average velocity to r = 0, so f is the
  # exact consistency function; re-noising its output (a data sample) with
  # fresh noise gives the exact marginal, so every schedule ends on
  # N(MU, S^2).
  noise = _gaussian_noise()
  labels = jnp.zeros((noise.shape[0],), jnp.int32)
  x, stats = samplers.sample(exact_u, None, noise, labels, schedule,
                             "consistency", rng=jax.random.key(7))
  x = np.asarray(x)
  np.testing.assert_allclose(x.mean(0), [MU, MU], atol=0.02)
  np.testing.assert_allclose(x.std(0), [S, S], atol=0.01)
  assert int(stats["nfe"]) == samplers.fixed_nfe(schedule)


def test_consistency_sampler_one_step_is_the_flow_map_and_renoises_after():
  noise = _gaussian_noise(64)
  labels = jnp.zeros((64,), jnp.int32)
  one = samplers.consistency_sample(exact_u, None, noise, labels,
                                    samplers.timesteps(1))
  np.testing.assert_allclose(
      one, samplers.flow_map_sample(exact_u, None, noise, labels,
                                    samplers.timesteps(1)), rtol=1e-6)
  # With re-noising, the same key gives the same samples, another key
  # other samples: the fresh noise comes from rng, not from `noise`.
  times = samplers.timesteps("1,0.45,0")
  run = lambda seed: np.asarray(samplers.consistency_sample(
      exact_u, None, noise, labels, times, rng=jax.random.key(seed)))
  np.testing.assert_array_equal(run(1), run(1))
  assert np.abs(run(1) - run(2)).mean() > 0.1
  with pytest.raises(ValueError, match="needs an rng key"):
    samplers.consistency_sample(exact_u, None, noise, labels, times)


@pytest.mark.parametrize("spec", ["1,0.45,0.6,0", "1,0.45,0.45,0",
                                  "0.9,0.5,0", "1,0.5"])
def test_consistency_schedule_that_does_not_descend_is_one_line(spec):
  with pytest.raises(ValueError, match="descend from 1 to 0") as info:
    samplers.timesteps(spec)
  assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# The objectives' losses against hand computations on a tiny network.


def _net(params, z, t, h, y, train):
  """A small nonlinear field of (z, t, h, y) with parameters (a, b)."""
  del train
  t_, h_ = t[:, None], h[:, None]
  return (params["a"] * jnp.tanh(z) * (1 + t_) + params["b"] * h_
          + 0.1 * y[:, None].astype(z.dtype))


def _f_by_hand(params, x, e, sigma, y):
  """f(z_t, t) in numpy: t = sigma / (1 + sigma), z_t = (1 - t) x + t e."""
  t = (sigma / (1 + sigma))[:, None]
  z = (1 - t) * x + t * e
  u = params["a"] * np.tanh(z) * (1 + t) + params["b"] * t + 0.1 * y[:, None]
  return z - t * u


def _config(name, **objective):
  c = config_lib.base_config()
  c.objective.update(name=name, class_dropout=0.0, **objective)
  c.training.num_steps = 1000
  return c


def _batch_and_draws(n=6, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  sigma_next = np.exp(rng.uniform(-3, 2, n)).astype(np.float32)
  sigma = (sigma_next * rng.uniform(1.1, 3.0, n)).astype(np.float32)
  batch = {"x": rng.standard_normal((n, dim)).astype(np.float32),
           "y": rng.integers(0, 3, n).astype(np.int32)}
  draws = {"sigma": sigma, "sigma_next": sigma_next,
           "e": rng.standard_normal((n, dim)).astype(np.float32),
           "dropped": np.zeros(n, bool), "dropout": jax.random.key(0)}
  return batch, draws


ONLINE = {"a": np.float32(0.7), "b": np.float32(-0.3)}
TARGET = {"a": np.float32(0.5), "b": np.float32(0.2)}


def _context(step=0, target=None):
  return objectives.Context(step=jnp.int32(step), target_params=target or {},
                            num_steps=1000)


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
def test_ct_loss_by_hand_and_its_gradient_skips_the_target(metric):
  cfg = _config("ct", ct_metric=metric, ct_huber_c=0.3).objective
  batch, draws = _batch_and_draws()
  x, e, y = batch["x"], draws["e"], batch["y"]
  student = _f_by_hand(ONLINE, x, e, draws["sigma"], y)
  target = _f_by_hand(TARGET, x, e, draws["sigma_next"], y)
  sq = np.sum((student - target) ** 2, axis=1)
  want = sq if metric == "l2" else np.sqrt(sq + 0.09) - 0.3
  value, metrics = ct.loss(_net, ONLINE, batch, draws, cfg, 3,
                           _context(target=TARGET))
  assert float(value) == pytest.approx(want.mean(), rel=1e-5)
  assert float(metrics["mse"]) == pytest.approx(sq.mean(), rel=1e-5)

  # The gradient reaches the online parameters through the student only:
  # the same loss with the target as a constant array.
  def by_hand(params):
    t = jnp.asarray(draws["sigma"] / (1 + draws["sigma"]))
    z = (1 - t[:, None]) * x + t[:, None] * e
    f = z - t[:, None] * _net(params, z, t, t, jnp.asarray(y), True)
    sq = jnp.sum((f - target) ** 2, axis=1)
    return jnp.mean(sq if metric == "l2" else jnp.sqrt(sq + 0.09) - 0.3)

  grad = jax.grad(lambda p: ct.loss(_net, p, batch, draws, cfg, 3,
                                    _context(target=TARGET))[0])(ONLINE)
  want_grad = jax.grad(by_hand)(ONLINE)
  for key in ("a", "b"):
    assert float(grad[key]) == pytest.approx(float(want_grad[key]), rel=1e-4)


def test_ict_loss_by_hand_with_the_online_network_as_target():
  cfg = _config("ict", ict_huber_c=-1.0).objective
  batch, draws = _batch_and_draws()
  x, e, y = batch["x"], draws["e"], batch["y"]
  student = _f_by_hand(ONLINE, x, e, draws["sigma"], y)
  target = _f_by_hand(ONLINE, x, e, draws["sigma_next"], y)
  c = 0.00054 * math.sqrt(3)
  distance = np.sqrt(np.sum((student - target) ** 2, axis=1) + c**2) - c
  weight = 1 / (draws["sigma"] - draws["sigma_next"])
  value, _ = ict.loss(_net, ONLINE, batch, draws, cfg, 3, _context())
  assert float(value) == pytest.approx(np.mean(weight * distance), rel=1e-4)
  # sg(theta): the gradient is the student's alone.
  def by_hand(params):
    t = jnp.asarray(draws["sigma"] / (1 + draws["sigma"]))
    z = (1 - t[:, None]) * x + t[:, None] * e
    f = z - t[:, None] * _net(params, z, t, t, jnp.asarray(y), True)
    sq = jnp.sum((f - target) ** 2, axis=1)
    return jnp.mean(weight * (jnp.sqrt(sq + c**2) - c))
  grad = jax.grad(lambda p: ict.loss(_net, p, batch, draws, cfg, 3,
                                     _context())[0])(ONLINE)
  want_grad = jax.grad(by_hand)(ONLINE)
  for key in ("a", "b"):
    assert float(grad[key]) == pytest.approx(float(want_grad[key]), rel=1e-4)


def test_ect_mapping_and_loss_by_hand():
  cfg = _config("ect", ect_huber_c=0.0).objective
  # r = t (1 - 2^-(stage+1) (1 + 8 sigmoid(-t))), clamped at 0.
  sigma = np.array([0.05, 2.0, 10.0, 50.0], np.float32)
  for stage in (0, 1, 3):
    adj = 1 + 8 / (1 + np.exp(sigma))
    want = np.maximum(sigma * (1 - adj / 2 ** (stage + 1)), 0)
    np.testing.assert_allclose(ect.r_of(sigma, stage, cfg), want, rtol=1e-5,
                               atol=1e-7)
  # Stage 0 at t = 2: sigmoid(-2) = 0.11920, r = 2 (1 - 1.95362 / 2).
  assert float(ect.r_of(2.0, 0, cfg)) == pytest.approx(0.046377, abs=1e-5)
  assert float(ect.r_of(0.05, 0, cfg)) == 0.0
  assert int(ect.stage_at(374, cfg, 1000)) == 2  # 1000 // 8 = 125 a stage

  batch, draws = _batch_and_draws()
  draws["sigma_next"][:2] = 0.0  # r = 0: the target is the data itself
  x, e, y = batch["x"], draws["e"], batch["y"]
  student = _f_by_hand(ONLINE, x, e, draws["sigma"], y)
  target = _f_by_hand(ONLINE, x, e, draws["sigma_next"], y)
  np.testing.assert_allclose(target[:2], x[:2], rtol=1e-6)
  norm = np.sqrt(np.sum((student - target) ** 2, axis=1))  # c = 0
  want = np.mean(norm / (draws["sigma"] - draws["sigma_next"]))
  value, _ = ect.loss(_net, ONLINE, batch, draws, cfg, 3, _context())
  assert float(value) == pytest.approx(want, rel=1e-4)


def test_ct_draws_adjacent_levels_of_the_step_grid():
  cfg = _config("ct").objective
  batch = {"x": jnp.zeros((4096, 2)), "y": jnp.zeros((4096,), jnp.int32)}
  for step, n in ((0, 2), (10, 16)):  # the hand values of the test above
    draws = jax.jit(lambda rng, k: ct.draw(rng, batch, cfg, 0, _context(k)))(
        jax.random.key(step), step)
    grid = np.asarray(consistency.karras_sigmas(n, *GRID))
    hi = np.searchsorted(grid, np.asarray(draws["sigma"]) * (1 - 1e-5))
    np.testing.assert_allclose(draws["sigma"], grid[hi], rtol=1e-5)
    np.testing.assert_allclose(draws["sigma_next"], grid[hi - 1], rtol=1e-5)
    # Uniform over the n - 1 pairs.
    counts = np.bincount(hi - 1, minlength=n - 1) / 4096
    np.testing.assert_allclose(counts, 1 / (n - 1), atol=0.03)


def test_ict_draws_follow_the_lognormal_index_distribution():
  cfg = _config("ict").objective
  batch = {"x": jnp.zeros((20_000, 2)), "y": jnp.zeros((20_000,), jnp.int32)}
  draws = jax.jit(lambda rng: ict.draw(rng, batch, cfg, 0, _context(150)))(
      jax.random.key(3))
  n = 21  # K' = 125: step 150 is the second stage, 20 intervals
  grid = np.asarray(consistency.karras_sigmas(n, *GRID))
  lo = np.searchsorted(grid, np.asarray(draws["sigma_next"]) * (1 - 1e-5))
  np.testing.assert_allclose(draws["sigma"], grid[lo + 1], rtol=1e-5)
  probs = consistency.lognormal_index_probs(n, 20, *GRID, -1.1, 2.0)
  np.testing.assert_allclose(np.bincount(lo, minlength=20) / 20_000, probs,
                             atol=0.01)


def test_ct_target_follows_mu_of_k_and_ict_keeps_none():
  c = _config("ct")
  assert objectives.has_target(c)
  assert not objectives.has_target(_config("ict"))
  assert not objectives.has_target(_config("ect"))
  update = objectives.make_target_update(c)
  old, new = {"w": jnp.float32(1.0)}, {"w": jnp.float32(0.0)}
  for step, intervals in ((0, 1), (500, 106)):
    mu = 0.9 ** (2 / intervals)
    got = update(old, new, jnp.int32(step))["w"]
    assert float(got) == pytest.approx(mu, rel=1e-5)


@pytest.mark.parametrize("name, change, message", [
    ("ct", dict(ct_s0=10, ct_s1=5), "ct_s0=10 and ct_s1=5"),
    ("ict", dict(ict_s0=20, ict_s1=10), "ict_s0=20 and ict_s1=10"),
    ("ct", dict(ct_mu0=1.0), "ct_mu0"),
    ("ct", dict(ct_metric="lpips"), "ct_metric"),
    ("ict", dict(ict_sigma_min=0.0), "ict_sigma_min"),
    ("ect", dict(ect_stages=0), "ect_stages"),
    ("ect", dict(ect_q=1.0), "ect_q"),
])
def test_bad_settings_are_one_line_errors(name, change, message):
  with pytest.raises(ValueError, match=message) as info:
    objectives.validate(_config(name, **change))
  assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# objective.init_from: a fresh run starts from an export's weights.


def _toy_state(objective, hidden=32, init_from=""):
  """A toy2d config with a small MLP and a fresh train state for it."""
  c = toy2d.get_config(f"objective={objective}")
  c.model.update(hidden_size=hidden, depth=2)
  c.objective.init_from = init_from
  state = state_lib.init_state(
      jax.random.key(0), models.build_model(c.model), optax.adam(1e-3),
      state_lib.model_input_shape(c.model), c.training.ema_decays,
      with_target=objectives.has_target(c))
  return c, state


def test_init_from_an_export_sets_params_ema_and_target(tmp_path):
  c, fresh = _toy_state("ct")
  donor = jax.tree.map(lambda p: np.asarray(p) + 0.5, fresh.params)
  path = str(tmp_path / "fm.safetensors")
  export.save(path, donor, c.model, source="test")
  c.objective.init_from = path
  state = init_from.initial_state(fresh, c)
  for tree in (state.params, *state.ema_params.values(), state.target_params):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(donor)):
      np.testing.assert_array_equal(got, want)
  # Without init_from the state is left as it is.
  c.objective.init_from = ""
  assert init_from.initial_state(fresh, c) is fresh


def test_init_from_an_export_of_another_model_is_one_line(tmp_path):
  c_small, small = _toy_state("ect", hidden=16)
  path = str(tmp_path / "small.safetensors")
  export.save(path, small.params, c_small.model)
  c, state = _toy_state("ect", hidden=32, init_from=path)
  with pytest.raises(ValueError, match="does not fit this run's model") as e:
    init_from.initial_state(state, c)
  assert "\n" not in str(e.value)


def _gaussian_family(params, z, t, h, y, train):
  """u = a(t) z + b(t), a and b quartic in t: the exact consistency
  function of Gaussian data (f = MU + S xi, linear in z) is close to it."""
  del h, y, train
  powers = jnp.stack([t**k for k in range(5)], axis=-1)
  return (powers @ params["a"])[:, None] * z + (powers @ params["b"])[:, None]


@pytest.mark.parametrize("name", ["ict", "ect"])
def test_training_on_gaussian_data_reaches_its_mean_and_std(name):
  # From f(z, t) = z (u = 0: 1-NFE samples N(0, 1)) towards N(MU, S^2).
  c = _config(name)
  c.training.num_steps = 1000
  c.model.num_classes = 0
  loss_fn = objectives.make_loss_fn(c, _gaussian_family)
  tx = optax.adam(1e-2)

  @jax.jit
  def train():
    def step(k, carry):
      params, opt = carry
      rng = jax.random.key(k)
      x = MU + S * jax.random.normal(jax.random.fold_in(rng, 1), (1024, 1))
      batch = {"x": x, "y": jnp.zeros((1024,), jnp.int32)}
      grads, _ = jax.grad(loss_fn, has_aux=True)(
          params, batch, rng, objectives.Context(step=k))
      updates, opt = tx.update(grads, opt)
      return optax.apply_updates(params, updates), opt
    params0 = {"a": jnp.zeros(5), "b": jnp.zeros(5)}
    return jax.lax.fori_loop(0, 1000, step, (params0, tx.init(params0)))[0]

  params = train()
  noise = jax.random.normal(jax.random.key(99), (20_000, 1))
  labels = jnp.zeros((20_000,), jnp.int32)
  for schedule in (1, "1,0.45,0"):
    x = np.asarray(samplers.sample(_gaussian_family, params, noise, labels,
                                   schedule, "consistency",
                                   rng=jax.random.key(5))[0])
    assert abs(x.mean() - MU) < 0.15 and abs(x.std() - S) < 0.12, (
        schedule, x.mean(), x.std())


def test_ct_with_mu0_zero_targets_the_online_network():
  c = _config("ct", ct_mu0=0.0)
  objectives.validate(c)
  update = objectives.make_target_update(c)
  got = update({"w": jnp.float32(1.0)}, {"w": jnp.float32(3.0)}, 500)
  assert float(got["w"]) == 3.0
