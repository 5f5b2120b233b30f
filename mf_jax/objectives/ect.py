"""Easy consistency tuning, ECT (Geng, Pokle, Luo, Lin & Kolter, 2024).

Continuous-time consistency training with a shrinking gap: t is drawn
from EDM's lognormal over sigma and the target's level is

  r = t (1 - q^-(stage + 1) (1 + k sigmoid(-b t))),  clamped at 0,

so r/t doubles its way toward 1 (the gap 1 - r/t halves each stage;
stage = step // (num_steps // ect_stages)). At stage 0 most r are 0 and
the loss is denoising (f at r = 0 is the data); later it is consistency
between ever closer points. The loss is pseudo-Huber weighted by
1 / (t - r), with the online network under stop-gradient as the target:

  loss = d(f_theta(z at t), sg f_theta(z at r)) / (t - r).

Everything is in EDM's sigma as the reference code (locuslab/ect,
training/loss.py `ECMLoss`, "sigmoid" mapping) writes it; each sigma
becomes the time t = sigma / (1 + sigma) at the network, where the
lognormal over sigma is a logit-normal over t. Student and target share
the noise e and the dropout key.

Defaults: P_mean = -1.1, P_std = 2.0, q = 2, k = 8, b = 1 (ECMLoss's);
ect_huber_c < 0 is iCT's c = 0.00054 sqrt(D) (the reference defaults to
c = 0, the plain Euclidean norm, which ect_huber_c = 0 gives). ECT tunes a
pretrained diffusion model: `objective.init_from=EXPORT.safetensors` starts
training from an mf_jax export (e.g. a flow-matching run's; loaded by
training/init_from.py, any objective may use it). A flow-matching network
is a natural start: z_t - t v(z_t, t) is its denoiser E[x | z_t], the
consistency function's value at stage 0, though it was trained at h = 0
and is asked here at h = t.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import consistency

SAMPLER = "consistency"

CONFIG = dict(
    ect_p_mean=-1.1,  # lognormal over sigma (logit-normal over t)
    ect_p_std=2.0,
    ect_q=2.0,  # the gap 1 - r/t shrinks by q each stage
    ect_k=8.0,  # the gap's widening at small t: 1 + k sigmoid(-b t)
    ect_b=1.0,
    ect_stages=8,  # training splits into this many stages
    ect_huber_c=-1.0,  # < 0: 0.00054 sqrt(dimensions); 0: Euclidean norm
    init_from="",  # an mf_jax export (.safetensors) to start training from
)


def validate(config):
  s = config.objective
  if not (isinstance(s.ect_stages, int)
          and 1 <= s.ect_stages <= config.training.num_steps):
    raise ValueError(f"objective.ect_stages={s.ect_stages!r} must be an "
                     "integer in [1, training.num_steps="
                     f"{config.training.num_steps}].")
  if not (s.ect_q > 1 and s.ect_p_std > 0 and s.ect_k >= 0):
    raise ValueError(f"objective.ect_q={s.ect_q!r} must be > 1, ect_p_std="
                     f"{s.ect_p_std!r} > 0 and ect_k={s.ect_k!r} >= 0.")


def stage_at(step, settings, num_steps: int):
  """The curriculum's stage at training step `step`."""
  return step // (num_steps // settings.ect_stages)


def r_of(sigma, stage, settings):
  """The target's level r(t) of the sigmoid mapping, in sigma."""
  widening = 1 + settings.ect_k * jax.nn.sigmoid(-settings.ect_b * sigma)
  ratio = 1 - settings.ect_q ** (-(stage + 1.0)) * widening
  return jnp.maximum(sigma * ratio, 0.0)


def draw(rng, batch, config, num_classes, context):
  """sigma ~ lognormal(P_mean, P_std), its r(sigma) at the step's stage,
  one noise e for both, dropped rows and the dropout key."""
  rng_sigma, rng_rest = jax.random.split(rng)
  normal = jax.random.normal(rng_sigma, batch["x"].shape[:1])
  sigma = jnp.exp(config.ect_p_mean + config.ect_p_std * normal)
  stage = stage_at(context.step, config, context.num_steps)
  return {"sigma": sigma, "sigma_next": r_of(sigma, stage, config),
          **consistency.draw_noise_labels_dropout(rng_rest, batch, config,
                                                  num_classes)}


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics): mean of d(student, target) / (t - r)
  in sigma."""
  sigma, sigma_next = draws["sigma"], draws["sigma_next"]
  student, target = consistency.pair(
      u_fn, params, params, batch, draws, num_classes,
      consistency.sigma_to_t(sigma), consistency.sigma_to_t(sigma_next))
  c = consistency.huber_c(config.ect_huber_c, batch["x"].shape)
  distance_b = consistency.pseudo_huber(student, target, c)
  weight_b = 1.0 / (sigma - sigma_next)
  value = jnp.mean(weight_b * distance_b)
  stage = stage_at(context.step, config, context.num_steps)
  return value, {
      "loss": value,
      "mse": jnp.mean(common.per_sample_sq_error(student, target)),
      "weight": jnp.mean(weight_b),
      "stage": jnp.asarray(stage, jnp.float32),
      "r_zero_fraction": jnp.mean((sigma_next == 0).astype(jnp.float32))}
