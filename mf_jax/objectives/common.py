"""Pieces every objective shares: noising, label dropout, loss weighting.

`u_fn(params, z, t, h, y, train)` is the network's average velocity (the one
backbone signature of DESIGN.md §2); objectives only ever call it.
"""

import jax
import jax.numpy as jnp


# Folded into the step's rng for the network's dropout: a fold, not one more
# split, so objectives draw the same times and noise with or without it.
_DROPOUT_STREAM = 0x0D0


def model_extras(u_fn, batch, rng) -> dict:
  """Keyword arguments a training call of u_fn takes beyond its six.

  A backbone u_fn (`takes_rngs`, see training.state.make_u_fn) gets the
  dropout rng; batches of augmented images add their 'augment_labels'.
  Plain functions of (params, z, t, h, y, train) get nothing.
  """
  extras = {}
  if getattr(u_fn, "takes_rngs", False):
    extras["rngs"] = {"dropout": jax.random.fold_in(rng, _DROPOUT_STREAM)}
  if "augment_labels" in batch:
    extras["augment_labels"] = batch["augment_labels"]
  return extras


def broadcast_to(t_b: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-sample scalars (B,) to broadcast against x (B, ...)."""
  return t_b.reshape(t_b.shape + (1,) * (x.ndim - 1))


def interpolate(x, e, t):
  """Returns z_t = (1 - t) x + t e and the conditional velocity v = e - x."""
  t_x = broadcast_to(t, x)
  return (1 - t_x) * x + t_x * e, e - x


def drop_labels(rng, y, num_classes: int, rate: float):
  """Replaces labels by the null class `num_classes` with probability `rate`.

  Returns the new labels and the boolean mask of dropped rows.
  """
  if num_classes == 0 or rate == 0:
    return y, jnp.zeros(y.shape, bool)
  dropped = jax.random.bernoulli(rng, rate, y.shape)
  return jnp.where(dropped, num_classes, y), dropped


def per_sample_sq_error(a, b):
  """Sum of squares over every axis but the batch axis, shape (B,)."""
  return jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)


def adaptive_weighted_loss(sq_error_b, p: float, eps: float):
  """MeanFlow's adaptive loss: mean of ||d||^2 / sg(||d||^2 + eps)^p.

  With p = 1 the value is ~1 whatever the error, which is why objectives also
  report the raw squared error.
  """
  weight_b = jax.lax.stop_gradient(1.0 / (sq_error_b + eps) ** p)
  return jnp.mean(weight_b * sq_error_b), weight_b
