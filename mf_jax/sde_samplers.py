"""Samplers of score SDEs (Song et al., 2021), for objective.name=score_sde.

The network's output is a noise prediction eps(x, t), the score
-eps / s(t) (objectives/score_sde.py). Every sampler starts from the prior
N(0, I) at t = 1 (the evaluator's noise), stops at the SDE's `sample_eps`
and takes one last noise-free reverse step to t = 0 (Song et al.'s noise
removal). A schedule of eval.nfe picks one:

- 'emN' (and a plain step count N): the reverse SDE
  dx = [f - g^2 score] dt + g dw by Euler-Maruyama at the N times
  linspace(1, sample_eps, N), N NFE; explicit times '1,0.5,0' step along
  those (the score at every time but the last);
- 'pcN': predictor-corrector, one Langevin step (signal-to-noise ratio
  `snr`) before each Euler-Maruyama step, 2N NFE;
- 'ode' (adaptive Dopri5, samplers.ode_sample with its tolerances),
  'eulerN', 'heunN': the probability-flow ODE dx/dt = f - 1/2 g^2 score,
  +1 NFE for the last step.

The probability-flow ODE reuses mf_jax.samplers' solvers unchanged: they
integrate a velocity u(z, tau, h = 0) from tau = 1 to 0, and
`probability_flow` presents the ODE's drift in that form, over
tau = (t - sample_eps) / (1 - sample_eps).

Stochastic samplers draw their noise from `rng` (fold_in by step), which
the evaluator passes next to the initial noise.
"""

import jax
import jax.numpy as jnp

from mf_jax import samplers
from mf_jax.objectives import common
from mf_jax.objectives import score_sde


def score(u_fn, params, sde: score_sde.SDE, x, t_b, labels):
  """grad log p_t(x) = -eps(x, t) / s(t), for per-sample times t_b (B,)."""
  eps = u_fn(params, x, t_b, jnp.zeros_like(t_b), labels, False)
  return -eps / common.broadcast_to(sde.std(t_b), x)


def _times(x, t):
  return jnp.full((x.shape[0],), t, x.dtype)


def reverse_mean(u_fn, params, sde, x, t, r, labels):
  """x - [f(x, t) - g(t)^2 score] (t - r): the noise-free reverse step."""
  t_b = _times(x, t)
  g2 = jnp.square(sde.diffusion(t))
  drift = sde.drift(x, t_b) - g2 * score(u_fn, params, sde, x, t_b, labels)
  return x - drift * (t - r)


def em_step(u_fn, params, sde, x, t, r, labels, noise):
  """One Euler-Maruyama step of the reverse SDE from t down to r."""
  mean = reverse_mean(u_fn, params, sde, x, t, r, labels)
  return mean + sde.diffusion(t) * jnp.sqrt(t - r) * noise


def langevin_step(u_fn, params, sde, x, t, labels, noise, num_steps: int):
  """Song et al.'s Langevin corrector: step size 2 alpha (snr ||z|| /
  ||score||)^2 with the norms averaged over the batch. Their alpha is
  1 - beta_i of the N-step DDPM discretisation, ~1 - beta(t) / N, which
  turns negative below N = beta_max (a NaN step); exp(-beta(t) / N) is the
  same to first order and stays in (0, 1]."""
  grad = score(u_fn, params, sde, x, _times(x, t), labels)
  norm = lambda a: jnp.mean(jnp.linalg.norm(a.reshape(a.shape[0], -1),
                                            axis=-1))
  alpha = jnp.exp(-sde.beta(t) / num_steps)
  step = 2 * alpha * jnp.square(sde.snr * norm(noise) / norm(grad))
  return x + step * grad + jnp.sqrt(2 * step) * noise


def em_times(num_steps: int, sde: score_sde.SDE) -> jax.Array:
  """linspace(1, sample_eps, N) and a last time 0 (the noise-free step)."""
  return jnp.append(jnp.linspace(1.0, sde.sample_eps, num_steps), 0.0)


def em_sample(u_fn, params, noise, labels, timesteps, rng, sde,
              corrector: bool = False):
  """Euler-Maruyama along `timesteps` (1 ... 0), the last step without
  noise; with `corrector`, a Langevin step at each time before it."""
  if rng is None:
    raise ValueError("The reverse-SDE samplers draw fresh noise at every "
                     "step and need an rng key; pass rng=.")
  steps = timesteps.shape[0] - 1

  def step(i, x):
    t, r = timesteps[i], timesteps[i + 1]
    key_c, key_p = jax.random.split(jax.random.fold_in(rng, i))
    if corrector:
      x = langevin_step(u_fn, params, sde, x, t, labels,
                        jax.random.normal(key_c, x.shape, x.dtype), steps)
    fresh = jax.random.normal(key_p, x.shape, x.dtype)
    return em_step(u_fn, params, sde, x, t, r, labels,
                   jnp.where(i == steps - 1, 0.0, fresh))

  return jax.lax.fori_loop(0, steps, step, noise)


def probability_flow(u_fn, sde: score_sde.SDE):
  """The probability-flow ODE as a u_fn the flow solvers integrate:
  u(z, tau, h, y) = (1 - eps) [f(z, t) - 1/2 g(t)^2 score(z, t)] at
  t = eps + tau (1 - eps), so tau = 1 -> 0 runs t = 1 -> sample_eps."""
  eps = sde.sample_eps

  def velocity(params, z, tau_b, h_b, labels, train):
    del h_b, train
    t_b = eps + tau_b * (1 - eps)
    g2 = common.broadcast_to(jnp.square(sde.diffusion(t_b)), z)
    drift = sde.drift(z, t_b) - 0.5 * g2 * score(u_fn, params, sde, z, t_b,
                                                 labels)
    return (1 - eps) * drift
  return velocity


def sde_of(config) -> score_sde.SDE | None:
  """The score SDE a config samples with; None for other objectives."""
  if config.objective.name != "score_sde":
    return None
  return score_sde.sde_of(config.objective)


def check_schedules(schedules, sde: score_sde.SDE | None):
  """'emN' and 'pcN' need a score SDE: one line, before compiling."""
  if sde is not None:
    return
  bad = [spec for spec in schedules
         if isinstance(samplers.parse_schedule(spec), samplers.Solver)
         and samplers.parse_schedule(spec).method in samplers.SDE_METHODS]
  if bad:
    raise ValueError(f"Sampling schedules {bad} are a score SDE's samplers: "
                     "only objective.name=score_sde takes them.")


def sample(u_fn, params, noise, labels, spec, sampler: str = "sde",
           rtol: float = samplers.ODE_RTOL, atol: float = samplers.ODE_ATOL,
           rng=None, *, sde: score_sde.SDE):
  """Samples of schedule `spec` and their stats (nfe, steps, finished):
  samplers.sample's signature and results, with the SDE (`sampler` is
  the objective's 'sde', unused). The probability-flow schedules' nfe
  counts their last step (samplers.fixed_nfe's figure + 1)."""
  del sampler
  parsed = samplers.parse_schedule(spec)
  if (isinstance(parsed, samplers.Solver)
      and parsed.method not in samplers.SDE_METHODS):
    x, stats = samplers.sample(probability_flow(u_fn, sde), params, noise,
                               labels, spec, "euler", rtol, atol)
    x = reverse_mean(u_fn, params, sde, x, sde.sample_eps, 0.0, labels)
    return x, dict(stats, nfe=stats["nfe"] + 1)
  corrector = isinstance(parsed, samplers.Solver) and parsed.method == "pc"
  if isinstance(parsed, samplers.Solver):
    times = em_times(parsed.steps, sde)
  elif isinstance(parsed, int):
    times = em_times(parsed, sde)
  else:
    times = jnp.asarray(parsed, jnp.float32)
  x = em_sample(u_fn, params, noise, labels, times, rng, sde, corrector)
  steps = times.shape[0] - 1
  return x, {"nfe": jnp.int32(steps * (2 if corrector else 1)),
             "steps": jnp.int32(steps), "finished": jnp.bool_(True)}
