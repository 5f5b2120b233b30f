"""Tests for the toy 2-D samplers and the 8x8 digits splits."""

import time

import numpy as np
import pytest

from mf_jax.data import digits
from mf_jax.data import toy2d


@pytest.mark.parametrize("name", list(toy2d.DATASETS))
def test_toy_shape_dtype_and_scale(name):
  x = toy2d.sample(name, 20_000, np.random.default_rng(0))
  assert x.shape == (20_000, 2) and x.dtype == np.float32
  assert np.all(np.isfinite(x))
  # Roughly standardised, so unit Gaussian noise is a sensible source.
  assert np.all(np.abs(x.mean(axis=0)) < 0.1)
  assert np.all((x.std(axis=0) > 0.5) & (x.std(axis=0) < 2.5))


@pytest.mark.parametrize("name", list(toy2d.DATASETS))
def test_toy_deterministic_given_generator(name):
  a = toy2d.sample(name, 1000, np.random.default_rng(7))
  b = toy2d.sample(name, 1000, np.random.default_rng(7))
  c = toy2d.sample(name, 1000, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_toy_million_samples_are_fast():
  rng = np.random.default_rng(0)
  for name in toy2d.DATASETS:
    start = time.perf_counter()
    toy2d.sample(name, 1_000_000, rng)
    # Generous bound for shared CI machines; guards against Python loops.
    assert time.perf_counter() - start < 3.0, name


def test_checkerboard_lands_on_black_squares_uniformly():
  x = toy2d.sample("checkerboard", 80_000, np.random.default_rng(0))
  assert np.all((x >= -2) & (x <= 2))
  cells = np.floor(x + 2).astype(int).clip(0, 3)
  assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)
  counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
  black = counts[counts > 0]
  assert len(black) == 8
  np.testing.assert_allclose(black / len(x), 1 / 8, atol=0.01)


def test_eight_gaussians_cluster_on_the_circle():
  x = toy2d.sample("8gaussians", 8000, np.random.default_rng(0))
  angles = np.arange(8) * np.pi / 4
  centres = 2 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  dist = np.linalg.norm(x[:, None] - centres[None], axis=-1)
  assert np.all(dist.min(axis=1) < 1.0)
  np.testing.assert_allclose(
      np.bincount(dist.argmin(axis=1), minlength=8) / len(x), 1 / 8, atol=0.02)


def test_spirals_are_point_symmetric():
  x = toy2d.sample("spirals", 50_000, np.random.default_rng(0))
  # Both arms are equally likely, so x and -x have the same distribution.
  np.testing.assert_allclose(np.sort(x[:, 0]), np.sort(-x[:, 0]), atol=0.1)


def test_unknown_toy_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    toy2d.sample("swissroll", 10, np.random.default_rng(0))
  message = str(err.value)
  assert "\n" not in message
  assert all(name in message for name in toy2d.DATASETS)


@pytest.mark.parametrize("split", digits.SPLITS)
def test_digits_format(split):
  images, labels = digits.load(split)
  assert images.shape[1:] == digits.IMAGE_SHAPE and images.dtype == np.float32
  assert labels.shape == images.shape[:1] and labels.dtype == np.int32
  assert images.min() == -1.0 and images.max() == 1.0
  assert set(np.unique(labels)) == set(range(digits.NUM_CLASSES))


def test_digits_train_is_everything():
  images, _ = digits.load("train")
  assert len(images) == 1797
  assert len(digits.load()[0]) == 1797


def test_classifier_splits_partition_and_stratify():
  full, full_labels = digits.load("train")
  train, train_labels = digits.load("classifier_train")
  test, test_labels = digits.load("classifier_test")
  assert len(train) + len(test) == len(full)

  def sorted_rows(a):
    flat = a.reshape(len(a), -1)
    return flat[np.lexsort(flat.T[::-1])]

  # Same multiset of images, so the two splits partition the data set.
  np.testing.assert_array_equal(
      sorted_rows(np.concatenate([train, test])), sorted_rows(full))
  expected = 0.2 * np.bincount(full_labels)
  assert np.all(np.abs(np.bincount(test_labels) - expected) <= 1)
  assert np.array_equal(np.bincount(train_labels) + np.bincount(test_labels),
                        np.bincount(full_labels))


def test_digits_split_is_deterministic_and_copies():
  a, _ = digits.load("classifier_test")
  a[:] = 0.0
  b, _ = digits.load("classifier_test")
  assert b.min() == -1.0  # Mutating a returned array leaves the source intact.
  np.testing.assert_array_equal(b, digits.load("classifier_test")[0])


def test_unknown_digits_split():
  with pytest.raises(ValueError, match="classifier_test"):
    digits.load("validation")
