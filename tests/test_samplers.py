"""Samplers: exact on an exact model, shapes, determinism, labels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import samplers
from mf_jax.objectives import common
from tests.gaussian_flow import exact_u, marginal_velocity, MU, S, sigma


def velocity_model(params, z, t, h, y, train):
  del params, h, y, train
  return marginal_velocity(z, t)


@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_flow_map_with_exact_u_lands_on_the_data(nfe):
  """x = e - u(e, 0, 1) pushes N(0, 1) exactly onto N(MU, S^2)."""
  noise = jax.random.normal(jax.random.key(0), (50_000, 1))
  labels = jnp.zeros(50_000, jnp.int32)
  x = samplers.flow_map_sample(exact_u, None, noise, labels,
                               samplers.uniform_timesteps(nfe))
  # The exact flow map is affine: x = MU + S * e, whatever the NFE.
  np.testing.assert_allclose(x, MU + S * noise, rtol=1e-4, atol=1e-4)


def test_euler_converges_to_the_flow():
  noise = jax.random.normal(jax.random.key(1), (1000, 1))
  labels = jnp.zeros(1000, jnp.int32)
  errors = []
  for steps in (1, 10, 100):
    x = samplers.euler_sample(velocity_model, None, noise, labels,
                              samplers.uniform_timesteps(steps))
    errors.append(float(jnp.max(jnp.abs(x - (MU + S * noise)))))
  # First order: ten times the steps, a tenth of the error.
  assert errors[0] > 5 * errors[1] > 25 * errors[2] and errors[2] < 0.05


def _class_mean(y, z):
  """Class y's data is N(MU + y, S^2): a field that depends on the label."""
  return MU + y.astype(z.dtype).reshape((-1,) + (1,) * (z.ndim - 1))


def conditional_exact_u(params, z, t, h, y, train):
  """gaussian_flow.exact_u with the label's mean."""
  del params, train
  m = _class_mean(y, z)
  t_, r_ = common.broadcast_to(t, z), common.broadcast_to(t - h, z)
  xi = (z - (1 - t_) * m) / sigma(t_)
  return (z - ((1 - r_) * m + sigma(r_) * xi)) / common.broadcast_to(h, z)


def conditional_velocity(params, z, t, h, y, train):
  """gaussian_flow.marginal_velocity with the label's mean (h = 0)."""
  del params, h, train
  m, t_ = _class_mean(y, z), common.broadcast_to(t, z)
  return -m + (t_ - (1 - t_) * S**2) / sigma(t_) ** 2 * (z - (1 - t_) * m)


def test_samples_follow_the_noise_seed_and_the_labels():
  """Images (NHWC) with per-row labels on a closed-form field: each row
  lands on its own class's exact x = MU + y + S e; the same noise seed
  gives the same samples, another seed other samples."""
  labels = samplers.make_labels(jax.random.key(3), 6, 10, "random")
  assert len(set(np.asarray(labels).tolist())) > 1
  sample = jax.jit(functools.partial(samplers.flow_map_sample,
                                     conditional_exact_u))
  euler_sample = jax.jit(functools.partial(samplers.euler_sample,
                                           conditional_velocity))
  out = {}
  for seed in (2, 3):
    noise = jax.random.normal(jax.random.key(seed), (6, 4, 4, 3))
    x = sample(None, noise, labels, samplers.uniform_timesteps(3))
    assert x.shape == noise.shape and x.dtype == noise.dtype
    want = MU + np.asarray(labels)[:, None, None, None] + S * noise
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    again = sample(None, jax.random.normal(jax.random.key(seed), noise.shape),
                   labels, samplers.uniform_timesteps(3))
    np.testing.assert_array_equal(again, x)
    # Euler on the instantaneous velocity converges to the same map.
    euler = euler_sample(None, noise, labels, samplers.uniform_timesteps(200))
    np.testing.assert_allclose(euler, want, atol=0.02)
    out[seed] = np.asarray(x)
  assert not np.any(out[2] == out[3])


def test_labels():
  balanced = np.asarray(samplers.make_labels(None, 25, 10, "balanced"))
  np.testing.assert_array_equal(np.bincount(balanced), [3] * 5 + [2] * 5)
  rand = np.asarray(samplers.make_labels(jax.random.key(0), 1000, 10, "random"))
  assert rand.min() == 0 and rand.max() == 9
  assert (np.asarray(samplers.make_labels(None, 4, 0, "random")) == 0).all()
  with pytest.raises(ValueError, match="label mode"):
    samplers.make_labels(None, 4, 10, "sorted")


def test_explicit_schedules_parse_name_and_sample():
  assert samplers.parse_schedule(2) == 2
  assert samplers.parse_schedule("1,0.6,0") == (1.0, 0.6, 0.0)
  assert samplers.schedule_name(3) == "nfe3"
  assert samplers.schedule_name("1,0.6,0") == "nfe2[1,0.6,0]"
  for bad in ("1,0.5", "0.9,0", "1,0.2,0.5,0", 0):
    with pytest.raises(ValueError):
      samplers.parse_schedule(bad)
  np.testing.assert_array_equal(samplers.timesteps("1,0.5,0"),
                                samplers.timesteps(2))
  # An explicit schedule takes exactly its steps: with u(z) = z each step
  # scales z by 1 - (t - r), so [1, 0.6, 0] gives 0.6 * 0.4, uniform 0.5^2.
  u_fn = lambda params, z, t, h, y, train: z
  noise, labels = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
  for schedule, factor in (("1,0.6,0", 0.24), (2, 0.25), ("1,0.9,0.5,0", 0.27)):
    out = samplers.flow_map_sample(u_fn, None, noise, labels,
                                   samplers.timesteps(schedule))
    np.testing.assert_allclose(out, factor, rtol=1e-6)
