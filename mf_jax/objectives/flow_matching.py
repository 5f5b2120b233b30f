"""Flow matching (rectified flow): regress the conditional velocity e - x.

The network is asked for the instantaneous velocity, h = t - r = 0.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import time_samplers

SAMPLER = "euler"


def draw(rng, batch, config, num_classes, context=None):
  """Times t, noise e, dropped label rows and the dropout key."""
  del context
  x = batch["x"]
  rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
  return {"t": time_samplers.sample_time(rng_t, (x.shape[0],), config),
          "e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": common.draw_dropped(rng_drop, batch["y"], num_classes,
                                         config.class_dropout),
          "dropout": common.dropout_rng(rng)}


def loss(u_fn, params, batch, draws, config, num_classes, context=None):
  """Returns (scalar loss, metrics) for one batch {'x', 'y'}."""
  del context
  t = draws["t"]
  z, v = common.interpolate(batch["x"], draws["e"], t)
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  u = u_fn(params, z, t, jnp.zeros_like(t), y, True,
           **common.model_extras(u_fn, batch, draws))
  sq_error_b = common.per_sample_sq_error(u, v)
  value, weight_b = common.adaptive_weighted_loss(
      sq_error_b, config.adaptive_p, config.adaptive_eps)
  return value, {"loss": value, "mse": jnp.mean(sq_error_b),
                 "v_mse": jnp.mean(sq_error_b), "weight": jnp.mean(weight_b)}
