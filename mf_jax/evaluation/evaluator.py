"""Sample-quality evaluation at several NFE, independent of the objective.

The evaluator only sees a sampler (the one the objective names) and the
parameters; it draws samples over all devices and scores them against data:
energy distance for 2-D targets, a Fréchet distance in the feature space of
the project's digits classifier (and that classifier's agreement with the
conditioning labels) for the 8x8 digits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mf_jax import objectives
from mf_jax import samplers
from mf_jax import sharding
from mf_jax.data import pipeline
from mf_jax.data import toy2d
from mf_jax.evaluation import distances


class Evaluator:
  """Generates samples at a given NFE and scores them."""

  def __init__(self, config, u_fn, mesh, input_shape):
    self.config = config
    self.kind = pipeline.dataset_kind(config.data.name)
    sampler = samplers.SAMPLERS[objectives.get(config.objective.name).SAMPLER]
    self.mesh = mesh
    self.input_shape = input_shape
    sharding.check_batch_size(config.eval.batch_size, mesh,
                              "eval.batch_size")
    self._sample = jax.jit(
        functools.partial(self._sample_batch, sampler, u_fn),
        static_argnums=(3,))
    self._classifier = None

  def _sample_batch(self, sampler, u_fn, params, rng, labels, schedule):
    shape = (labels.shape[0], *self.input_shape)
    noise = jax.random.normal(rng, shape)
    noise = jax.lax.with_sharding_constraint(
        noise, sharding.batch_sharding(self.mesh))
    return sampler(u_fn, params, noise, labels, samplers.timesteps(schedule))

  def generate(self, params, rng, num: int, nfe: int | str, label_mode: str):
    """`num` samples and their labels as numpy, in batches of eval size;
    `nfe` is a step count or an explicit schedule (samplers.parse_schedule)."""
    batch = self.config.eval.batch_size
    num_classes = self.config.model.num_classes
    rng_labels, rng_noise = jax.random.split(rng)
    labels = np.asarray(samplers.make_labels(rng_labels, num, num_classes,
                                             label_mode))
    chunks = []
    for i, start in enumerate(range(0, num, batch)):
      chunk = np.resize(labels[start:start + batch], batch)
      out = self._sample(params, jax.random.fold_in(rng_noise, i),
                         jnp.asarray(chunk), nfe)
      chunks.append(multihost_utils.process_allgather(out, tiled=True))
    return np.concatenate(chunks)[:num], labels

  @property
  def scores_samples(self) -> bool:
    """Whether `score` measures anything for this data (2-D points and
    digits); images and latents are scored by FID, outside this class."""
    return self.kind in ("toy2d", "digits")

  def __call__(self, params, rng) -> dict[str, float]:
    """Scores at every schedule of `eval.nfe`; keys like
    'nfe1/energy_distance' or 'nfe2[1,0.6,0]/energy_distance'."""
    results = {}
    if not self.scores_samples:  # sampling for nothing costs a whole pass
      return results
    for i, nfe in enumerate(self.config.eval.nfe):
      samples, labels = self.generate(params, jax.random.fold_in(rng, i + 1),
                                      self.config.eval.num_samples, nfe,
                                      self.config.eval.labels)
      for name, value in self.score(samples, labels).items():
        results[f"{samplers.schedule_name(nfe)}/{name}"] = value
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
