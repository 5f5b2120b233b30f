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


def parse_schedule(spec: int | str) -> tuple[float, ...] | int:
  """A schedule as configs write it, checked: an NFE N (the uniform N-step
  schedule), or explicit times 'a,b,...' descending from 1 to 0, such as
  '1,0.6,0' (2 steps, the first one long)."""
  if isinstance(spec, (int, np.integer)):
    if spec < 1:
      raise ValueError(f"NFE must be at least 1, got {spec}.")
    return int(spec)
  times = tuple(float(s) for s in str(spec).split(","))
  if (len(times) < 2 or times[0] != 1.0 or times[-1] != 0.0
      or any(a <= b for a, b in zip(times, times[1:]))):
    raise ValueError(f"Sampling schedule {spec!r} must descend from 1 to 0, "
                     "e.g. '1,0.6,0'.")
  return times


def timesteps(spec: int | str) -> jax.Array:
  """The schedule array of `parse_schedule(spec)`."""
  parsed = parse_schedule(spec)
  if isinstance(parsed, int):
    return uniform_timesteps(parsed)
  return jnp.asarray(parsed, jnp.float32)


def schedule_name(spec: int | str) -> str:
  """'nfe2' for the uniform 2 steps, 'nfe2[1,0.6,0]' for explicit times."""
  parsed = parse_schedule(spec)
  if isinstance(parsed, int):
    return f"nfe{parsed}"
  return f"nfe{len(parsed) - 1}[{spec}]"


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
