"""alpha-Flow (Zhang et al., 2025): from trajectory flow matching to MeanFlow.

The network is MeanFlow's average velocity u(z_t, t, h = t - r). Each r < t
row regresses the alpha-interpolated target

  u_tgt = alpha v_g + (1 - alpha) u(z', t - Delta, h = t - Delta - r),
  z' = z_t - Delta v_g,  Delta = alpha (t - r),

(stop-gradient): one Euler step of length Delta along the (guided)
conditional velocity, then the network's own jump over the rest of [r, t].
alpha = 1 is trajectory flow matching (u_tgt = v_g, whose minimiser is the
instantaneous velocity for every h); alpha -> 0 is MeanFlow, and once the
curriculum brings alpha below `alpha_clamp` the exact MeanFlow target
v_g - (t - r) du/dt (one JVP) takes over, as in the official code. For
0 < alpha < 1 the fixed point is not the exact average velocity: the first
step is Euler, so the target is consistent only up to O(Delta^2); the
curriculum exists to end at alpha = 0.

alpha follows the official sigmoid curriculum over training steps
(`get_ratio` in snap-research/alphaflow src/training/loss.py):
alpha(k) = a0 + (a1 - a0) sigmoid(gamma (k - mid) / (k1 - k0)) on
[k0, k1], a0 before and a1 after, snapped to 0 (1) within `alpha_clamp` of
0 (1). Rows with 0 < alpha weigh alpha in the loss (the official weight);
r = t rows are flow matching (share 1 - fraction_r_neq_t, the official
`ratio_fm`).

Differences from the official code, by design: classifier-free guidance in
training is MeanFlow's (guidance.py; label-dropped rows keep the unguided
v), where the official code drops labels inside the guidance interval and
keeps their guided velocity; the adaptive weight is MeanFlow's (sum over
dimensions, 1 / sg(err + eps)^p) where the official divides the mean over
dimensions by (mean + eps); times are MeanFlow's sampler.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import guidance
from mf_jax.objectives import meanflow

SAMPLER = "flow_map"
SCHEDULES = ("sigmoid", "constant")

CONFIG = dict(
    alpha_schedule="sigmoid",  # or "constant" (alpha_initial throughout)
    alpha_initial=1.0,
    alpha_final=0.0,
    alpha_start_step=0,  # the transition [start, end] of the curriculum
    alpha_end_step=-1,  # -1: training.num_steps
    alpha_gamma=25.0,
    alpha_clamp=0.005,  # alpha below it is 0 (exact MeanFlow), above 1-it 1
    alpha_clip_target=0.0,  # |u_tgt| clip for 0 < alpha < 1 (0: off)
)


def end_step(settings, num_steps: int) -> int:
  """The curriculum's last step; alpha_end_step = -1 means num_steps."""
  return num_steps if settings.alpha_end_step < 0 else settings.alpha_end_step


def validate(config):
  settings = config.objective
  meanflow.validate(config)
  if settings.alpha_schedule not in SCHEDULES:
    raise ValueError(f"Unknown objective.alpha_schedule "
                     f"{settings.alpha_schedule!r}; valid: {SCHEDULES}.")
  start = settings.alpha_start_step
  end = end_step(settings, config.training.num_steps)
  if settings.alpha_schedule == "sigmoid" and not 0 <= start < end:
    raise ValueError(f"objective.alpha_start_step ({start}) must be >= 0 and "
                     f"before alpha_end_step ({end}).")
  if end > config.training.num_steps:
    raise ValueError(
        f"objective.alpha_end_step={end} is after training.num_steps="
        f"{config.training.num_steps}: the curriculum would never reach "
        "alpha_final; lower it or raise num_steps.")


def alpha_at(step, settings, end: int) -> jax.Array:
  """The curriculum's alpha at training step `step` (traced or not)."""
  a0, a1 = settings.alpha_initial, settings.alpha_final
  if settings.alpha_schedule == "constant":
    alpha = jnp.float32(a0)
  else:
    start = settings.alpha_start_step
    middle = start + (end - start) / 2
    progress = (step - middle) / (end - start)
    alpha = a0 + (a1 - a0) * jax.nn.sigmoid(settings.alpha_gamma * progress)
    alpha = jnp.where(step < start, a0, jnp.where(step > end, a1, alpha))
  clamp = settings.alpha_clamp
  return jnp.where(alpha < clamp, 0.0,
                   jnp.where(alpha > 1 - clamp, 1.0, alpha))


def draw(rng, batch, config, num_classes, context=None):
  """MeanFlow's draws (t, r, e, dropped rows, dropout key)."""
  return meanflow.draw(rng, batch, config, num_classes, context)


def target(u_fn, params, z, t, r, y, v_g, alpha, config, extras):
  """sg(u_tgt) for every row; r = t rows get v_g whatever alpha is.

  One of three computations runs (lax.switch on alpha): alpha = 1 needs
  no network call, 0 < alpha < 1 one forward pass at z', alpha = 0 one JVP.
  """
  r_below = common.broadcast_to(r < t, z)

  def trajectory():
    return v_g

  def interpolated():
    delta = alpha * (t - r)
    z_mid = z - common.broadcast_to(delta, z) * v_g
    u_rest = u_fn(params, z_mid, t - delta, (1 - alpha) * (t - r), y, True,
                  **extras)
    u_tgt = alpha * v_g + (1 - alpha) * u_rest
    if config.alpha_clip_target:
      u_tgt = jnp.clip(u_tgt, -config.alpha_clip_target,
                       config.alpha_clip_target)
    return jnp.where(r_below, u_tgt, v_g)

  def exact_meanflow():
    _, dudt = meanflow.u_and_dudt(u_fn, params, z, r, t, y, v_g,
                                  meanflow.parse_tangent(config.jvp_tangent),
                                  **extras)
    return v_g - common.broadcast_to(t - r, z) * dudt

  branch = jnp.where(alpha >= 1, 0, jnp.where(alpha > 0, 1, 2))
  return jax.lax.stop_gradient(jax.lax.switch(
      branch, (trajectory, interpolated, exact_meanflow)))


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics); alpha comes from `context.step`."""
  t, r, dropped = draws["t"], draws["r"], draws["dropped"]
  alpha = alpha_at(context.step, config,
                   end_step(config, context.num_steps))
  z, v = common.interpolate(batch["x"], draws["e"], t)
  v_g = guidance.guided_velocity(u_fn, params, z, t, batch["y"], v, config,
                                 num_classes)
  v_g = jnp.where(common.broadcast_to(dropped, v), v, v_g)
  y = common.drop_labels(batch["y"], dropped, num_classes)
  extras = common.model_extras(u_fn, batch, draws)
  u_tgt = target(u_fn, params, z, t, r, y, v_g, alpha, config, extras)
  u = u_fn(params, z, t, t - r, y, True, **extras)

  sq_error_b = common.per_sample_sq_error(u, u_tgt)
  _, weight_b = common.adaptive_weighted_loss(
      sq_error_b, config.adaptive_p, config.adaptive_eps)
  weight_b *= jnp.where((r < t) & (alpha > 0), alpha, 1.0)
  value = jnp.mean(weight_b * sq_error_b)
  return value, {
      "loss": value, "mse": jnp.mean(sq_error_b),
      "v_mse": jnp.mean(common.per_sample_sq_error(u, v_g)),
      "weight": jnp.mean(weight_b), "alpha": alpha}
