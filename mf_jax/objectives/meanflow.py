"""MeanFlow (Geng et al., 2025): regress the average velocity u(z_t, r, t).

The MeanFlow identity u = v - (t - r) du/dt gives the target; du/dt is the
total derivative along the trajectory, one `jax.jvp` with tangents (v, 0, 1)
for (z, r, t). Its primal output is the prediction itself, so the step costs
one forward + JVP and one backward pass.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import guidance
from mf_jax.objectives import time_samplers

SAMPLER = "flow_map"
JVP_TANGENTS = ("v,0,1", "v,0,0", "v,1,0", "v,1,1")


def parse_tangent(spec: str) -> tuple[float, float]:
  """'v,0,1' -> tangent scales of (r, t); the paper's ablation variants."""
  if spec not in JVP_TANGENTS:
    raise ValueError(f"Unknown objective.jvp_tangent {spec!r}; valid: "
                     f"{JVP_TANGENTS} (tangents of z, r, t).")
  _, dr, dt = spec.split(",")
  return float(dr), float(dt)


def validate(config):
  parse_tangent(config.objective.jvp_tangent)


def u_and_dudt(u_fn, params, z, r, t, y, v, tangent=(0.0, 1.0), **extras):
  """u(z, r, t) and its total derivative du/dt along the trajectory.

  du/dt = v . d_z u + d_t u is the derivative along the path through z with
  velocity v and r fixed: one `jax.jvp` whose tangents for (z, r, t) are
  (v, tangent[0], tangent[1]); (v, 0, 1) is the correct one. Since the
  network sees h = t - r, the derivative flows through both t and h.
  `extras` (dropout rng, augmentation labels) go to u_fn unchanged: one
  dropout mask serves the primal and the tangent.
  """
  def u_of(z, r, t):
    return u_fn(params, z, t, t - r, y, True, **extras)

  dr, dt = tangent
  ones = jnp.ones_like(t)
  return jax.jvp(u_of, (z, r, t), (v, dr * ones, dt * ones))


def prediction_and_target(u_fn, params, z, r, t, y, v, tangent=(0.0, 1.0),
                          **extras):
  """u(z, r, t) and the MeanFlow target sg(v - (t - r) du/dt)."""
  u, dudt = u_and_dudt(u_fn, params, z, r, t, y, v, tangent, **extras)
  u_target = v - common.broadcast_to(t - r, z) * dudt
  return u, jax.lax.stop_gradient(u_target)


def draw(rng, batch, config, num_classes, context=None):
  """The step's random draws: times (t, r), noise e, dropped label rows,
  and the network's dropout key. Everything random in the loss is here."""
  del context
  x = batch["x"]
  rng_tr, rng_e, rng_drop = jax.random.split(rng, 3)
  t, r = time_samplers.sample_t_r(rng_tr, x.shape[0], config)
  return {"t": t, "r": r, "e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": common.draw_dropped(rng_drop, batch["y"], num_classes,
                                         config.class_dropout),
          "dropout": common.dropout_rng(rng)}


def terms(u_fn, params, batch, draws, config, num_classes,
          context=None) -> dict:
  """Every intermediate of the loss, deterministic given `draws`.

  z_t and v from the draws; the guided velocity v_g (label-dropped rows keep
  the unguided v: they learn the unconditional field); u and du/dt along
  v_g; the target sg(v_g - (t - r) du/dt) and the per-sample squared error.
  Distillation: with a teacher (objective.teacher) v is its velocity at
  h = 0 instead of e - x, the conditional velocity's mean given z_t (lower
  variance targets); dropped rows ask it with the null label.
  """
  t, r, dropped = draws["t"], draws["r"], draws["dropped"]
  z, v = common.interpolate(batch["x"], draws["e"], t)
  if context is not None and context.teacher is not None:
    v = context.teacher(z, t, jnp.zeros_like(t), common.drop_labels(
        batch["y"], dropped, num_classes))
  v_g = guidance.guided_velocity(u_fn, params, z, t, batch["y"], v, config,
                                 num_classes)
  v_g = jnp.where(common.broadcast_to(dropped, v), v, v_g)
  y = common.drop_labels(batch["y"], dropped, num_classes)
  u, dudt = u_and_dudt(u_fn, params, z, r, t, y, v_g,
                       parse_tangent(config.jvp_tangent),
                       **common.model_extras(u_fn, batch, draws))
  u_target = jax.lax.stop_gradient(
      v_g - common.broadcast_to(t - r, z) * dudt)
  return {"z": z, "v": v, "v_g": v_g, "y": y, "u": u, "dudt": dudt,
          "u_target": u_target,
          "sq_error": common.per_sample_sq_error(u, u_target)}


def loss(u_fn, params, batch, draws, config, num_classes, context=None):
  """Returns (scalar loss, metrics) for one batch {'x', 'y'}."""
  out = terms(u_fn, params, batch, draws, config, num_classes, context)
  value, weight_b = common.adaptive_weighted_loss(
      out["sq_error"], config.adaptive_p, config.adaptive_eps)
  return value, {
      "loss": value,
      "mse": jnp.mean(out["sq_error"]),
      "v_mse": jnp.mean(common.per_sample_sq_error(out["u"], out["v"])),
      "weight": jnp.mean(weight_b),
  }
