"""Consistency models (CT, iCT, ECT): the Karras grid and the curricula by
hand, the lognormal index distribution against its closed form,
pseudo-Huber, the boundary condition, each loss against a hand computation
on a tiny network, the multistep sampler on Gaussian data, and the one-line
errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mf_jax import samplers
from mf_jax.objectives import consistency
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
