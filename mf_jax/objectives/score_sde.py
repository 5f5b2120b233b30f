"""Score SDEs (Song et al., 2021): VP and sub-VP, denoising score matching.

The forward process is dx = -1/2 beta(t) x dt + g(t) dw on t in [0, 1],
beta(t) = beta_min + t (beta_max - beta_min), with g(t)^2 = beta(t) (VP)
or beta(t) (1 - exp(-2 beta_min t - t^2 (beta_max - beta_min))) (sub-VP).
Both have the marginal x_t = m(t) x + s(t) e with
m(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min) and
s(t) = sqrt(1 - m^2) (VP) or 1 - m^2 (sub-VP); at t = 1, m ~ 0.0066, so
the prior is N(0, I). (Song et al.'s `sde_lib.py`, `marginal_prob`.)

Time. mf_jax's t and the SDE's run the same way (0 data, 1 noise), so the
network is fed the SDE's own time, t, and h = 0, at the SDE's own state
x_t (not the linear path's z_t: that one is a rescaling,
z = x_t / (m + s) at time s / (m + s), which this objective does not use).
The network's output is read as the noise prediction eps(x_t, t), the
score being -eps / s(t); the loss is Song et al.'s continuous DSM without
likelihood weighting, ||eps(x_t, t) - e||^2 summed over dimensions, at
t ~ U(train_eps, 1) (train_eps = 1e-5, theirs).

Sampling (mf_jax/sde_samplers.py): reverse-SDE Euler-Maruyama ('emN', and
plain step counts), predictor-corrector with one Langevin step per time
('pcN', snr `sde_snr`), and the probability-flow ODE through the adaptive
Dopri5 solver ('ode'; 'eulerN' and 'heunN' integrate it with fixed steps).
All stop at `sde_sample_eps` and take one last noise-free step to t = 0,
as Song et al.'s samplers with noise removal.
"""

import dataclasses

import jax
import jax.numpy as jnp

from mf_jax.objectives import common

SAMPLER = "sde"  # sde_samplers: step counts run Euler-Maruyama
SDES = ("vp", "subvp")

# Song et al. (2021): beta_min = 0.1, beta_max = 20 (`configs/vp/*`),
# training times from eps = 1e-5, sampling to eps = 1e-3, Langevin
# corrector snr 0.16 (`configs/default_*_configs.py`).
CONFIG = dict(
    sde="vp",  # "vp" or "subvp"
    sde_beta_min=0.1,
    sde_beta_max=20.0,
    sde_train_eps=1e-5,  # training times t ~ U(train_eps, 1)
    sde_sample_eps=1e-3,  # samplers integrate 1 -> sample_eps, then step to 0
    sde_snr=0.16,  # the Langevin corrector's signal-to-noise ratio
)


@dataclasses.dataclass(frozen=True)
class SDE:
  """The forward process and the sampling settings of a score-SDE run."""
  kind: str = "vp"
  beta_min: float = 0.1
  beta_max: float = 20.0
  sample_eps: float = 1e-3
  snr: float = 0.16

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def mean_coeff(self, t):
    """m(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min)."""
    return jnp.exp(-0.25 * t**2 * (self.beta_max - self.beta_min)
                   - 0.5 * t * self.beta_min)

  def std(self, t):
    """s(t): sqrt(1 - m^2) for VP, 1 - m^2 for sub-VP."""
    var = -jnp.expm1(-0.5 * t**2 * (self.beta_max - self.beta_min)
                     - t * self.beta_min)  # 1 - m^2, exact near t = 0
    return var if self.kind == "subvp" else jnp.sqrt(var)

  def diffusion(self, t):
    """g(t)."""
    if self.kind == "subvp":
      return jnp.sqrt(self.beta(t) * -jnp.expm1(
          -2 * self.beta_min * t - t**2 * (self.beta_max - self.beta_min)))
    return jnp.sqrt(self.beta(t))

  def drift(self, x, t):
    """f(x, t) = -1/2 beta(t) x (both processes)."""
    return -0.5 * common.broadcast_to(self.beta(t), x) * x


def sde_of(settings) -> SDE:
  """The SDE a config's objective settings describe."""
  return SDE(kind=settings.sde, beta_min=float(settings.sde_beta_min),
             beta_max=float(settings.sde_beta_max),
             sample_eps=float(settings.sde_sample_eps),
             snr=float(settings.sde_snr))


def validate(config):
  s = config.objective
  if s.sde not in SDES:
    raise ValueError(f"Unknown objective.sde {s.sde!r}; valid: {SDES}.")
  if not 0 < s.sde_beta_min < s.sde_beta_max:
    raise ValueError(f"objective.sde_beta_min={s.sde_beta_min!r} and "
                     f"sde_beta_max={s.sde_beta_max!r} must satisfy "
                     "0 < beta_min < beta_max.")
  for name in ("sde_train_eps", "sde_sample_eps"):
    if not 0 < s[name] < 1:
      raise ValueError(f"objective.{name}={s[name]!r} must be in (0, 1).")
  if s.sde_snr < 0:
    raise ValueError(f"objective.sde_snr={s.sde_snr!r} must be >= 0.")
  if config.eval.get("inception"):
    raise ValueError("FID evaluation (eval.inception) does not take "
                     "score-SDE samplers yet; score_sde runs are scored on "
                     "toy 2-D data and digits.")


def draw(rng, batch, config, num_classes, context=None):
  """t ~ U(train_eps, 1), noise, dropped label rows, dropout key."""
  del context
  x = batch["x"]
  rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
  eps = config.sde_train_eps
  return {"t": eps + (1 - eps) * jax.random.uniform(rng_t, (x.shape[0],)),
          "e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": common.draw_dropped(rng_drop, batch["y"], num_classes,
                                         config.class_dropout),
          "dropout": common.dropout_rng(rng)}


def perturb(sde: SDE, x, e, t):
  """x_t = m(t) x + s(t) e, a draw of the forward process's marginal."""
  return (common.broadcast_to(sde.mean_coeff(t), x) * x
          + common.broadcast_to(sde.std(t), x) * e)


def loss(u_fn, params, batch, draws, config, num_classes, context=None):
  """Returns (scalar loss, metrics): mean ||eps(x_t, t) - e||^2."""
  del context
  t, e = draws["t"], draws["e"]
  x_t = perturb(sde_of(config), batch["x"], e, t)
  y = common.drop_labels(batch["y"], draws["dropped"], num_classes)
  eps_hat = u_fn(params, x_t, t, jnp.zeros_like(t), y, True,
                 **common.model_extras(u_fn, batch, draws))
  sq_error_b = common.per_sample_sq_error(eps_hat, e)
  value = jnp.mean(sq_error_b)
  return value, {"loss": value, "mse": value}
