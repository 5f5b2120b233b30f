"""Tests for the FD-digits classifier: training, caching and the metrics."""

import os

import jax
import numpy as np
import pytest

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


def test_fd_is_deterministic(classifier):
  real, _ = digits.load("classifier_test")
  assert dc.fd_digits(classifier, real) == dc.fd_digits(classifier, real)
  assert classifier.reference_stats() is classifier.reference_stats()


def test_noise_class_accuracy_is_chance(classifier):
  rng = np.random.default_rng(0)
  noise = rng.uniform(-1, 1, (4000, 8, 8, 1))
  labels = rng.integers(0, digits.NUM_CLASSES, len(noise))
  assert abs(dc.class_accuracy(classifier, noise, labels) - 0.1) < 0.03
