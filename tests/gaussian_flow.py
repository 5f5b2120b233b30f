"""Gaussian data, for which the flow and its average velocity are exact.

"""

import jax.numpy as jnp

from mf_jax.objectives import common

# Data x ~ N(MU, S^2 I). Everything is linear-Gaussian, so the flow keeps the
# standardised coordinate: z_t = (1 - t) MU + sigma_t xi, sigma_t^2 =
# (1 - t)^2 S^2 + t^2, and the exact average velocity is
# u(z, r, t) = (z_t - z_r) / (t - r).
MU, S = 1.5, 0.5


def sigma(t):
  return jnp.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_u(params, z, t, h, y, train):
  """The true average velocity, as a stand-in network (h > 0)."""
  del params, y, train
  r = t - h
  t_, r_ = common.broadcast_to(t, z), common.broadcast_to(r, z)
  xi = (z - (1 - t_) * MU) / sigma(t_)
  z_r = (1 - r_) * MU + sigma(r_) * xi
  return (z - z_r) / common.broadcast_to(h, z)


def marginal_velocity(z, t):
  """E[e - x | z_t = z] for the Gaussian data."""
  t_ = common.broadcast_to(t, z)
  cov = t_ - (1 - t_) * S**2
  return -MU + cov / sigma(t_) ** 2 * (z - (1 - t_) * MU)
