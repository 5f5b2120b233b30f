"""Improved consistency training, iCT (Song & Dhariwal, ICLR 2024).

CT (ct.py) with the paper's changes:
- no EMA target: the target is the online network under stop-gradient
  (sg(theta); the train state keeps no target_params);
- pseudo-Huber metric d = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(D)
  (`ict_huber_c` < 0), instead of LPIPS;
- weight lambda = 1 / (sigma_{i+1} - sigma_i);
- pair index i from the lognormal(P_mean = -1.1, P_std = 2.0) mass between
  the pair's levels (`consistency.lognormal_index_probs`) instead of uniform;
- step-doubling curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1 with
  K' = floor(K / (log2 floor(s1 / s0) + 1)), s0 = 10, s1 = 1280.

  loss = lambda(sigma_i) d(f_theta(z at sigma_{i+1}), sg f_theta(z at sigma_i))

As in ct.py, the grid, the index distribution and the weight are in EDM's
sigma, each sigma becomes t = sigma / (1 + sigma) at the network, and the
student and the target share the noise e and the dropout key (the paper:
"the random number generators for dropout share the same states across the
student and teacher networks"). There is no official code; the formulas
are the paper's (method_family.md §4), with its sign of P_mean (-1.1).
The paper's network changes (Fourier scale 0.02 for NCSN++, dropout 0.3 on
CIFAR-10) are model settings (configs/cifar10_ict.py).
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import consistency

SAMPLER = "consistency"

CONFIG = dict(
    ict_s0=10,  # grid intervals at the start (doubled in stages)
    ict_s1=1280,  # ... at most
    ict_sigma_min=0.002,
    ict_sigma_max=80.0,
    ict_rho=7.0,
    ict_p_mean=-1.1,  # lognormal index distribution over ln(sigma)
    ict_p_std=2.0,
    ict_huber_c=-1.0,  # < 0: 0.00054 sqrt(dimensions), the paper's
)


def _grid(settings):
  return settings.ict_sigma_min, settings.ict_sigma_max, settings.ict_rho


def validate(config):
  s = config.objective
  consistency.validate_curriculum("ict", s.ict_s0, s.ict_s1)
  consistency.validate_grid("ict", *_grid(s))
  if not s.ict_p_std > 0:
    raise ValueError(f"objective.ict_p_std={s.ict_p_std!r} must be > 0.")


def num_scales(step, settings, num_steps: int):
  """N(k), the grid's points at step k."""
  return consistency.ict_num_scales(step, num_steps, settings.ict_s0,
                                    settings.ict_s1)


def draw(rng, batch, config, num_classes, context):
  """The pair's levels (sigma_{i+1}, sigma_i), i lognormal over the grid of
  the step's N(k); one noise e for both, dropped rows and the dropout key."""
  rng_index, rng_rest = jax.random.split(rng)
  n = num_scales(context.step, config, context.num_steps)
  grid = _grid(config)
  i = consistency.sample_lognormal_index(
      rng_index, batch["x"].shape[:1], n, config.ict_s1, *grid,
      config.ict_p_mean, config.ict_p_std)
  return {"sigma": consistency.karras_sigma(i + 1, n, *grid),
          "sigma_next": consistency.karras_sigma(i, n, *grid),
          **consistency.draw_noise_labels_dropout(rng_rest, batch, config,
                                                  num_classes)}


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics): mean of lambda d(student, target)."""
  sigma, sigma_next = draws["sigma"], draws["sigma_next"]
  student, target = consistency.pair(
      u_fn, params, params, batch, draws, num_classes,
      consistency.sigma_to_t(sigma), consistency.sigma_to_t(sigma_next))
  c = consistency.huber_c(config.ict_huber_c, batch["x"].shape)
  distance_b = consistency.pseudo_huber(student, target, c)
  weight_b = 1.0 / (sigma - sigma_next)
  value = jnp.mean(weight_b * distance_b)
  return value, {
      "loss": value,
      "mse": jnp.mean(common.per_sample_sq_error(student, target)),
      "weight": jnp.mean(weight_b),
      "num_scales": num_scales(context.step, config,
                               context.num_steps).astype(jnp.float32)}
