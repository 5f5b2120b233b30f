"""Pieces every objective shares: noising, label dropout, loss weighting.

`u_fn(params, z, t, h, y, train)` is the network's average velocity (the one
backbone signature of DESIGN.md §2); objectives only ever call it.
"""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp


# Folded into the step's rng for the network's dropout: a fold, not one more
# split, so objectives draw the same times and noise with or without it.
_DROPOUT_STREAM = 0x0D0


def dropout_rng(rng) -> jax.Array:
  """The key of the network's dropout masks in a training step."""
  return jax.random.fold_in(rng, _DROPOUT_STREAM)


def model_extras(u_fn, batch, draws) -> dict:
  """Keyword arguments a training call of u_fn takes beyond its six.

  A backbone u_fn (`takes_rngs`, see training.state.make_u_fn) gets the
  dropout key of `draws`; batches of augmented images add their
  'augment_labels'. Plain functions of (params, z, t, h, y, train) get
  nothing.
  """
  extras = {}
  if getattr(u_fn, "takes_rngs", False):
    extras["rngs"] = {"dropout": draws["dropout"]}
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


def draw_dropped(rng, y, num_classes: int, rate: float) -> jax.Array:
  """The rows whose label is replaced by the null class (probability rate)."""
  if num_classes == 0 or rate == 0:
    return jnp.zeros(y.shape, bool)
  return jax.random.bernoulli(rng, rate, y.shape)


def drop_labels(y, dropped, num_classes: int) -> jax.Array:
  """y with the `dropped` rows set to the null class `num_classes`."""
  return jnp.where(dropped, num_classes, y) if num_classes else y


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


class Context(flax.struct.PyTreeNode):
  """What a training step knows beyond (params, batch, rng).

  Every objective receives it; most ignore it. Curricula read `step` and
  `num_steps` (static), consistency targets read an EMA copy from
  `ema_params` (keyed like the train state's, e.g. '0.9999') or the
  objective's own `target_params` (see objectives.make_target_update).
  Distillation objectives call `teacher(z, t, h, y)`, a frozen network's
  average velocity (training/teacher.py), None without `objective.teacher`;
  `teacher_weak` likewise, a weaker checkpoint of it for autoguidance
  (`objective.teacher_weak`), None without one.
  """
  step: jax.Array
  ema_params: dict = flax.struct.field(default_factory=dict)
  target_params: Any = flax.struct.field(default_factory=dict)
  teacher: Callable | None = flax.struct.field(pytree_node=False,
                                               default=None)
  teacher_weak: Callable | None = flax.struct.field(pytree_node=False,
                                                    default=None)
  num_steps: int = flax.struct.field(pytree_node=False, default=0)
