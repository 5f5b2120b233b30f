"""Samplers: pure functions of (u_fn, params, noise, labels, timesteps).

The fixed-step ones walk a descending schedule 1 = t_0 > ... > t_N = 0 with
z_r = z_t - (t - r) * u(z_t, t, h, y). The flow-map sampler asks for the
average velocity over the whole step (h = t - r, MeanFlow, exact for a
perfect model); Euler asks for the instantaneous velocity (h = 0, flow
matching), and Heun corrects Euler's step with the velocity at its end
(second order, 2 NFE a step). The consistency sampler jumps to data with
the flow map to 0 at every time of the schedule and re-noises to the next
(consistency models). Evaluation picks the sampler an objective
names in `SAMPLER`, unless a schedule names its own solver ('heun8',
'euler16', 'ode': `Solver`), which then integrates the instantaneous
velocity whatever the objective trained: the many-step reference a one-step
model is compared with. 'ode' is adaptive (Dopri5, `ode_sample`) and
reports the NFE it took.

Every fixed-step sampler takes (u_fn, params, noise, labels, timesteps,
rng=None). `rng` is for samplers that draw fresh noise along the way (the
consistency sampler re-noises between its jumps): noise bits cannot seed
a key, so the caller passes one, independent of the key that drew `noise`
(the evaluator folds 1 into that key). Deterministic samplers ignore it.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

LABEL_MODES = ("random", "balanced")

# Tolerances of the adaptive reference: those of the Rectified Flow code's
# RK45 sampler (`ode_tol` = 1e-5 for rtol and atol), behind its adaptive
# FID and NFE figures; flow-matching evaluators use 1e-5 to 1e-4.
ODE_RTOL = 1e-5
ODE_ATOL = 1e-5
# Steps (accepted + rejected) before a solve gives up: a smooth learned
# field takes tens; thousands mean a field too stiff for the tolerances.
ODE_MAX_STEPS = 4096
# The first step's length; the controller grows it (up to 10x a step). A
# fixed value keeps the NFE count exact: diffrax's automatic choice (dt0 =
# None) takes 0.01 too inside diffeqsolve (0.7.2), but in other versions it
# may spend two probe evaluations (Hairer, Norsett & Wanner, II.4).
ODE_FIRST_STEP = 0.01
# Dopri5's evaluations: 6 new stages per attempted step (the 7th, at the
# step's end, is the next step's first: FSAL; a rejected step keeps it),
# plus 1 for the first step's first stage.
DOPRI5_NFE_PER_STEP = 6
DOPRI5_NFE_AT_START = 1


@dataclasses.dataclass(frozen=True)
class Solver:
  """A schedule that names its integrator of the instantaneous velocity:
  'euler16' and 'heun8' take that many uniform steps, 'ode' is adaptive;
  or a score SDE's reverse-SDE sampler, 'em100' (Euler-Maruyama) and
  'pc100' (predictor-corrector), which only score_sde runs take
  (sde_samplers.py)."""
  method: str  # "euler", "heun", "ode", or "em", "pc" (score SDEs)
  steps: int = 0  # 0 for "ode"

  @property
  def name(self) -> str:
    return "ode" if self.method == "ode" else f"{self.method}{self.steps}"


_FIXED_SOLVER = re.compile(r"(euler|heun|em|pc)(\d+)")
SDE_METHODS = ("em", "pc")


def uniform_timesteps(num_steps: int) -> jax.Array:
  """The N-step schedule linspace(1, 0, N + 1)."""
  return jnp.linspace(1.0, 0.0, num_steps + 1)


def parse_schedule(spec: int | str) -> tuple[float, ...] | int | Solver:
  """A schedule as configs write it, checked: an NFE N (the uniform N-step
  schedule of the objective's sampler), explicit times 'a,b,...' descending
  from 1 to 0, such as '1,0.6,0' (2 steps, the first one long), or a solver
  of the instantaneous velocity: 'eulerN', 'heunN' (N uniform steps) or
  'ode' (adaptive Dopri5)."""
  if isinstance(spec, (int, np.integer)):
    if spec < 1:
      raise ValueError(f"NFE must be at least 1, got {spec}.")
    return int(spec)
  text = str(spec).strip()
  if text == "ode":
    return Solver("ode")
  fixed = _FIXED_SOLVER.fullmatch(text)
  if fixed:
    if int(fixed.group(2)) < 1:
      raise ValueError(f"Sampling schedule {spec!r} needs at least 1 step.")
    return Solver(fixed.group(1), int(fixed.group(2)))
  try:
    times = tuple(float(s) for s in text.split(","))
  except ValueError:
    times = ()
  if (len(times) < 2 or times[0] != 1.0 or times[-1] != 0.0
      or any(a <= b for a, b in zip(times, times[1:]))):
    raise ValueError(f"Sampling schedule {spec!r} must be a step count, "
                     "times that descend from 1 to 0 (e.g. '1,0.6,0'), "
                     "'eulerN', 'heunN', 'ode' (or 'emN', 'pcN' for "
                     "score SDEs).")
  return times


def timesteps(spec: int | str) -> jax.Array:
  """The schedule array of `parse_schedule(spec)`, for the objective's
  sampler; a `Solver` entry has none (`sample` runs it)."""
  parsed = parse_schedule(spec)
  if isinstance(parsed, Solver):
    raise ValueError(f"Sampling schedule {spec!r} names its own solver; "
                     "only step counts and explicit times are taken here.")
  if isinstance(parsed, int):
    return uniform_timesteps(parsed)
  return jnp.asarray(parsed, jnp.float32)


def schedule_name(spec: int | str) -> str:
  """'nfe2' for the uniform 2 steps, 'nfe2[1,0.6,0]' for explicit times,
  'heun8', 'euler16' or 'ode' for a solver (the key prefix in eval JSON)."""
  parsed = parse_schedule(spec)
  if isinstance(parsed, Solver):
    return parsed.name
  if isinstance(parsed, int):
    return f"nfe{parsed}"
  return f"nfe{len(parsed) - 1}[{spec}]"


def fixed_nfe(spec: int | str) -> int | None:
  """Network evaluations of a fixed schedule (Heun: 2 a step, its last
  one included), None for the adaptive 'ode' (it measures its own)."""
  parsed = parse_schedule(spec)
  if isinstance(parsed, int):
    return parsed
  if isinstance(parsed, tuple):
    return len(parsed) - 1
  if parsed.method == "ode":
    return None
  return parsed.steps * (2 if parsed.method in ("heun", "pc") else 1)


def _velocity(u_fn, params, z, t, labels):
  """u(z, t, h = 0, y), the instantaneous velocity, at a scalar time."""
  t_b = jnp.full((z.shape[0],), t, z.dtype)
  return u_fn(params, z, t_b, jnp.zeros_like(t_b), labels, False)


def _integrate(u_fn, params, noise, labels, timesteps, average: bool):
  batch = noise.shape[0]

  def step(i, z):
    t, r = timesteps[i], timesteps[i + 1]
    t_b = jnp.full((batch,), t)
    h_b = jnp.full((batch,), t - r if average else 0.0)
    return z - (t - r) * u_fn(params, z, t_b, h_b, labels, False)

  return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step, noise)


def flow_map_sample(u_fn, params, noise, labels, timesteps, rng=None):
  """MeanFlow sampling; 1-NFE is x = e - u(e, t=1, h=1, y)."""
  del rng
  return _integrate(u_fn, params, noise, labels, timesteps, average=True)


def euler_sample(u_fn, params, noise, labels, timesteps, rng=None):
  """Euler integration of the probability-flow ODE (flow matching)."""
  del rng
  return _integrate(u_fn, params, noise, labels, timesteps, average=False)


def heun_sample(u_fn, params, noise, labels, timesteps, rng=None):
  """Heun's method (explicit trapezoid) on the instantaneous velocity:
  second order, 2 NFE per step, the last step included (t = 0 is a regular
  time for a flow; EDM's Euler last step avoids its sigma = 0 only)."""
  del rng

  def step(i, z):
    t, r = timesteps[i], timesteps[i + 1]
    slope = _velocity(u_fn, params, z, t, labels)
    z_euler = z - (t - r) * slope
    slope_end = _velocity(u_fn, params, z_euler, r, labels)
    return z - (t - r) * 0.5 * (slope + slope_end)

  return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step, noise)


def ode_sample(u_fn, params, noise, labels, rtol: float = ODE_RTOL,
               atol: float = ODE_ATOL, max_steps: int = ODE_MAX_STEPS):
  """Adaptive Dopri5 on dz/dt = u(z, t, 0, y) from t = 1 to t = 0.

  The whole batch is one ODE state: one step-size sequence for all rows,
  the error measured by the RMS norm over the batch (diffrax's default, as
  torchdiffeq's and scipy's in flow-matching evaluators), so a sharded
  batch runs in lockstep with one scalar reduction per step. The step size
  follows diffrax's PIDController with its default coefficients (an
  I-controller, as scipy's RK45 and torchdiffeq's dopri5) from a first step
  of ODE_FIRST_STEP. Returns (samples, stats): stats['nfe'] the network
  evaluations taken (int32), stats['steps'] the attempted steps and
  stats['finished'] False when max_steps ran out before t = 0.
  """

  # Imported here: diffrax and equinox add about a second to every process
  # that imports the samplers, and only this sampler needs them.
  import diffrax  # pylint: disable=g-import-not-at-top

  def vector_field(t, z, args):
    return _velocity(u_fn, args[0], z, t, args[1])

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Dopri5(), t0=1.0, t1=0.0,
      dt0=-ODE_FIRST_STEP, y0=noise, args=(params, labels),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
  steps = jnp.asarray(solution.stats["num_steps"], jnp.int32)
  stats = {
      "nfe": DOPRI5_NFE_AT_START + DOPRI5_NFE_PER_STEP * steps,
      "steps": steps,
      "finished": solution.result == diffrax.RESULTS.successful,
  }
  return solution.ys[0], stats


def consistency_sample(u_fn, params, noise, labels, timesteps, rng=None):
  """Multistep consistency sampling (Song et al., 2023, Algorithm 1).

  At each time t of the schedule, jump to data with the consistency
  function x = f(z, t) = z - t u(z, t, h = t, y), then re-noise to the
  next time t' along the forward path, z = (1 - t') x + t' e', with fresh
  noise e' (drawn from fold_in(rng, step)); the last jump lands at t' = 0,
  where z = x. 1-NFE is x = e - u(e, 1, 1, y), as for the flow map; with
  more steps the samples differ from the flow map's (the re-noising is
  stochastic, the flow map's steps are not). `rng` is required for
  schedules of more than one step.
  """
  steps = timesteps.shape[0] - 1
  if steps > 1 and rng is None:
    raise ValueError("The consistency sampler re-noises between its "
                     f"{steps} steps and needs an rng key; pass rng=.")
  batch = noise.shape[0]

  def step(i, z):
    t, r = timesteps[i], timesteps[i + 1]
    t_b = jnp.full((batch,), t, z.dtype)
    x = z - t * u_fn(params, z, t_b, t_b, labels, False)
    if steps == 1:  # no noise to draw, no key needed
      return x
    fresh = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
    return (1 - r) * x + r * fresh

  return jax.lax.fori_loop(0, steps, step, noise)


SAMPLERS = {"flow_map": flow_map_sample, "euler": euler_sample,
            "heun": heun_sample, "consistency": consistency_sample}


def sample(u_fn, params, noise, labels, spec: int | str, sampler: str,
           rtol: float = ODE_RTOL, atol: float = ODE_ATOL, rng=None):
  """Samples of schedule `spec` (see `parse_schedule`) and their stats
  (as `ode_sample`'s; a fixed schedule's nfe is its count). Step counts
  and explicit times run `SAMPLERS[sampler]`, the objective's; a `Solver`
  runs its own method on the instantaneous velocity. `rng`: the key of
  samplers that draw noise as they go (module docstring)."""
  parsed = parse_schedule(spec)
  if isinstance(parsed, Solver):
    if parsed.method in SDE_METHODS:
      raise ValueError(f"Sampling schedule {spec!r} is a score SDE's "
                       "sampler: only objective.name=score_sde takes it.")
    if parsed.method == "ode":
      return ode_sample(u_fn, params, noise, labels, rtol, atol)
    fn, times = SAMPLERS[parsed.method], uniform_timesteps(parsed.steps)
  else:
    fn, times = SAMPLERS[sampler], timesteps(spec)
  samples = fn(u_fn, params, noise, labels, times, rng=rng)
  return samples, {"nfe": jnp.int32(fixed_nfe(spec)),
                   "steps": jnp.int32(times.shape[0] - 1),
                   "finished": jnp.bool_(True)}


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
