"""Tests for energy distance, sliced Wasserstein and the Frechet distance."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg
from scipy import stats

from mf_jax.data import toy2d
from mf_jax.evaluation import distances


def _mean_abs_normal(mean, std):
  """E|Z| for Z ~ N(mean, std^2) (folded normal mean)."""
  return (std * np.sqrt(2 / np.pi) * np.exp(-mean**2 / (2 * std**2))
          + mean * (1 - 2 * stats.norm.cdf(-mean / std)))


def test_energy_distance_identical_samples_near_zero():
  x = np.random.default_rng(0).standard_normal((3000, 2))
  value = distances.energy_distance(x, x)
  # The unbiased estimator gives exactly -2 E|X-X'| / n here: tiny and < 0.
  assert -0.01 < value <= 0.0


def test_energy_distance_matches_gaussian_shift_closed_form():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(4000)
  values = []
  for shift in (0.5, 1.0, 2.0):
    y = rng.standard_normal(4000) + shift
    # 2E|X-Y| - E|X-X'| - E|Y-Y'| with X-Y ~ N(-shift, 2), X-X' ~ N(0, 2).
    exact = 2 * _mean_abs_normal(shift, np.sqrt(2)) - 2 * _mean_abs_normal(
        0.0, np.sqrt(2))
    value = distances.energy_distance(x, y)
    np.testing.assert_allclose(value, exact, rtol=0.15)
    values.append(value)
  assert values[0] < values[1] < values[2]


def test_energy_distance_block_size_invariant_and_symmetric():
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((500, 3)), rng.standard_normal((300, 3)) + 0.3
  reference = distances.energy_distance(x, y, block_size=10_000)
  np.testing.assert_allclose(
      distances.energy_distance(x, y, block_size=7), reference, rtol=1e-12)
  np.testing.assert_allclose(distances.energy_distance(y, x), reference,
                             rtol=1e-12)


def test_energy_distance_separates_toy_distributions():
  rng = np.random.default_rng(0)
  board = toy2d.sample("checkerboard", 2000, rng)
  fresh = toy2d.sample("checkerboard", 2000, rng)
  moons = toy2d.sample("moons", 2000, rng)
  same = distances.energy_distance(board, fresh)
  different = distances.energy_distance(board, moons)
  assert different > 10 * abs(same)


def test_energy_distance_accepts_jax_arrays():
  x = np.random.default_rng(0).standard_normal((100, 2)).astype(np.float32)
  y = x + 1.0
  assert distances.energy_distance(jnp.asarray(x), jnp.asarray(y)) == (
      pytest.approx(distances.energy_distance(x, y), rel=1e-12))


def test_sliced_wasserstein_zero_for_permutations():
  x = np.random.default_rng(0).standard_normal((1000, 4))
  perm = np.random.default_rng(1).permutation(len(x))
  assert distances.sliced_wasserstein(x, x[perm]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_translation_closed_form():
  # Shifting by s moves each projection by s.theta; E(s.theta)^2 = |s|^2 / d.
  x = np.random.default_rng(0).standard_normal((2000, 3))
  shift = np.array([1.0, -2.0, 0.5])
  value = distances.sliced_wasserstein(x, x + shift, num_projections=4000)
  np.testing.assert_allclose(value, np.linalg.norm(shift) / np.sqrt(3), rtol=0.05)


def test_sliced_wasserstein_orders_and_validates():
  rng = np.random.default_rng(0)
  board = toy2d.sample("checkerboard", 2000, rng)
  fresh = toy2d.sample("checkerboard", 2000, rng)
  moons = toy2d.sample("moons", 2000, rng)
  assert (distances.sliced_wasserstein(board, moons)
          > 5 * distances.sliced_wasserstein(board, fresh))
  assert distances.sliced_wasserstein(board, moons, seed=3) == (
      distances.sliced_wasserstein(board, moons, seed=3))
  with pytest.raises(ValueError):
    distances.sliced_wasserstein(board, moons[:10])


def test_gaussian_stats_matches_numpy():
  x = np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32)
  mu, sigma = distances.gaussian_stats(x)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0))
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def _random_spd(rng, dim):
  a = rng.standard_normal((dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
  exact = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  np.testing.assert_allclose(
      distances.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), exact,
      rtol=1e-10)


def test_frechet_distance_commuting_closed_form():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
  a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
  mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
  exact = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  value = distances.frechet_distance(mu1, q * a @ q.T, mu2, q * b @ q.T)
  np.testing.assert_allclose(value, exact, rtol=1e-9)


@pytest.mark.parametrize("dim", [5, 32])
def test_frechet_distance_agrees_with_sqrtm(dim):
  rng = np.random.default_rng(dim)
  s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  covmean = linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2)**2) + np.trace(s1 + s2 - 2 * covmean)
  value = distances.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(value, expected, rtol=1e-8)
  np.testing.assert_allclose(distances.frechet_distance(mu2, s2, mu1, s1),
                             value, rtol=1e-8)


def test_frechet_distance_self_is_zero():
  feats = np.random.default_rng(0).standard_normal((1000, 64)) ** 3
  mu, sigma = distances.gaussian_stats(feats)
  assert distances.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(
      0.0, abs=1e-8 * np.trace(sigma))


def test_frechet_distance_handles_singular_covariances():
  # Dead ReLU features give exactly-zero variances; the closed form still holds.
  a, b = np.array([0.0, 1.0, 4.0]), np.array([1.0, 0.0, 4.0])
  value = distances.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3),
                                     np.diag(b))
  np.testing.assert_allclose(value, 2.0, rtol=1e-12)
