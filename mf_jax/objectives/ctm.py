"""Consistency trajectory models, CTM (Kim et al., ICLR 2024), distilled.

The network is a flow map: G(z_t, t, s) = z_t - (t - s) u(z_t, t, h = t - s)
jumps from any t to any s <= t (MeanFlow's average velocity is exactly
this Euler-form map). On a Karras grid of N levels, per step:

  k ~ p(k) proportional to k^m over 1..K, one k per step (the official
      'weighted' Heun-step strategy);
  t = level a, u = level a - k, s = a level in [0, a - k], a, s uniform;
  estimate = f_tgt(G_theta(z_t, t, s), s)
  target   = sg f_tgt(G_inner(z_u, u, s), s),  z_u = k teacher Heun steps
             from z_t along the grid (2k teacher calls, cd.teacher_step);
  loss = d(estimate, target) + lambda_DSM ||u_theta(z', t', 0) - (e' - x)||^2

f_tgt(z, s) = z - s u_tgt(z, s, h = s) is the target network's jump to
data: its parameters are frozen (an EMA of the online ones at rate mu,
0.999 as the official `target_ema_mode=fixed`) but the estimate's gradient
flows through its input, as in the official code (outer type
'target_model_sg'). G_inner is the target network (`ctm_target_inner=
'target'`, the paper's theta^-) or the online one under stop-gradient
('student', sony/ctm's default `ctm_target_inner_type='model_sg'`). The
second term is CTM's denoising score matching in this codebase's form, flow
matching at h = 0 on fresh times t' (the shared `time_sampler`) and noise
e': the map at s = t is the velocity.

Times: the grid and its indices are in EDM's sigma as in sony/ctm; each
sigma becomes t = sigma / (1 + sigma) at the networks (consistency.py).
The official outer jump goes to sigma_min; here it goes to t = 0, where
f(z, 0) = z holds exactly. `ctm_solver='flow_map'` replaces the k Heun
steps by one jump of a flow-map teacher (exact for an exact teacher; the
tests use it).

Left out: the GAN term (a discriminator on frozen feature networks, the
paper's last stage), LPIPS (metrics here are "l2", squared error summed
over dimensions, or iCT's "pseudo_huber"), and the adaptive balancing of
the DSM term by gradient norms at the last layer (a fixed
`ctm_dsm_weight` instead). Defaults otherwise follow sony/ctm's CIFAR-10
settings: N = 18, K = 17, m = 1, sigma in [0.002, 80], rho = 7, mu = 0.999.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import cd
from mf_jax.objectives import common
from mf_jax.objectives import consistency
from mf_jax.objectives import time_samplers

SAMPLER = "flow_map"
# What it learns from beside the data (tools/compare.py provides it).
LEARNS_FROM = "teacher"
TARGET_INNER = ("target", "student")

CONFIG = dict(
    ctm_num_scales=18,  # N, levels of the Karras grid
    ctm_heun_steps=17,  # K, the most teacher steps from t to u (<= N - 1)
    ctm_heun_multiplier=1.0,  # p(k) proportional to k^m
    ctm_mu=0.999,  # target EMA rate
    ctm_sigma_min=0.002,
    ctm_sigma_max=80.0,
    ctm_rho=7.0,
    ctm_solver="heun",  # the teacher's steps: "heun", "euler", "flow_map"
    ctm_target_inner="target",  # the jump u -> s: "target" or "student"
    ctm_metric="l2",  # or "pseudo_huber"
    ctm_huber_c=-1.0,  # pseudo-Huber c; < 0: 0.00054 sqrt(dimensions)
    ctm_dsm_weight=1.0,  # weight of the flow-matching (DSM) term
)


def _grid(settings):
  return settings.ctm_sigma_min, settings.ctm_sigma_max, settings.ctm_rho


def validate(config):
  cd.require_teacher(config)
  s = config.objective
  consistency.validate_grid("ctm", *_grid(s))
  n, k = s.ctm_num_scales, s.ctm_heun_steps
  if not (isinstance(n, int) and isinstance(k, int) and 1 <= k < n):
    raise ValueError(
        f"objective.ctm_heun_steps={k!r} and ctm_num_scales={n!r} must be "
        "integers with 1 <= heun_steps < num_scales (t and u = t - k "
        "levels both on the grid).")
  if not 0 <= s.ctm_mu < 1:
    raise ValueError(f"objective.ctm_mu={s.ctm_mu!r} must be in [0, 1) (the "
                     "target network's EMA rate).")
  if s.ctm_dsm_weight < 0:
    raise ValueError(f"objective.ctm_dsm_weight={s.ctm_dsm_weight!r} must be "
                     ">= 0.")
  cd.validate_choice("ctm_solver", s.ctm_solver, cd.SOLVERS)
  cd.validate_choice("ctm_target_inner", s.ctm_target_inner, TARGET_INNER)
  cd.validate_choice("ctm_metric", s.ctm_metric, cd.METRICS)


def target_decay(step, settings, num_steps: int):
  del step, num_steps
  return jnp.float32(settings.ctm_mu)


def heun_step_probs(settings) -> jax.Array:
  """p(k), k = 1..K, proportional to k^m."""
  k = jnp.arange(1, settings.ctm_heun_steps + 1, dtype=jnp.float32)
  weights = k ** settings.ctm_heun_multiplier
  return weights / jnp.sum(weights)


def draw(rng, batch, config, num_classes, context=None):
  """k (one per step), the levels a of t and b <= a - k of s (ascending
  indices), noise, dropped rows, dropout key, and the DSM term's t', e'."""
  del context
  x = batch["x"]
  size = x.shape[:1]
  rng_k, rng_a, rng_b, rng_dsm_t, rng_dsm_e, rng_rest = jax.random.split(
      rng, 6)
  n = config.ctm_num_scales
  k = 1 + jax.random.categorical(rng_k, jnp.log(heun_step_probs(config)))
  a = jax.random.randint(rng_a, size, k, n)
  b = jnp.floor(jax.random.uniform(rng_b, size) * (a - k + 1)).astype(
      jnp.int32)
  return {"k": k.astype(jnp.int32), "level_t": a, "level_s": b,
          "dsm_t": time_samplers.sample_time(rng_dsm_t, size, config),
          "dsm_e": jax.random.normal(rng_dsm_e, x.shape, x.dtype),
          **consistency.draw_noise_labels_dropout(rng_rest, batch, config,
                                                  num_classes)}


def time_of_level(level, settings):
  """The mf_jax time of ascending grid level `level` (traced)."""
  n = settings.ctm_num_scales
  return consistency.sigma_to_t(
      consistency.karras_sigma(level.astype(jnp.float32), n, *_grid(settings)))


def teacher_path(teacher, settings, z, level_t, k, y):
  """z at level t - k from z at level t: k teacher steps along the grid
  ('flow_map': one jump)."""
  if settings.ctm_solver == "flow_map":
    return cd.teacher_step(teacher, "flow_map", z, time_of_level(level_t,
                                                                 settings),
                           time_of_level(level_t - k, settings), y)

  def step(j, z):
    t = time_of_level(level_t - j, settings)
    r = time_of_level(level_t - j - 1, settings)
    return cd.teacher_step(teacher, settings.ctm_solver, z, t, r, y)

  return jax.lax.fori_loop(0, k, step, z)


def jump(u_fn, params, z, t, s, y, extras):
  """G(z_t, t, s) = z_t - (t - s) u(z_t, t, h = t - s)."""
  return z - common.broadcast_to(t - s, z) * u_fn(params, z, t, t - s, y,
                                                  True, **extras)


def terms(u_fn, params, batch, draws, config, num_classes, context) -> dict:
  """Every intermediate of the loss, deterministic given `draws`."""
  x, e = batch["x"], draws["e"]
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  extras = common.model_extras(u_fn, batch, draws)
  level_t, k = draws["level_t"], draws["k"]
  t = time_of_level(level_t, config)
  u = time_of_level(level_t - k, config)
  s = time_of_level(draws["level_s"], config)
  z_t, _ = common.interpolate(x, e, t)
  z_u = jax.lax.stop_gradient(
      teacher_path(context.teacher, config, z_t, level_t, k, y))

  target_params = jax.lax.stop_gradient(context.target_params)
  to_data = lambda z: consistency.consistency_fn(
      u_fn, target_params, z, s, y, True, **extras)
  estimate = to_data(jump(u_fn, params, z_t, t, s, y, extras))
  inner = (target_params if config.ctm_target_inner == "target"
           else jax.lax.stop_gradient(params))
  target = jax.lax.stop_gradient(
      to_data(jump(u_fn, inner, z_u, u, s, y, extras)))

  t_dsm = draws["dsm_t"]
  z_dsm, v_dsm = common.interpolate(x, draws["dsm_e"], t_dsm)
  v_pred = u_fn(params, z_dsm, t_dsm, jnp.zeros_like(t_dsm), y, True,
                **extras)
  return {"t": t, "u": u, "s": s, "z_t": z_t, "z_u": z_u,
          "estimate": estimate, "target": target,
          "dsm_sq_error": common.per_sample_sq_error(v_pred, v_dsm)}


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics)."""
  out = terms(u_fn, params, batch, draws, config, num_classes, context)
  ctm_b = cd.distance(out["estimate"], out["target"], config.ctm_metric,
                      config.ctm_huber_c, batch["x"].shape)
  dsm = jnp.mean(out["dsm_sq_error"])
  value = jnp.mean(ctm_b) + config.ctm_dsm_weight * dsm
  return value, {
      "loss": value,
      "ctm": jnp.mean(ctm_b),
      "dsm": dsm,
      "mse": jnp.mean(common.per_sample_sq_error(out["estimate"],
                                                 out["target"])),
      "v_mse": dsm,
      "heun_steps": draws["k"].astype(jnp.float32),
  }
