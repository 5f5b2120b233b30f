"""sCD (Lu & Song, 2024): continuous-time consistency distillation.

sCT's loss (sct.py: TrigFlow, tangent warm-up and normalisation, learned
weight w(t)) with the tangent direction dx_s/ds given by the frozen
teacher's velocity instead of the conditional one, cos s z - sin s x.

The teacher is a flow-matching network: v(z_t, t) = teacher(z_t, t, h = 0,
y) = E[e - x | z_t], at the mf_jax time t of the TrigFlow angle s (same
point: z_t = x_s / k, k = cos s + sigma_d sin s, t = sigma_d sin s / k).
Differentiating x_s = k z_t along the teacher's trajectory, with
dt/ds = sigma_d / k^2,

  dx_s/ds = (sigma_d cos s - sin s) z_t + (sigma_d / k) v(z_t, t),

which for the conditional velocity e - x is sCT's cos s sigma_d e - sin s x.

Rather than restate sCT's loss, sCD hands sct.loss the pair (x', e') that
puts the sample at the same x_s with the teacher's tangent: the rotation

  x' = cos s x_s - sin s dx_s/ds,   sigma_d e' = sin s x_s + cos s dx_s/ds

(x' is the teacher's one-step denoised estimate in TrigFlow), so that
cos s x' + sin s sigma_d e' = x_s and cos s sigma_d e' - sin s x' =
dx_s/ds. Everything after that, the JVP, warm-up, normalisation, weighting
and its sCT settings, is sCT's own code, run with this module's scd_*
fields. The reported `mse` is the consistency function's distance to x'
(the teacher's one-step denoised estimate), not to the data.

Classifier-free guidance of the teacher is `objective.teacher_cfg_scale`
(the paper's sCD adds (w - 1)(v_cond - v_uncond)); label-dropped rows ask
the teacher for the null class. Defaults: sCT's (sigma_d = 0.5, proposal
lognormal(-1.0, 1.4) on EDM's sigma, warm-up 10k steps, c = 0.1), the
paper's and FastGen's sCD settings on CIFAR-10.
"""

import types

import jax
import jax.numpy as jnp

from mf_jax.objectives import cd
from mf_jax.objectives import common
from mf_jax.objectives import sct

SAMPLER = "consistency"
# What it learns from beside the data (tools/compare.py provides it).
LEARNS_FROM = "teacher"

CONFIG = dict(
    scd_sigma_d=0.5,  # TrigFlow's data standard deviation
    scd_p_mean=-1.0,  # log(sigma) ~ N(p_mean, p_std^2), sigma = t / (1 - t)
    scd_p_std=1.4,
    scd_warmup_steps=10_000,  # tangent warm-up r = min(1, step / this)
    scd_tangent_c=0.1,  # g / (||g|| + c)
)


def as_sct(settings):
  """The objective settings with sCT's fields set from sCD's."""
  fields = dict(settings.items())
  fields.update({"sct_" + name[len("scd_"):]: value
                 for name, value in fields.items() if name.startswith("scd_")})
  return types.SimpleNamespace(**fields)


def validate(config):
  cd.require_teacher(config)
  sct.validate(config, prefix="scd")


def draw(rng, batch, config, num_classes, context=None):
  """sCT's draws: t (the lognormal sigma), noise, dropped rows, dropout."""
  return sct.draw(rng, batch, as_sct(config), num_classes, context)


def teacher_tangent(teacher, x, e, t, y, sigma_d: float):
  """(x_s, dx_s/ds along the teacher's trajectory) at the angle of t."""
  s = sct.t_to_angle(t, sigma_d)
  cos, sin = jnp.cos(s), jnp.sin(s)
  k = cos + sigma_d * sin
  z, _ = common.interpolate(x, e, t)
  v = teacher(z, t, jnp.zeros_like(t), y)
  bt = lambda a: common.broadcast_to(a, x)
  x_s = bt(k) * z
  return x_s, bt(sigma_d * cos - sin) * z + bt(sigma_d / k) * v


def implied_pair(teacher, batch, draws, config, num_classes):
  """(batch, draws) with x -> x', e -> e' (module docstring): sCT on them
  is sCD on the original pair."""
  sigma_d, t = config.scd_sigma_d, draws["t"]
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  x_s, dxds = teacher_tangent(teacher, batch["x"], draws["e"], t, y,
                              sigma_d)
  s = sct.t_to_angle(t, sigma_d)
  cos, sin = (common.broadcast_to(a, x_s) for a in (jnp.cos(s), jnp.sin(s)))
  x_hat = jax.lax.stop_gradient(cos * x_s - sin * dxds)
  e_hat = jax.lax.stop_gradient((sin * x_s + cos * dxds) / sigma_d)
  return dict(batch, x=x_hat), dict(draws, e=e_hat)


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics); sct.loss on the implied pair."""
  batch_hat, draws_hat = implied_pair(context.teacher, batch, draws, config,
                                      num_classes)
  return sct.loss(u_fn, params, batch_hat, draws_hat, as_sct(config),
                  num_classes, context)
