"""Sample-quality evaluation at several NFE, independent of the objective.

The evaluator only sees a sampler (the one the objective names) and the
parameters; it draws samples over all devices and scores them against data:
energy distance for 2-D targets, a Fréchet distance in the feature space of
the project's digits classifier (and that classifier's agreement with the
conditioning labels) for the 8x8 digits. Schedules that name a solver
('heun8', 'euler16', 'ode': samplers.Solver) integrate the instantaneous
velocity of any objective's network; the adaptive 'ode' also records the
mean NFE it took as 'ode/nfe_used' (a key of its own, so the score keys
stay the same from one evaluation to the next).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mf_jax import objectives
from mf_jax import samplers
from mf_jax import sde_samplers
from mf_jax import sharding
from mf_jax.data import pipeline
from mf_jax.data import toy2d
from mf_jax.evaluation import distances


class Evaluator:
  """Generates samples at a given NFE and scores them."""

  def __init__(self, config, u_fn, mesh, input_shape):
    self.config = config
    self.kind = pipeline.dataset_kind(config.data.name)
    self.sampler = objectives.get(config.objective.name).SAMPLER
    self._sde = sde_samplers.sde_of(config)  # score SDEs: their samplers
    self.mesh = mesh
    self.input_shape = input_shape
    sharding.check_batch_size(config.eval.batch_size, mesh,
                              "eval.batch_size")
    self._check_ode_settings()
    self._sample = jax.jit(functools.partial(self._sample_batch, u_fn),
                           static_argnums=(3,))
    self._classifier = None

  def _check_ode_settings(self):
    """Tolerances, and schedules FID cannot take yet: one line each, before
    anything compiles."""
    c = self.config.eval
    for name in ("ode_rtol", "ode_atol"):
      value = c.get(name, 1.0)
      if isinstance(value, bool) or not (isinstance(value, (int, float))
                                         and value > 0):
        raise ValueError(f"eval.{name}={value!r} must be a number > 0.")
    sde_samplers.check_schedules(c.nfe, self._sde)
    solvers = [spec for spec in c.nfe if isinstance(
        samplers.parse_schedule(spec), samplers.Solver)]
    if c.get("inception") and solvers:
      raise ValueError(f"eval.nfe entries {solvers} name a solver, which "
                       "FID evaluation (eval.inception) does not take yet; "
                       "use step counts or explicit times.")

  def _sample_batch(self, u_fn, params, rng, labels, schedule):
    shape = (labels.shape[0], *self.input_shape)
    noise = jax.random.normal(rng, shape)
    noise = jax.lax.with_sharding_constraint(
        noise, sharding.batch_sharding(self.mesh))
    c = self.config.eval
    sample = (samplers.sample if self._sde is None else
              functools.partial(sde_samplers.sample, sde=self._sde))
    return sample(
        u_fn, params, noise, labels, schedule, self.sampler,
        rtol=c.get("ode_rtol", samplers.ODE_RTOL),
        atol=c.get("ode_atol", samplers.ODE_ATOL),
        rng=jax.random.fold_in(rng, 1))  # re-noising samplers' own key

  def generate(self, params, rng, num: int, nfe: int | str, label_mode: str):
    """`num` samples and their labels as numpy, in batches of eval size;
    `nfe` is a schedule as samplers.parse_schedule takes it."""
    samples, labels, _ = self.generate_with_nfe(params, rng, num, nfe,
                                                label_mode)
    return samples, labels

  def generate_with_nfe(self, params, rng, num: int, nfe: int | str,
                        label_mode: str):
    """`generate`, plus the mean NFE over its batches (the adaptive solver
    takes as many as each batch needs)."""
    batch = self.config.eval.batch_size
    num_classes = self.config.model.num_classes
    rng_labels, rng_noise = jax.random.split(rng)
    labels = np.asarray(samplers.make_labels(rng_labels, num, num_classes,
                                             label_mode))
    chunks, nfes = [], []
    for i, start in enumerate(range(0, num, batch)):
      chunk = np.resize(labels[start:start + batch], batch)
      out, stats = self._sample(params, jax.random.fold_in(rng_noise, i),
                                jnp.asarray(chunk), nfe)
      if not bool(stats["finished"]):
        raise RuntimeError(
            f"The adaptive ODE solve ({samplers.schedule_name(nfe)}) took "
            f"more than {samplers.ODE_MAX_STEPS} steps without reaching "
            "t = 0: the velocity field is too stiff for eval.ode_rtol="
            f"{self.config.eval.get('ode_rtol')}; raise it (and "
            "eval.ode_atol).")
      chunks.append(multihost_utils.process_allgather(out, tiled=True))
      nfes.append(int(stats["nfe"]))
    return np.concatenate(chunks)[:num], labels, float(np.mean(nfes))

  @property
  def scores_samples(self) -> bool:
    """Whether `score` measures anything for this data (2-D points and
    digits); images and latents are scored by FID, outside this class."""
    return self.kind in ("toy2d", "digits")

  def __call__(self, params, rng) -> dict[str, float]:
    """Scores at every schedule of `eval.nfe`; keys like
    'nfe1/energy_distance', 'nfe2[1,0.6,0]/energy_distance',
    'heun8/energy_distance', 'ode/energy_distance' and 'ode/nfe_used'."""
    results = {}
    if not self.scores_samples:  # sampling for nothing costs a whole pass
      return results
    for i, nfe in enumerate(self.config.eval.nfe):
      samples, labels, nfe_used = self.generate_with_nfe(
          params, jax.random.fold_in(rng, i + 1),
          self.config.eval.num_samples, nfe, self.config.eval.labels)
      prefix = samplers.schedule_name(nfe)
      for name, value in self.score(samples, labels).items():
        results[f"{prefix}/{name}"] = value
      if samplers.fixed_nfe(nfe) is None:
        results[f"{prefix}/nfe_used"] = nfe_used
    return results

  def score(self, samples, labels) -> dict[str, float]:
    if self.kind == "toy2d":
      data = toy2d.sample(self.config.data.name, len(samples),
                          np.random.default_rng(12345))
      return {"energy_distance": float(
          distances.energy_distance(samples, data))}
    if self.kind == "digits":
      from mf_jax.evaluation import digits_classifier  # pylint: disable=g-import-not-at-top
      if self._classifier is None:
        self._classifier = digits_classifier.get_classifier()
      return {
          "fd_digits": float(digits_classifier.fd_digits(
              self._classifier, samples)),
          "class_accuracy": float(digits_classifier.class_accuracy(
              self._classifier, samples, labels)),
      }
    return {}
