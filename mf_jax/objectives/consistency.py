"""Pieces the consistency objectives share (CT, iCT, ECT, sCT).

A consistency function maps any point of a trajectory to its data end. On
the one backbone it is the flow map to r = 0:

  f(z_t, t) = z_t - t * u(z_t, t, h = t),

so f(z, 0) = z holds by construction (the boundary condition CM's
c_skip/c_out parameterisation builds in at sigma_min; here it sits at
t = 0, where z_0 is the data itself).

Time conventions. mf_jax's time t runs data (0) -> noise (1),
z_t = (1 - t) x + t e. The consistency papers write EDM's variance-exploding
form z_sigma = x + sigma e, sigma in [sigma_min, sigma_max]. Both describe
the same points up to a scale:

  sigma = t / (1 - t),   t = sigma / (1 + sigma),   z_sigma = z_t / (1 - t).

f's output is x in either form, so a loss between two f values (same x,
same e) is the same number in both conventions. The objectives therefore
keep the papers' formulas in sigma (grids, curricula, index
distributions, weights 1/(sigma_{i+1} - sigma_i)), draw e once, and convert
each sigma to t only at the network's boundary (`sigma_to_t`). sigma_max =
80 is t = 80/81 ~ 0.988: samplers start at t = 1 (z = e), 1/81 beyond the
largest training time, where the network's input differs from the
training one by (1 - t) (x - e), about 1 % of its scale.

The grid and its curricula (Song et al., 2023, "Consistency Models";
Song & Dhariwal, 2024, "Improved Techniques for Training Consistency
Models"):
- Karras grid of N points, ascending: sigma_i = (sigma_min^(1/rho) +
  i / (N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 0..N-1.
  Training pairs are adjacent points (i, i + 1), i in 0..N-2.
- CT's N(k) and mu(k), as openai/consistency_models_cifar10
  (jcm/losses.py `get_ema_scales_fn`): n = max(ceil(sqrt(k/K ((s1 + 1)^2 -
  s0^2) + s0^2) - 1), 1), N = n + 1, mu = exp(s0 log(mu0) / n). (The paper
  writes mu = exp(s0 log mu0 / N); the code divides by N - 1.)
- iCT's step doubling: K' = floor(K / (log2 floor(s1 / s0) + 1)),
  N(k) = min(s0 2^floor(k / K'), s1) + 1.
- iCT's lognormal index distribution: p(i) proportional to
  erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) -
  erf((ln sigma_i - P_mean) / (sqrt(2) P_std)), the lognormal's mass between
  the pair's two noise levels.
- Pseudo-Huber metric d(a, b) = sqrt(||a - b||^2 + c^2) - c, with iCT's
  c = 0.00054 sqrt(D) for D dimensions per sample.

N(k) changes during training, so every function here takes N as a (possibly
traced) array and returns fixed shapes: the index distribution has
`max_intervals` entries, zero beyond N - 1.
"""

import math

import jax
import jax.numpy as jnp

from mf_jax.objectives import common

# iCT's pseudo-Huber constant per sqrt(dimension) (c = 0.03 on CIFAR-10).
HUBER_C_PER_SQRT_DIM = 0.00054


def sigma_to_t(sigma):
  """EDM's noise level -> mf_jax time, t = sigma / (1 + sigma)."""
  return sigma / (1 + sigma)


def t_to_sigma(t):
  """mf_jax time -> EDM's noise level, sigma = t / (1 - t) (inf at t = 1)."""
  return t / (1 - t)


def consistency_fn(u_fn, params, z, t, y, train: bool, **extras):
  """f(z_t, t) = z_t - t u(z_t, t, h = t, y): the flow map to data."""
  u = u_fn(params, z, t, t, y, train, **extras)
  return z - common.broadcast_to(t, z) * u


def karras_sigma(i, n, sigma_min: float, sigma_max: float, rho: float):
  """The i-th of n ascending Karras noise levels (i, n may be traced)."""
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (lo + i / (n - 1) * (hi - lo)) ** rho


def karras_sigmas(n: int, sigma_min: float, sigma_max: float,
                  rho: float) -> jax.Array:
  """All n ascending Karras noise levels, sigma_0 = sigma_min."""
  return karras_sigma(jnp.arange(n, dtype=jnp.float32), n, sigma_min,
                      sigma_max, rho)


def validate_curriculum(prefix: str, s0, s1):
  """s0 (first) and s1 (last number of intervals) in one line of error."""
  if not (isinstance(s0, int) and isinstance(s1, int) and 1 <= s0 <= s1):
    raise ValueError(
        f"objective.{prefix}_s0={s0!r} and {prefix}_s1={s1!r} must be "
        f"integers with 1 <= s0 <= s1 (the curriculum's first and last "
        "number of grid intervals).")


def validate_grid(prefix: str, sigma_min, sigma_max, rho):
  """0 < sigma_min < sigma_max and rho > 0, in one line of error."""
  if not (0 < sigma_min < sigma_max and rho > 0):
    raise ValueError(
        f"objective.{prefix}_sigma_min={sigma_min!r}, {prefix}_sigma_max="
        f"{sigma_max!r} and {prefix}_rho={rho!r} must satisfy 0 < sigma_min "
        "< sigma_max and rho > 0 (EDM noise levels; sigma = t / (1 - t)).")


def ct_num_scales(step, num_steps: int, s0: int, s1: int) -> jax.Array:
  """CT's grid size N(k) (points, not intervals) at training step k."""
  intervals = jnp.ceil(jnp.sqrt(
      step / num_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
  return jnp.maximum(intervals, 1).astype(jnp.int32) + 1


def ct_target_decay(step, num_steps: int, s0: int, s1: int,
                    mu0: float) -> jax.Array:
  """CT's target EMA rate mu(k) = exp(s0 log(mu0) / (N(k) - 1))."""
  intervals = ct_num_scales(step, num_steps, s0, s1) - 1
  if mu0 == 0:  # the online network itself (CD's and iCT's choice)
    return jnp.zeros((), jnp.float32)
  return jnp.exp(s0 * math.log(mu0) / intervals)


def ict_num_scales(step, num_steps: int, s0: int, s1: int) -> jax.Array:
  """iCT's doubling N(k) = min(s0 2^floor(k / K'), s1) + 1 (points)."""
  stage_steps = max(math.floor(num_steps / (math.log2(s1 // s0) + 1)), 1)
  doublings = jnp.minimum(step // stage_steps, 62).astype(jnp.float32)
  intervals = jnp.minimum(s0 * 2.0**doublings, s1)
  return intervals.astype(jnp.int32) + 1


def lognormal_index_probs(n, max_intervals: int, sigma_min: float,
                          sigma_max: float, rho: float, p_mean: float,
                          p_std: float) -> jax.Array:
  """iCT's p(i), i = 0..max_intervals-1, over the n - 1 pairs of an
  n-point grid: the lognormal(p_mean, p_std) mass of [sigma_i,
  sigma_{i+1}], normalised; entries i >= n - 1 are 0."""
  i = jnp.arange(max_intervals, dtype=jnp.float32)
  valid = i < n - 1
  cdf = lambda s: jax.scipy.special.erf(
      (jnp.log(s) - p_mean) / (math.sqrt(2) * p_std))
  lower = karras_sigma(i, n, sigma_min, sigma_max, rho)
  upper = karras_sigma(jnp.minimum(i + 1, n - 1), n, sigma_min, sigma_max,
                       rho)
  mass = jnp.where(valid, cdf(upper) - cdf(lower), 0.0)
  return mass / jnp.sum(mass)


def sample_lognormal_index(rng, shape, n, max_intervals: int, *grid):
  """Pair indices i ~ lognormal_index_probs(n, max_intervals, *grid), by
  inverting the cumulative distribution (one uniform per index, not one
  per index and pair as `jax.random.categorical` draws)."""
  cdf = jnp.cumsum(lognormal_index_probs(n, max_intervals, *grid))
  u = jax.random.uniform(rng, shape) * cdf[-1]
  i = jnp.searchsorted(cdf, u, side="right")
  return jnp.minimum(i, n - 2).astype(jnp.int32)


def sample_uniform_index(rng, shape, n) -> jax.Array:
  """Pair indices i ~ U{0, ..., n - 2} (CT)."""
  return jax.random.randint(rng, shape, 0, n - 1)


def huber_c(c: float, x_shape) -> float:
  """A config's pseudo-Huber constant: c < 0 means iCT's 0.00054 sqrt(D),
  D the dimensions of one sample."""
  if c >= 0:
    return c
  return HUBER_C_PER_SQRT_DIM * math.sqrt(math.prod(x_shape[1:]))


def pseudo_huber(a, b, c: float) -> jax.Array:
  """Per-sample sqrt(||a - b||^2 + c^2) - c, shape (B,); c = 0 is the
  Euclidean norm (ECT's metric without Huber). Computed as
  ||a - b||^2 / (sqrt(||a - b||^2 + c^2) + c), the same value without the
  float32 cancellation of the difference form when ||a - b|| << c."""
  sq = common.per_sample_sq_error(a, b)
  if c == 0:
    return jnp.sqrt(sq)
  return sq / (jnp.sqrt(sq + c**2) + c)


def draw_noise_labels_dropout(rng, batch, config, num_classes) -> dict:
  """The draws every consistency objective shares: one noise e for both
  points of a pair, the label-dropped rows and the dropout key (one key,
  so student and target see the same dropout masks)."""
  rng_e, rng_drop = jax.random.split(rng)
  x = batch["x"]
  return {"e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": common.draw_dropped(rng_drop, batch["y"], num_classes,
                                         config.class_dropout),
          "dropout": common.dropout_rng(rng)}


def pair(u_fn, params, target_params, batch, draws, num_classes, t, r):
  """(f(z_t, t) with `params`, sg f(z_r, r) with `target_params`): the
  student at the noisier time t and the target at r < t, both on the path
  of the same (x, e), with the same labels and the same dropout key."""
  x, e = batch["x"], draws["e"]
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  extras = common.model_extras(u_fn, batch, draws)
  z_t, _ = common.interpolate(x, e, t)
  z_r, _ = common.interpolate(x, e, r)
  student = consistency_fn(u_fn, params, z_t, t, y, True, **extras)
  target = consistency_fn(u_fn, target_params, z_r, r, y, True, **extras)
  return student, jax.lax.stop_gradient(target)
