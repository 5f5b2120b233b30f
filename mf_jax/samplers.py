"""Samplers: pure functions of (u_fn, params, noise, labels, timesteps).

Both walk a descending schedule 1 = t_0 > t_1 > ... > t_N = 0 with
z_r = z_t - (t - r) * u(z_t, t, h, y). The flow-map sampler asks for the
average velocity over the whole step (h = t - r, MeanFlow, exact for a
perfect model); Euler asks for the instantaneous velocity (h = 0, flow
matching). Evaluation picks the sampler an objective names in `SAMPLER`.
"""

import jax
import jax.numpy as jnp
import numpy as np

LABEL_MODES = ("random", "balanced")


def uniform_timesteps(num_steps: int) -> jax.Array:
  """The N-step schedule linspace(1, 0, N + 1)."""
  return jnp.linspace(1.0, 0.0, num_steps + 1)


def _integrate(u_fn, params, noise, labels, timesteps, average: bool):
  batch = noise.shape[0]

  def step(i, z):
    t, r = timesteps[i], timesteps[i + 1]
    t_b = jnp.full((batch,), t)
    h_b = jnp.full((batch,), t - r if average else 0.0)
    return z - (t - r) * u_fn(params, z, t_b, h_b, labels, False)

  return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step, noise)


def flow_map_sample(u_fn, params, noise, labels, timesteps):
  """MeanFlow sampling; 1-NFE is x = e - u(e, t=1, h=1, y)."""
  return _integrate(u_fn, params, noise, labels, timesteps, average=True)


def euler_sample(u_fn, params, noise, labels, timesteps):
  """Euler integration of the probability-flow ODE (flow matching)."""
  return _integrate(u_fn, params, noise, labels, timesteps, average=False)


SAMPLERS = {"flow_map": flow_map_sample, "euler": euler_sample}


def make_labels(rng, num: int, num_classes: int, mode: str) -> jax.Array:
  """Class labels for `num` samples: uniformly random or class-balanced.

  Unconditional models (num_classes == 0) get zeros, which they ignore.
  """
  if num_classes == 0:
    return jnp.zeros((num,), jnp.int32)
  if mode == "random":
    return jax.random.randint(rng, (num,), 0, num_classes, jnp.int32)
  if mode == "balanced":
    return jnp.asarray(np.arange(num) % num_classes, jnp.int32)
  raise ValueError(f"Unknown label mode {mode!r}; valid: {LABEL_MODES}.")
