"""Distributions over the times (t, r) that objectives train on.

Time runs data -> noise: t = 0 is data, t = 1 is noise, and r <= t.
"""

import jax
import jax.numpy as jnp

TIME_SAMPLERS = ("logit_normal", "uniform")


def sample_time(rng, shape, config) -> jax.Array:
  """Draws times in [0, 1] from `config.time_sampler`."""
  if config.time_sampler == "logit_normal":
    normal = jax.random.normal(rng, shape)
    return jax.nn.sigmoid(config.time_mean + config.time_std * normal)
  if config.time_sampler == "uniform":
    return jax.random.uniform(rng, shape)
  raise ValueError(f"Unknown objective.time_sampler "
                   f"{config.time_sampler!r}; valid: {TIME_SAMPLERS}.")


def sample_t_r(rng, batch_size: int, config) -> tuple[jax.Array, jax.Array]:
  """MeanFlow's joint sampler: two draws, t = max, r = min.

  A random `fraction_r_neq_t` of the rows keeps r < t; the others get r = t,
  which makes them plain flow-matching rows. The mask is drawn at random per
  row (the official code takes the first rows of each device batch instead,
  which couples the r = t rows with the label-dropped rows).
  """
  rng_times, rng_mask = jax.random.split(rng)
  times = sample_time(rng_times, (2, batch_size), config)
  t, r = jnp.max(times, axis=0), jnp.min(times, axis=0)
  keep_r = jax.random.uniform(rng_mask, (batch_size,)) < config.fraction_r_neq_t
  return t, jnp.where(keep_r, r, t)
