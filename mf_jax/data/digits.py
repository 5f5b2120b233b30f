"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

Splits:
  "train": all 1797 images. Generative models train on everything; their
    samples are compared against statistics of the full set.
  "classifier_train" / "classifier_test": a fixed stratified 80/20 partition
    (per class, a seeded permutation puts the first 20% in test) used only to
    fit and validate the FD-digits feature classifier.
"""

import functools

import numpy as np
from sklearn import datasets

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
SPLITS = ("train", "classifier_train", "classifier_test")

_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


@functools.cache
def _all() -> tuple[np.ndarray, np.ndarray]:
  """Loads the images once; pixels 0..16 map linearly onto [-1, 1]."""
  raw = datasets.load_digits()
  images = (raw.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  return images, raw.target.astype(np.int32)


@functools.cache
def _classifier_test_mask() -> np.ndarray:
  """Stratified test membership, so both splits keep the class balance."""
  _, labels = _all()
  rng = np.random.default_rng(_SPLIT_SEED)
  mask = np.zeros(labels.shape, dtype=bool)
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    mask[idx[:round(_TEST_FRACTION * len(idx))]] = True
  return mask


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Returns (images float32 (N, 8, 8, 1) in [-1, 1], labels int32 (N,)).

  Fresh copies are returned so callers may modify them freely.
  """
  images, labels = _all()
  if split == "train":
    keep = np.ones(labels.shape, dtype=bool)
  elif split == "classifier_test":
    keep = _classifier_test_mask()
  elif split == "classifier_train":
    keep = ~_classifier_test_mask()
  else:
    raise ValueError(f"Unknown digits split {split!r}; valid: {', '.join(SPLITS)}.")
  return images[keep], labels[keep]
