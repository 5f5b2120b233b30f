"""Align Your Flow (Sabour, Fidler & Kreis, 2025): flow-map distillation.

The student is a flow map in Euler form, f(z_t, t, s) = z_t - (t - s)
u(z_t, t, h = t - s), s <= t (the paper's x_t + (s - t) F with F = u in this
codebase's time, t = 1 noise, t = 0 data). A frozen teacher's velocity
v(z, t) = teacher(z, t, h = 0, y) defines the trajectories it must follow;
two continuous-time losses make f consistent with them (`ayf_loss`):

- EMD (Eulerian): f(z_t, t, s) is constant as (z_t, t) moves along the
  teacher's trajectory with s fixed, d/dt f = 0, i.e.
    R = u - v(z_t, t) + (t - s) du/dt,  du/dt = v . d_z u + d_t u
  (one JVP with tangents (v, 1) on (z, t); h = t - s moves with t). It is
  the MeanFlow identity with the teacher's velocity in place of e - x:
  s = 0 is continuous-time consistency distillation, s -> t flow matching
  on the teacher.
- LMD (Lagrangian): the endpoint f(z_t, t, s) moves with the teacher's
  velocity as s moves, d/ds f = v(f, s), i.e.
    R = u - v(f(z_t, t, s), s) - (t - s) du/ds
  (one JVP with tangent 1 on s; the teacher is asked at the predicted
  point). At s = t it is flow matching on the teacher too.

Both are trained as sCM trains (Lu & Song, 2024; the paper's "tangent
warm-up and normalisation"): the self-derivative term is scaled by
r = min(1, step / ayf_warmup_steps) (sct.warmup), the residual
g = sg(u) - v(...) +- r (t - s) sg(du/d.) is normalised per sample,
g / (||g|| + c), and the loss ||u - sg(u - g)||^2 has gradient 2 g du/dtheta:
the Eulerian / Lagrangian pseudo-gradient. Weights are uniform.

Autoguidance: with `objective.teacher_weak=FILE` (a weaker checkpoint of
the teacher, e.g. one exported early in its run) the teacher's velocity is
v = lam v_teacher + (1 - lam) v_weak, lam ~ U[ayf_guidance_min,
ayf_guidance_max] per sample (default U[1, 3], as the paper). The paper
feeds lam to the student as a condition; the backbone u(z, t, h, y) has no
such input here, and the residual is linear in v, so drawing lam at random
trains, in expectation, the guided flow at E[lam] (2 by default) with more
variance; a range of one point (min = max) fixes the scale. Without
teacher_weak the teacher is used as is (its own `teacher_cfg_scale`
applies either way).

Times (t, s): MeanFlow's joint sampler (time_samplers.sample_t_r) on the
shared `time_sampler` fields, with a share `ayf_fraction_s_neq_t` of rows
with s < t; the others have s = t (flow matching on the teacher). The
paper's time distribution and weighting w(t, s) were not available to us
(no official training code): these, the fraction and the warm-up length
are our choices. Left out: the adversarial fine-tuning stage.
"""

import types

import jax
import jax.numpy as jnp

from mf_jax.objectives import cd
from mf_jax.objectives import common
from mf_jax.objectives import meanflow
from mf_jax.objectives import sct
from mf_jax.objectives import time_samplers

SAMPLER = "flow_map"
# What it learns from beside the data (tools/compare.py provides it).
LEARNS_FROM = "teacher"
LOSSES = ("emd", "lmd")

CONFIG = dict(
    ayf_loss="emd",  # "emd" (Eulerian) or "lmd" (Lagrangian)
    ayf_fraction_s_neq_t=0.75,  # share of rows with s < t (others s = t)
    ayf_warmup_steps=10_000,  # tangent warm-up r = min(1, step / this)
    ayf_tangent_c=0.1,  # g / (||g|| + c)
    ayf_guidance_min=1.0,  # autoguidance scale lam ~ U[min, max] ...
    ayf_guidance_max=3.0,  # ... used when objective.teacher_weak is set
    # A weaker checkpoint of the teacher (an export) for autoguidance.
    teacher_weak="",
)


def validate(config):
  cd.require_teacher(config)
  s = config.objective
  cd.validate_choice("ayf_loss", s.ayf_loss, LOSSES)
  if not 0 <= s.ayf_fraction_s_neq_t <= 1:
    raise ValueError(f"objective.ayf_fraction_s_neq_t="
                     f"{s.ayf_fraction_s_neq_t!r} must be in [0, 1].")
  if s.ayf_tangent_c < 0:
    raise ValueError(f"objective.ayf_tangent_c={s.ayf_tangent_c!r} must be "
                     ">= 0.")
  if not 0 <= s.ayf_warmup_steps < max(config.training.num_steps, 1):
    raise ValueError(
        f"objective.ayf_warmup_steps={s.ayf_warmup_steps} must be >= 0 and "
        f"below training.num_steps={config.training.num_steps}, or the "
        "tangent warm-up never finishes; lower it.")
  if not s.ayf_guidance_min <= s.ayf_guidance_max:
    raise ValueError(
        f"objective.ayf_guidance_min={s.ayf_guidance_min!r} must be <= "
        f"ayf_guidance_max={s.ayf_guidance_max!r} (the autoguidance range).")


def _time_settings(config):
  """The shared time sampler with AYF's share of s < t rows."""
  return types.SimpleNamespace(
      time_sampler=config.time_sampler, time_mean=config.time_mean,
      time_std=config.time_std, fraction_r_neq_t=config.ayf_fraction_s_neq_t)


def draw(rng, batch, config, num_classes, context=None):
  """Times (t, s <= t), noise, dropped rows, the autoguidance scale lam and
  the dropout key."""
  del context
  x = batch["x"]
  rng_ts, rng_e, rng_drop, rng_lam = jax.random.split(rng, 4)
  t, s = time_samplers.sample_t_r(rng_ts, x.shape[0], _time_settings(config))
  return {"t": t, "s": s, "e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": common.draw_dropped(rng_drop, batch["y"], num_classes,
                                         config.class_dropout),
          "guidance": jax.random.uniform(
              rng_lam, (x.shape[0],), minval=config.ayf_guidance_min,
              maxval=config.ayf_guidance_max),
          "dropout": common.dropout_rng(rng)}


def teacher_velocity(context, z, t, y, guidance):
  """sg of the teacher's velocity at (z, t), autoguided by the weak one
  (lam v + (1 - lam) v_weak) when the context has it."""
  h = jnp.zeros_like(t)
  v = context.teacher(z, t, h, y)
  if context.teacher_weak is not None:
    v_weak = context.teacher_weak(z, t, h, y)
    v = v_weak + common.broadcast_to(guidance, v) * (v - v_weak)
  return jax.lax.stop_gradient(v)


def normalized(g, c: float):
  """g / (||g|| + c) per sample, and ||g||."""
  norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=-1))
  return g / common.broadcast_to(norm + c, g), norm


def residual(u_fn, params, batch, draws, config, num_classes, context):
  """u, the (unnormalised) residual g of the chosen loss and its pieces."""
  t, s = draws["t"], draws["s"]
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  extras = common.model_extras(u_fn, batch, draws)
  z, _ = common.interpolate(batch["x"], draws["e"], t)
  r = sct.warmup(context.step, config.ayf_warmup_steps)
  gap = common.broadcast_to(t - s, z)
  out = {"z": z, "y": y, "warmup": r}
  if config.ayf_loss == "emd":
    v = teacher_velocity(context, z, t, y, draws["guidance"])
    u, dudt = meanflow.u_and_dudt(u_fn, params, z, s, t, y, v, (0.0, 1.0),
                                  **extras)
    u_sg, dudt = jax.lax.stop_gradient((u, dudt))
    g = (u_sg - v) + r * gap * dudt
    out.update(v=v, dudt=dudt)
  else:
    u, duds = meanflow.u_and_dudt(u_fn, params, z, s, t, y,
                                  jnp.zeros_like(z), (1.0, 0.0), **extras)
    u_sg, duds = jax.lax.stop_gradient((u, duds))
    f = z - gap * u_sg
    v_end = teacher_velocity(context, f, s, y, draws["guidance"])
    g = (u_sg - v_end) - r * gap * duds
    out.update(f=f, v_end=v_end, duds=duds)
  out.update(u=u, g=g)
  return out


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics); the warm-up reads `context.step`."""
  out = residual(u_fn, params, batch, draws, config, num_classes, context)
  u = out["u"]
  g, g_norm = normalized(out["g"], config.ayf_tangent_c)
  sq = common.per_sample_sq_error(u, jax.lax.stop_gradient(u - g))
  value = jnp.mean(sq)
  metrics = {"loss": value, "mse": jnp.mean(jnp.square(g_norm)),
             "tangent_norm": jnp.mean(g_norm), "warmup": out["warmup"]}
  if context.teacher_weak is not None:
    metrics["guidance"] = jnp.mean(draws["guidance"])
  if "v" in out:
    metrics["v_mse"] = jnp.mean(common.per_sample_sq_error(
        jax.lax.stop_gradient(u), out["v"]))
  return value, metrics
