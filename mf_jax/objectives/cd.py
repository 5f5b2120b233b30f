"""Consistency distillation, CD (Song, Dhariwal, Chen & Sutskever, 2023).

CT's loss (ct.py) with the target's point found by the frozen teacher
instead of the data: for adjacent levels sigma_i < sigma_{i+1} of a Karras
grid of N points,

  z at sigma_i = one Heun step of the teacher's ODE from z at sigma_{i+1},
  loss = d(f_theta(z at sigma_{i+1}), sg f_target(z at sigma_i)),

i ~ U{0, ..., N - 2}, with the target network an EMA of the online one at a
fixed rate mu. f(z_t, t) = z_t - t u(z_t, t, h = t) is the consistency
function of consistency.py.

The teacher's step is taken where the paper takes it, in EDM's
variance-exploding form z_sigma = x + sigma e = z_t / (1 - t), whose ODE is
dz_sigma / dsigma = E[e | z]. A flow-matching teacher gives the velocity
v = E[e - x | z_t] at h = 0 (`context.teacher(z, t, 0, y)`), and
E[e | z] = z_t + (1 - t) v, so Heun's two slopes are two teacher calls, as
in openai/consistency_models_cifar10 (jcm/losses.py `heun_solver`). Each
sigma becomes t = sigma / (1 + sigma) at the networks' boundary (the
conversion of consistency.py); f's output is x in both conventions, so the
loss is the paper's. `cd_solver='euler'` takes one slope; 'flow_map' asks a
flow-map teacher (e.g. a MeanFlow export) for its average velocity over
the step, z_r = z_t - (t - r) teacher(z_t, t, t - r, y): exact for an exact
teacher, as the tests use.

Defaults are the official CIFAR-10 CD config (configs/cifar10_ve_cd.py):
N = 18, Heun, uniform weighting, sigma in [0.002, 80], rho = 7, and the
target equal to the online parameters (mu = 0, the paper's CIFAR-10 CD;
its ImageNet-64 and LSUN runs used mu = 0.95). Metrics: "l2" (squared
error summed over dimensions; the official code averages, a constant
factor) or "pseudo_huber" (iCT's). The paper's best runs used LPIPS, which
mf_jax does not have. Student and target share the noise e and the
dropout key; label-dropped rows ask the teacher for the null class.
"""

import jax
import jax.numpy as jnp

from mf_jax.objectives import common
from mf_jax.objectives import consistency

SAMPLER = "consistency"
# What it learns from beside the data (tools/compare.py provides it).
LEARNS_FROM = "teacher"
METRICS = ("l2", "pseudo_huber")
SOLVERS = ("heun", "euler", "flow_map")

CONFIG = dict(
    cd_num_scales=18,  # N, points of the Karras grid
    cd_mu=0.0,  # target EMA rate (0: the online parameters, CIFAR-10's)
    cd_sigma_min=0.002,
    cd_sigma_max=80.0,
    cd_rho=7.0,
    cd_solver="heun",  # the teacher's step: "heun", "euler" or "flow_map"
    cd_metric="l2",  # or "pseudo_huber"
    cd_huber_c=-1.0,  # pseudo-Huber c; < 0: 0.00054 sqrt(dimensions)
)


def require_teacher(config):
  """The one-line error of every distillation objective without a teacher."""
  if not config.objective.get("teacher", ""):
    raise ValueError(
        f"objective.name={config.objective.name} distils a teacher: set "
        "objective.teacher=FILE (an export: python -m mf_jax.tools.export "
        "--workdir=TEACHER_RUN --output=FILE).")


def validate_choice(field: str, value, valid):
  if value not in valid:
    raise ValueError(f"Unknown objective.{field} {value!r}; valid: {valid}.")


def _grid(settings):
  return settings.cd_sigma_min, settings.cd_sigma_max, settings.cd_rho


def validate(config):
  require_teacher(config)
  s = config.objective
  consistency.validate_grid("cd", *_grid(s))
  if not (isinstance(s.cd_num_scales, int) and s.cd_num_scales >= 2):
    raise ValueError(f"objective.cd_num_scales={s.cd_num_scales!r} must be "
                     "an integer >= 2 (points of the Karras grid).")
  if not 0 <= s.cd_mu < 1:
    raise ValueError(f"objective.cd_mu={s.cd_mu!r} must be in [0, 1) (the "
                     "target network's EMA rate).")
  validate_choice("cd_solver", s.cd_solver, SOLVERS)
  validate_choice("cd_metric", s.cd_metric, METRICS)


def target_decay(step, settings, num_steps: int):
  """mu, fixed: the train state's target_params follow the online ones."""
  del step, num_steps
  return jnp.float32(settings.cd_mu)


def teacher_step(teacher, solver: str, z, t, r, y):
  """z_r from z_t (r < t, per-sample times) along the teacher's ODE.

  'heun' and 'euler' step in EDM's z_sigma = z_t / (1 - t) with the slope
  E[e | z] = z_t + (1 - t) v(z_t, t) (module docstring); 'flow_map' jumps
  with the teacher's average velocity over [r, t]. t < 1 (sigma finite).
  """
  bt = lambda a: common.broadcast_to(a, z)
  if solver == "flow_map":
    return z - bt(t - r) * teacher(z, t, t - r, y)

  def slope(z, t):  # dz_sigma / dsigma at z_t
    return z + bt(1 - t) * teacher(z, t, jnp.zeros_like(t), y)

  d_sigma = bt(consistency.t_to_sigma(r) - consistency.t_to_sigma(t))
  z_sigma = z / bt(1 - t)
  d1 = slope(z, t)
  euler = z_sigma + d_sigma * d1
  if solver == "euler":
    return bt(1 - r) * euler
  d2 = slope(bt(1 - r) * euler, r)
  return bt(1 - r) * (z_sigma + d_sigma * 0.5 * (d1 + d2))


def draw(rng, batch, config, num_classes, context=None):
  """The pair (sigma_{i+1}, sigma_i), i ~ U{0..N-2}, one noise e, dropped
  label rows and the dropout key."""
  del context
  rng_index, rng_rest = jax.random.split(rng)
  n = config.cd_num_scales
  i = consistency.sample_uniform_index(rng_index, batch["x"].shape[:1], n)
  return {"sigma": consistency.karras_sigma(i + 1, n, *_grid(config)),
          "sigma_next": consistency.karras_sigma(i, n, *_grid(config)),
          **consistency.draw_noise_labels_dropout(rng_rest, batch, config,
                                                  num_classes)}


def terms(u_fn, params, batch, draws, config, num_classes, context) -> dict:
  """Student f(z_t, t), the teacher's z_r and the target sg f(z_r, r)."""
  t = consistency.sigma_to_t(draws["sigma"])
  r = consistency.sigma_to_t(draws["sigma_next"])
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  extras = common.model_extras(u_fn, batch, draws)
  z_t, _ = common.interpolate(batch["x"], draws["e"], t)
  z_r = jax.lax.stop_gradient(
      teacher_step(context.teacher, config.cd_solver, z_t, t, r, y))
  student = consistency.consistency_fn(u_fn, params, z_t, t, y, True,
                                       **extras)
  target = consistency.consistency_fn(u_fn, context.target_params, z_r, r,
                                      y, True, **extras)
  return {"t": t, "r": r, "z_t": z_t, "z_r": z_r, "student": student,
          "target": jax.lax.stop_gradient(target)}


def distance(a, b, metric: str, huber_c: float, x_shape):
  """Per-sample d(a, b): squared L2 or iCT's pseudo-Huber."""
  if metric == "l2":
    return common.per_sample_sq_error(a, b)
  return consistency.pseudo_huber(a, b, consistency.huber_c(huber_c, x_shape))


def loss(u_fn, params, batch, draws, config, num_classes, context):
  """Returns (scalar loss, metrics)."""
  out = terms(u_fn, params, batch, draws, config, num_classes, context)
  student, target = out["student"], out["target"]
  value = jnp.mean(distance(student, target, config.cd_metric,
                            config.cd_huber_c, batch["x"].shape))
  return value, {
      "loss": value,
      "mse": jnp.mean(common.per_sample_sq_error(student, target)),
      # How far the online network's jump to data lands from the data the
      # sample was noised from (the teacher's trajectory may end elsewhere).
      "x_mse": jax.lax.stop_gradient(jnp.mean(
          common.per_sample_sq_error(student, batch["x"]))),
  }
