"""Consistency training, CT (Song, Dhariwal, Chen & Sutskever, 2023).

The network's consistency function f(z_t, t) = z_t - t u(z_t, t, h = t)
(consistency.py) is trained to agree with itself between adjacent noise
levels of a Karras grid, on the path of the same data x and noise e:

  loss = d(f_theta(z at sigma_{i+1}), sg f_target(z at sigma_i)),

i ~ U{0, ..., N(k) - 2}, with the target network an EMA of the online
parameters at rate mu(k). N(k) and mu(k) grow over training (CT's
"adaptive" curricula, `consistency.ct_num_scales` / `ct_target_decay`). The
grid and the curricula are in EDM's sigma; each sigma becomes the time
t = sigma / (1 + sigma) at the network (z_t = (1 - t) x + t e is EDM's
x + sigma e scaled by 1 - t; f's output is x in both conventions, so the
loss is the paper's). The student and the target share the dropout key.

Defaults are the official CIFAR-10 CT config
(openai/consistency_models_cifar10, configs/cifar10_ve_ct_adaptive.py):
s0 = 2, s1 = 150, mu0 = 0.9, sigma in [0.002, 80], rho = 7, uniform
weighting. Metrics: `ct_metric` "l2" (squared error summed over dimensions,
as every objective here; the official code averages it, a constant factor)
or "pseudo_huber" (iCT's, c = `ct_huber_c`, < 0 meaning 0.00054 sqrt(D)).
The paper's best CT runs used LPIPS, which mf_jax does not have.

The target's EMA is tuned for the paper's 800k steps: mu(k) reaches
0.9986 at N = 151, a horizon of ~700 steps, 0.09 % of that run. On a run
of a few thousand steps the same rate holds the target ~700 steps behind
the student, a large share of the run, and CT does not learn: digits at
2,000 steps, 1-NFE class accuracy 12 % (FD 513) with mu0 = 0.9, 42 %
with mu0 = 0.02 (mu ending at 0.95), 96 % (FD 14.7) with mu0 = 0, the
online network as target (iCT's finding that the EMA target hurts). So the
short configs (toy2d, digits) set ct_mu0 = 0; the default stays the paper's.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import consistency

SAMPLER = "consistency"
METRICS = ("l2", "pseudo_huber")

CONFIG = dict(
    ct_s0=2,  # grid intervals at the start of training
    ct_s1=150,  # ... and at the end
    ct_mu0=0.9,  # target EMA rate at the start (mu(k) grows from it)
    ct_sigma_min=0.002,
    ct_sigma_max=80.0,
    ct_rho=7.0,
    ct_metric="l2",  # or "pseudo_huber"
    ct_huber_c=-1.0,  # pseudo-Huber c; < 0: 0.00054 sqrt(dimensions)
)


def _grid(settings):
  return settings.ct_sigma_min, settings.ct_sigma_max, settings.ct_rho


def validate(config):
  s = config.objective
  consistency.validate_curriculum("ct", s.ct_s0, s.ct_s1)
  consistency.validate_grid("ct", *_grid(s))
  if not 0 <= s.ct_mu0 < 1:
    raise ValueError(f"objective.ct_mu0={s.ct_mu0!r} must be in [0, 1) "
                     "(the target EMA rate at the start).")
  if s.ct_metric not in METRICS:
    raise ValueError(f"Unknown objective.ct_metric {s.ct_metric!r}; "
                     f"valid: {METRICS}.")


def num_scales(step, settings, num_steps: int):
  """N(k), the grid's points at step k."""
  return consistency.ct_num_scales(step, num_steps, settings.ct_s0,
                                   settings.ct_s1)


def target_decay(step, settings, num_steps: int):
  """mu(k): the train state's target_params follow the online parameters
  at this EMA rate (objectives.make_target_update)."""
  return consistency.ct_target_decay(step, num_steps, settings.ct_s0,
                                     settings.ct_s1, settings.ct_mu0)


def draw(rng, batch, config, num_classes, context):
  """The pair's noise levels (sigma_i, sigma_{i+1}) of the grid at the
  step's N(k), one noise e for both, dropped rows and the dropout key."""
  rng_index, rng_rest = jax.random.split(rng)
  n = num_scales(context.step, config, context.num_steps)
  i = consistency.sample_uniform_index(rng_index, batch["x"].shape[:1], n)
  grid = _grid(config)
  return {"sigma": consistency.karras_sigma(i + 1, n, *grid),
          "sigma_next": consistency.karras_sigma(i, n, *grid),
          **consistency.draw_noise_labels_dropout(rng_rest, batch, config,
                                                  num_classes)}


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics). `draws['sigma']` is the student's
  (larger) level, `draws['sigma_next']` the target's."""
  t = consistency.sigma_to_t(draws["sigma"])
  r = consistency.sigma_to_t(draws["sigma_next"])
  student, target = consistency.pair(u_fn, params, context.target_params,
                                     batch, draws, num_classes, t, r)
  sq_error_b = common.per_sample_sq_error(student, target)
  if config.ct_metric == "l2":
    distance_b = sq_error_b
  else:
    distance_b = consistency.pseudo_huber(
        student, target, consistency.huber_c(config.ct_huber_c,
                                             batch["x"].shape))
  value = jnp.mean(distance_b)
  n = num_scales(context.step, config, context.num_steps)
  return value, {"loss": value, "mse": jnp.mean(sq_error_b),
                 "num_scales": n.astype(jnp.float32),
                 "target_decay": target_decay(context.step, config,
                                              context.num_steps)}
