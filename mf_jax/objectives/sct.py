"""sCT (Lu & Song, 2024): continuous-time consistency training in TrigFlow.

The paper's loss is written for TrigFlow: x_s = cos s x + sin s z with
z = sigma_d e, s in [0, pi/2], and the consistency function
f(x_s, s) = cos s x_s - sin s sigma_d F(x_s, s). We keep its formulas
(Algorithm 1, so its constants mean what they mean there) and convert at
the objective's boundary to the one backbone u(z, t, h) and the consistency
function of consistency.py, f(z_t, t) = z_t - t u(z_t, t, h = t).

The conversion (same x, same e): the noise-to-signal ratio of x_s is
sigma_d tan s, that of z_t is t / (1 - t), so with k = cos s + sigma_d sin s

  t = sigma_d sin s / k,   z_t = x_s / k,

and equating the two forms of f gives F in terms of the backbone,

  F(x_s, s) = (u(z_t, t, h = t) + (cos s - sin s / sigma_d) x_s) / k,

an affine map of u with nothing singular on [0, pi/2]. Times are drawn as
the paper draws them: EDM's sigma = sigma_d tan s = t / (1 - t) is
lognormal(P_mean, P_std), i.e. t = sigmoid(tau), tau ~ N(P_mean, P_std^2),
a logit-normal t.

Per sample (sCT: dx_s/ds is the conditional velocity cos s z - sin s x):

  F, dF = jvp(F, (x_s, s), (cos s sin s dx_s/ds, cos s sin s))
  g = -cos^2 s (sigma_d sg(F) - dx_s/ds)
      - r (cos s sin s x_s + sigma_d sg(dF))            tangent warm-up
  g = g / (||g|| + c)                                    tangent normalisation
  loss = e^{-w(t)} / D ||F - sg(F) - g||^2 + w(t)        adaptive weighting

g is cos s df/ds (the tangent of f along the path, weighted as the paper
weights it), so the loss's gradient is -2 e^{-w} / D g . dF/dtheta: the
continuous consistency gradient. r = min(1, k / warmup_steps) scales the
terms that come from the network's own time derivative; r = 0 leaves the
diffusion (flow-matching) loss in TrigFlow form. The JVP runs through the
conversion and the backbone together, with the tangents pre-multiplied by
cos s sin s as the paper does (its "JVP rearrangement"), and its primal is
the prediction itself: one forward + JVP and one backward pass, as MeanFlow.

w(t) = logvar(t) is a small learned function of time whose parameters live
in the model's (`model.adaptive_weight_dim` > 0 adds the head,
models/adaptive_weight.py); the backbone returns it when called with
`with_logvar=True`. There is no target network: sg(F) is the online one's.

Sampling is the consistency sampler (f at t = 1, then re-noise and jump).
"""

import math

import jax
import jax.numpy as jnp

from mf_jax.objectives import common

SAMPLER = "consistency"

# Lu & Song (2024), Algorithm 1 and their CIFAR-10 sCT setting (also NVIDIA
# FastGen's configs/methods/config_scm.py): sigma_d = 0.5, proposal
# lognormal(-1.0, 1.4) on EDM's sigma, tangent warm-up over 10k steps,
# normalisation constant 0.1.
CONFIG = dict(
    sct_sigma_d=0.5,  # TrigFlow's data standard deviation
    sct_p_mean=-1.0,  # log(sigma) ~ N(p_mean, p_std^2), sigma = t / (1 - t)
    sct_p_std=1.4,
    sct_warmup_steps=10_000,  # tangent warm-up r = min(1, step / this)
    sct_tangent_c=0.1,  # g / (||g|| + c)
)


def validate(config, prefix: str = "sct"):
  """sCT's checks; sCD (prefix 'scd') shares them on its own fields."""
  s, name = config.objective, config.objective.name
  for field in (f"{prefix}_sigma_d", f"{prefix}_p_std"):
    if not s[field] > 0:
      raise ValueError(f"objective.{field}={s[field]!r} must be > 0.")
  if s[f"{prefix}_tangent_c"] < 0:
    raise ValueError(f"objective.{prefix}_tangent_c="
                     f"{s[f'{prefix}_tangent_c']!r} must be >= 0.")
  warmup_steps = s[f"{prefix}_warmup_steps"]
  if not 0 <= warmup_steps < max(config.training.num_steps, 1):
    raise ValueError(
        f"objective.{prefix}_warmup_steps={warmup_steps} must be >= 0 and "
        f"below training.num_steps={config.training.num_steps}, or the "
        "tangent warm-up never finishes; lower it.")
  if config.model.get("adaptive_weight_dim", 0) <= 0:
    raise ValueError(
        f"objective.name={name} learns its loss weight w(t) in a model head: "
        "set model.adaptive_weight_dim > 0 (e.g. 128).")


def warmup(step, warmup_steps: int) -> jax.Array:
  """The tangent warm-up factor r = min(1, step / warmup_steps)."""
  if warmup_steps == 0:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, step / warmup_steps).astype(jnp.float32)


def t_to_angle(t, sigma_d: float):
  """mf_jax time -> TrigFlow angle: tan s = t / ((1 - t) sigma_d)."""
  return jnp.arctan2(t, sigma_d * (1 - t))


def angle_to_t(s, sigma_d: float):
  """TrigFlow angle -> mf_jax time, t = sigma_d sin s / k."""
  return sigma_d * jnp.sin(s) / (jnp.cos(s) + sigma_d * jnp.sin(s))


def trigflow_output(u_fn, params, x_s, s, y, sigma_d: float, extras):
  """(F(x_s, s), w(t)): TrigFlow's network output through the backbone."""
  cos, sin = jnp.cos(s), jnp.sin(s)
  k = cos + sigma_d * sin
  t = sigma_d * sin / k
  z = x_s / common.broadcast_to(k, x_s)
  u, logvar = u_fn(params, z, t, t, y, True, with_logvar=True, **extras)
  coeff = common.broadcast_to((cos - sin / sigma_d) / k, x_s)
  return u / common.broadcast_to(k, x_s) + coeff * x_s, logvar


def draw(rng, batch, config, num_classes, context=None):
  """t (logit-normal: the paper's lognormal sigma), noise, dropped label
  rows and the dropout key."""
  del context
  x = batch["x"]
  rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
  tau = config.sct_p_mean + config.sct_p_std * jax.random.normal(
      rng_t, (x.shape[0],))
  return {"t": jax.nn.sigmoid(tau),
          "e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": common.draw_dropped(rng_drop, batch["y"], num_classes,
                                         config.class_dropout),
          "dropout": common.dropout_rng(rng)}


def terms(u_fn, params, batch, draws, config, num_classes, step) -> dict:
  """Every intermediate of the loss, deterministic given `draws`."""
  sigma_d = config.sct_sigma_d
  x, e = batch["x"], draws["e"]
  s = t_to_angle(draws["t"], sigma_d)
  cos, sin = (common.broadcast_to(a, x) for a in (jnp.cos(s), jnp.sin(s)))
  x_s = cos * x + sin * sigma_d * e
  dxds = cos * sigma_d * e - sin * x
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  extras = common.model_extras(u_fn, batch, draws)

  def output(x_s, s):
    return trigflow_output(u_fn, params, x_s, s, y, sigma_d, extras)

  cs = jnp.cos(s) * jnp.sin(s)
  (f_out, logvar), (dfds, _) = jax.jvp(
      output, (x_s, s), (common.broadcast_to(cs, x) * dxds, cs))
  r = warmup(step, config.sct_warmup_steps)
  f_sg, dfds = jax.lax.stop_gradient((f_out, dfds))
  g = (-jnp.square(cos) * (sigma_d * f_sg - dxds)
       - r * (cos * sin * x_s + sigma_d * dfds))
  g_norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), -1))
  g = g / common.broadcast_to(g_norm + config.sct_tangent_c, g)
  return {"x_s": x_s, "s": s, "F": f_out, "dFds": dfds, "g": g,
          "g_norm": g_norm, "logvar": logvar, "warmup": r, "y": y}


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics); the warm-up reads `context.step`."""
  out = terms(u_fn, params, batch, draws, config, num_classes, context.step)
  f_out, logvar = out["F"], out["logvar"]
  dims = math.prod(f_out.shape[1:])
  sq = common.per_sample_sq_error(
      f_out - jax.lax.stop_gradient(f_out), out["g"])
  weight_b = jnp.exp(-logvar) / dims
  value = jnp.mean(weight_b * sq + logvar)
  # f itself (cos s x_s - sigma_d sin s F = z_t - t u), for a figure that
  # means something: its distance to the data the sample was noised from.
  cos, sin = (common.broadcast_to(a, f_out) for a in (jnp.cos(out["s"]),
                                                      jnp.sin(out["s"])))
  f_data = cos * out["x_s"] - config.sct_sigma_d * sin * f_out
  return value, {
      "loss": value,
      "mse": jax.lax.stop_gradient(jnp.mean(
          common.per_sample_sq_error(f_data, batch["x"]))),
      "tangent_norm": jnp.mean(out["g_norm"]),
      "logvar": jnp.mean(logvar),
      "weight": jnp.mean(weight_b),
      "warmup": out["warmup"],
  }
