"""Tests for the FD-digits classifier: training, caching and the metrics."""

import os
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg

from mf_jax.data import digits
from mf_jax.evaluation import digits_classifier as dc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mf_jax_cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
  return dc.get_classifier(cache_dir)  # Empty cache: trains and writes it.


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cache_round_trip_and_retraining_are_bit_identical(classifier, cache_dir):
  assert os.listdir(cache_dir) == [os.path.basename(dc.cache_path(cache_dir))]
  _assert_trees_equal(dc.get_classifier(cache_dir).params, classifier.params)
  _assert_trees_equal(dc.train_params(), classifier.params)


def test_cache_path_tracks_recipe_and_env(monkeypatch, tmp_path):
  monkeypatch.setenv("MF_JAX_CACHE", str(tmp_path))
  default = dc.cache_path()
  assert os.path.dirname(default) == str(tmp_path)
  monkeypatch.setitem(dc.RECIPE, "steps", dc.RECIPE["steps"] + 1)
  assert dc.cache_path() != default


def test_test_accuracy(classifier):
  images, labels = digits.load("classifier_test")
  assert dc.class_accuracy(classifier, images, labels) >= 0.95


def test_batched_outputs_match_small_batches(classifier):
  images = np.random.default_rng(0).uniform(-1, 1, (2500, 8, 8, 1))
  features, logits = classifier.features(images), classifier.logits(images)
  assert features.shape == (2500, dc.RECIPE["feature_dim"])
  assert logits.shape == (2500, digits.NUM_CLASSES)
  np.testing.assert_allclose(classifier.features(images[-7:]), features[-7:],
                             rtol=1e-5, atol=1e-6)


def test_fd_orders_real_above_degenerate_sets(classifier):
  real, _ = digits.load("classifier_test")
  everything, labels = digits.load("train")
  noise = np.random.default_rng(0).uniform(-1, 1, (2000, 8, 8, 1))
  fd_real = dc.fd_digits(classifier, real)
  for fake in (noise, np.repeat(everything[:1], 500, axis=0),
               everything[labels == 0]):
    assert dc.fd_digits(classifier, fake) > 20 * fd_real


def _scipy_fd(features, reference):
  """The FID formula written independently: np.cov and scipy's sqrtm."""
  f, g = np.asarray(features, np.float64), np.asarray(reference, np.float64)
  s1, s2 = np.cov(f, rowvar=False), np.cov(g, rowvar=False)
  with warnings.catch_warnings():  # dead ReLU features: singular S1 S2
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(s1 @ s2).real
  diff = f.mean(axis=0) - g.mean(axis=0)
  return diff @ diff + np.trace(s1 + s2 - 2 * root)


def test_fd_is_the_frechet_distance_of_the_features(classifier):
  """fd_digits against scipy on the same features, FD(P, P) = 0, seeds:
  the same draw gives the same value, another draw another value, and two
  draws of the digits are close where one class alone is far."""
  everything, labels = digits.load("train")
  reference = classifier.features(everything)

  def draw(seed):
    rows = np.random.default_rng(seed).choice(len(everything), 600,
                                              replace=False)
    return everything[rows]

  fds = [dc.fd_digits(classifier, draw(seed)) for seed in (0, 0, 1)]
  assert fds[0] == fds[1] and fds[0] != fds[2]
  for seed, fd in ((0, fds[0]), (1, fds[2])):
    want = _scipy_fd(classifier.features(draw(seed)), reference)
    np.testing.assert_allclose(fd, want, rtol=1e-5)
  one_class = everything[labels == 3]
  far = dc.fd_digits(classifier, one_class)
  np.testing.assert_allclose(
      far, _scipy_fd(classifier.features(one_class), reference), rtol=1e-5)
  assert max(fds) < 0.02 * far
  assert dc.fd_digits(classifier, everything) < 1e-6 * far
  assert classifier.reference_stats() is classifier.reference_stats()


def test_noise_class_accuracy_is_chance(classifier):
  rng = np.random.default_rng(0)
  noise = rng.uniform(-1, 1, (4000, 8, 8, 1))
  labels = rng.integers(0, digits.NUM_CLASSES, len(noise))
  assert abs(dc.class_accuracy(classifier, noise, labels) - 0.1) < 0.03
