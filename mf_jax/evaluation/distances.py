"""Distances between sample sets and between Gaussian feature statistics.

All functions accept numpy or jax arrays, compute in float64 on the host (so
metric values do not depend on the accelerator's matmul precision) and return
Python floats.
"""

import numpy as np


def _as_samples(x) -> np.ndarray:
  """Converts to a float64 (n, d) array; 1-D input is n scalar samples."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2:
    raise ValueError(f"Expected samples of shape (n, d), got {x.shape}.")
  return x


def _mean_pairwise_distance(a, b, same: bool, block_size: int) -> float:
  """Mean Euclidean distance over pairs of rows, `block_size` rows at a time.

  Memory stays O(block_size * len(b)). With `same` (a is b) the diagonal is
  excluded, which makes the within-set mean an unbiased U-statistic.
  """
  b_sq = np.sum(b * b, axis=1)
  total = 0.0
  for start in range(0, len(a), block_size):
    block = a[start:start + block_size]
    sq = np.sum(block * block, axis=1)[:, None] + b_sq[None] - 2 * block @ b.T
    dist = np.sqrt(np.maximum(sq, 0.0))
    if same:
      rows = np.arange(len(block))
      dist[rows, start + rows] = 0.0  # Rounding leaves ~1e-8, not exact zeros.
    total += dist.sum()
  pairs = len(a) * (len(a) - 1) if same else len(a) * len(b)
  return total / pairs


def energy_distance(x, y, block_size: int = 1024) -> float:
  """Squared-form energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'|.

  It is zero iff the distributions match and, unlike e.g. MMD, needs no kernel
  bandwidth. The within-set terms exclude self-pairs, so the estimate is
  unbiased: it can be slightly negative (by O(1/n)) for matching samples.
  """
  x, y = _as_samples(x), _as_samples(y)
  if x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise ValueError(f"Need >= 2 samples of equal dim, got {x.shape}, {y.shape}.")
  xy = _mean_pairwise_distance(x, y, False, block_size)
  xx = _mean_pairwise_distance(x, x, True, block_size)
  yy = _mean_pairwise_distance(y, y, True, block_size)
  return float(2 * xy - xx - yy)


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """Sliced 2-Wasserstein distance between two equal-size sample sets.

  In 1-D the optimal coupling of equal-size sets matches sorted values, so
  each random direction costs one sort. Returns sqrt(mean_theta W2^2).
  """
  x, y = _as_samples(x), _as_samples(y)
  if x.shape != y.shape:
    raise ValueError(f"Need equal-size sets of equal dim, got {x.shape}, {y.shape}.")
  theta = np.random.default_rng(seed).standard_normal((x.shape[1], num_projections))
  theta /= np.linalg.norm(theta, axis=0, keepdims=True)
  px, py = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
  return float(np.sqrt(np.mean((px - py) ** 2)))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of (n, d) features, in float64."""
  features = _as_samples(features)
  if len(features) < 2:
    raise ValueError("Need at least 2 samples for a covariance.")
  return features.mean(axis=0), np.cov(features, rowvar=False).reshape(
      features.shape[1], features.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix; clips rounding-negative eigenvalues."""
  evals, evecs = np.linalg.eigh((matrix + matrix.T) / 2)
  return (evecs * np.sqrt(np.maximum(evals, 0.0))) @ evecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}): the FID formula.

  (S1 S2)^{1/2} is similar to the PSD matrix (sqrt(S1) S2 sqrt(S1))^{1/2}, so
  their traces agree. Taking the trace through a symmetric eigendecomposition
  is exact for PSD inputs and avoids sqrtm's complex parts and failures on
  singular covariances (e.g. from dead ReLU features).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1 = np.asarray(sigma1, np.float64)
  sigma2 = np.asarray(sigma2, np.float64)
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  cross = np.sqrt(np.maximum(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0))
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross.sum()
  # The exact value is >= 0; clipping removes rounding noise around 0.
  return float(max(value, 0.0))
