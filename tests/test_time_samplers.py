"""The time samplers against the distributions they claim to draw from.

The references are independent of the code under test: the logit-normal's
own parameters, its density integrated numerically (scipy.integrate.quad),
its closed-form CDF, and the figures the research notes measured with the
official MeanFlow `sample_tr`.
"""

import jax
import numpy as np
import pytest
from scipy import integrate
from scipy import special
from scipy import stats

from mf_jax import config_lib
from mf_jax.objectives import time_samplers

N = 1_000_000


def _config(**objective):
  c = config_lib.base_config().objective
  c.update(**objective)
  return c


def _draw(config, seed=0, n=N):
  t = time_samplers.sample_time(jax.random.key(seed), (n,), config)
  return np.asarray(t, np.float64)


def _logit_normal_pdf(t, mean, std):
  return stats.norm.pdf(special.logit(t), mean, std) / (t * (1 - t))


def _logit_normal_moments(mean, std):
  """E[t] and std(t) by integrating the density over (0, 1)."""
  pdf = lambda t: _logit_normal_pdf(t, mean, std)
  mass = integrate.quad(pdf, 0, 1, limit=200)[0]
  m1 = integrate.quad(lambda t: t * pdf(t), 0, 1, limit=200)[0]
  m2 = integrate.quad(lambda t: t * t * pdf(t), 0, 1, limit=200)[0]
  assert mass == pytest.approx(1.0, abs=1e-8)  # the reference itself
  return m1, np.sqrt(m2 - m1**2)


# (time_mean, time_std): ImageNet's (official JAX default.py) and CIFAR-10's
# (py-meanflow cifar10_v0.sh), and a positive mean.
@pytest.mark.parametrize("mean,std", [(-0.4, 1.0), (-2.0, 2.0), (0.8, 0.8)])
def test_logit_normal_matches_its_parameters_and_density(mean, std):
  t = _draw(_config(time_sampler="logit_normal", time_mean=mean,
                    time_std=std))
  assert np.all((t > 0) & (t < 1))
  logit = special.logit(t)
  # Standard errors: std / sqrt(N) for the mean, std / sqrt(2N) for the std.
  assert abs(logit.mean() - mean) < 5 * std / np.sqrt(N)
  assert abs(logit.std() - std) < 5 * std / np.sqrt(2 * N)
  want_mean, want_std = _logit_normal_moments(mean, std)
  assert abs(t.mean() - want_mean) < 5 * want_std / np.sqrt(N)
  assert abs(t.std() - want_std) < 0.005 * want_std
  # The CDF at a few points: P(t < c) = Phi((logit(c) - mean) / std).
  for c in (0.05, 0.3, 0.5, 0.7, 0.95):
    want = stats.norm.cdf((special.logit(c) - mean) / std)
    assert abs(np.mean(t < c) - want) < 5 * np.sqrt(want * (1 - want) / N)


def test_logit_normal_seeds():
  config = _config(time_sampler="logit_normal")
  np.testing.assert_array_equal(_draw(config, 3, 1000), _draw(config, 3, 1000))
  assert not np.any(_draw(config, 3, 1000) == _draw(config, 4, 1000))


def test_uniform_moments():
  t = _draw(_config(time_sampler="uniform"))
  assert np.all((t >= 0) & (t < 1))
  assert abs(t.mean() - 0.5) < 5 * np.sqrt(1 / 12 / N)
  assert abs(t.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / N)  # var of (U-1/2)^2
  counts = np.histogram(t, bins=10, range=(0, 1))[0]
  assert stats.chisquare(counts).pvalue > 1e-4


def _cdf(c, mean, std):
  return stats.norm.cdf((special.logit(c) - mean) / std)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.75, 1.0])
def test_meanflow_t_r_order_fraction_and_marginals(fraction):
  """t = max and r = min of two logit-normal draws; a random `fraction` of
  the rows keeps r < t, independently of t."""
  mean, std = -0.4, 1.0
  config = _config(time_sampler="logit_normal", time_mean=mean, time_std=std,
                   fraction_r_neq_t=fraction)
  t, r = time_samplers.sample_t_r(jax.random.key(1), N, config)
  t, r = np.asarray(t, np.float64), np.asarray(r, np.float64)
  assert np.all(r <= t)
  differ = r < t
  if fraction in (0.0, 1.0):
    assert differ.mean() == fraction
  else:
    se = np.sqrt(fraction * (1 - fraction) / N)
    assert abs(differ.mean() - fraction) < 5 * se
    # The mask depends neither on t nor on the row (the official code keeps
    # r != t on the last rows of each device batch).
    high = t > np.median(t)
    assert abs(differ[high].mean() - differ[~high].mean()) < 10 * se
    first = np.arange(N) < N // 2
    assert abs(differ[first].mean() - differ[~first].mean()) < 10 * se
  # t is the max of two draws on every row: P(t < c) = F(c)^2.
  for c in (0.2, 0.5, 0.8):
    want = _cdf(c, mean, std) ** 2
    assert abs(np.mean(t < c) - want) < 5 * np.sqrt(want * (1 - want) / N)
  if fraction:
    # E[t - r | r != t] = E|t1 - t2| = integral of 2 F (1 - F).
    gap = integrate.quad(
        lambda c: 2 * _cdf(c, mean, std) * (1 - _cdf(c, mean, std)), 0, 1)[0]
    assert abs((t - r)[differ].mean() - gap) < 0.002


def test_meanflow_t_r_matches_the_official_sampler_figures():
  """official_meanflow.md 1.2: the official `sample_tr` (default.py: LN(-0.4,
  1.0), data_proportion 0.75) on 100k samples gave mean t = 0.535, mean
  (t - r) over r != t = 0.235 and 75.0 % of rows with r = t."""
  config = _config(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                   fraction_r_neq_t=0.25)
  t, r = time_samplers.sample_t_r(jax.random.key(2), N, config)
  t, r = np.asarray(t, np.float64), np.asarray(r, np.float64)
  # Their 100k-sample figures carry ~0.001 of noise and 3-digit rounding.
  assert abs(t.mean() - 0.535) < 0.003
  assert abs((t - r)[r < t].mean() - 0.235) < 0.003
  assert abs(np.mean(r == t) - 0.750) < 0.003
