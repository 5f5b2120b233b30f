"""FID and Inception Score from Inception features, and reference statistics.

Conventions, chosen to match the numbers papers quote (ADM's evaluator,
which MeanFlow and its successors report):

- FID is the Fréchet distance between Gaussians fitted to pool3 features,
  mean and unbiased covariance (np.cov), all in float64. The matrix square
  root goes through a symmetric eigendecomposition
  (`distances.frechet_distance`); for the well-conditioned 2048-d
  covariances of 50k samples it agrees with ADM's scipy.linalg.sqrtm.
- Inception Score: softmax over all 1008 logits of the TF graph, computed
  without the fc bias (ADM's `softmax/logits/MatMul`, improved-GAN's IS,
  torch-fidelity's `logits_unbiased`); exp(mean KL(p(y|x) || p(y))) per
  contiguous split, averaged over splits. ADM splits into chunks of 5000
  samples, which for 50k samples is the standard 10 splits used here.
  (torch-fidelity shuffles before splitting; ADM and this code do not.)
- Reference statistics are npz files with `mu` and `sigma` (ADM's reference
  batches such as VIRTUAL_imagenet256_labeled.npz hold them beside the
  images `arr_0`; pytorch-fid's saved statistics use the same keys), or
  `ref_mu`/`ref_sigma` (the official MeanFlow JAX code's files). Paths may
  be URIs (gs://...): they are read from a local copy (`files.local_copy`).
  Statistics written here also name the FID protocol their features were
  computed with (`protocol`, see inception.PROTOCOLS): scoring samples of
  one protocol against statistics of another fails instead of returning a
  number that means nothing. Files without it (ADM's, pytorch-fid's) are
  taken as they are.
"""

import numpy as np
from etils import epath
from scipy import special

from mf_jax import files
from mf_jax.evaluation import distances

frechet_distance = distances.frechet_distance

MU_KEYS = ("mu", "ref_mu")
SIGMA_KEYS = ("sigma", "ref_sigma")


class RunningStats:
  """Mean and covariance of features seen in batches, in float64.

  Keeps the count, the sum and the sum of outer products (d x d float64, 32
  MiB for d = 2048), so 50k samples never have to be in memory at once.
  Features are shifted by the first batch's mean before accumulating: the
  covariance then comes from a difference of numbers of the size of the
  covariance itself, not of the squared mean, which keeps float64 exact
  enough even when the mean dominates.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._shift = None
    self._sum = np.zeros((dim,), np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features):
    features = np.asarray(features, np.float64).reshape(-1, self.dim)
    if not len(features):
      return
    if self._shift is None:
      self._shift = features.mean(axis=0)
    centred = features - self._shift
    self.count += len(features)
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred

  @property
  def mean(self) -> np.ndarray:
    return self._shift + self._sum / self.count

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance, as np.cov(features, rowvar=False)."""
    if self.count < 2:
      raise ValueError("Need at least 2 samples for a covariance.")
    centred_mean = self._sum / self.count
    return (self._outer - self.count * np.outer(centred_mean, centred_mean)
           ) / (self.count - 1)


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over contiguous splits of exp(E_x KL(p(y|x) || p(y))).

  Uniform predictions give 1; confident predictions spread evenly over K
  classes give K (per split).
  """
  log_p = special.log_softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  for part in np.array_split(log_p, num_splits):
    if not len(part):
      continue
    # log p(y) from log-probabilities: finite even where p(y|x) underflows.
    log_marginal = special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _first_key(data, keys, path):
  for key in keys:
    if key in data.files:
      return np.asarray(data[key], np.float64)
  raise KeyError(f"{path} has none of {keys}; its arrays are {data.files}. "
                 "Compute statistics from images with mf_jax.tools.fid "
                 "--compute_ref_from.")


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an ADM reference batch or a pytorch-fid/MeanFlow npz."""
  with np.load(files.local_copy(path)) as data:
    return _first_key(data, MU_KEYS, path), _first_key(data, SIGMA_KEYS, path)


def has_stats(path: str) -> bool:
  with np.load(files.local_copy(path)) as data:
    return any(k in data.files for k in MU_KEYS)


def stats_protocol(path: str) -> str | None:
  """The FID protocol a statistics file names, or None (e.g. ADM's)."""
  with np.load(files.local_copy(path)) as data:
    return str(data["protocol"]) if "protocol" in data.files else None


def check_protocol(path: str, protocol: str):
  """ValueError unless the statistics in `path` (if they say) were computed
  with `protocol`."""
  stored = stats_protocol(path)
  if stored is not None and stored != protocol:
    raise ValueError(
        f"its statistics were computed with FID protocol {stored!r}, not "
        f"{protocol!r}; recompute them with --fid_protocol={protocol} or "
        f"score with eval.fid_protocol={stored!r}")


def check_stats(path: str, dim: int, protocol: str | None = None):
  """Fails in seconds, with a ValueError saying what is wrong, unless
  `path` holds `dim`-d statistics (mu, sigma) of `protocol` (when given
  and recorded) or uint8 images (arr_0) to compute them from; reads the npz
  headers (and the small `protocol` entry) only."""
  shapes = files.tensor_shapes(files.local_copy(path))
  mu = next((k for k in MU_KEYS if k in shapes), None)
  if mu is not None:
    sigma = SIGMA_KEYS[MU_KEYS.index(mu)]
    if shapes[mu] != (dim,) or shapes.get(sigma) != (dim, dim):
      raise ValueError(f"{mu} has shape {shapes[mu]} and {sigma} "
                       f"{shapes.get(sigma)}; FID's Inception needs ({dim},) "
                       f"and ({dim}, {dim})")
    if protocol is not None:
      check_protocol(path, protocol)
    return
  images = shapes.get("arr_0")
  if images is None or len(images) != 4 or images[-1] not in (1, 3):
    raise ValueError(f"neither statistics ({'/'.join(MU_KEYS)}) nor NHWC "
                     f"images (arr_0) in it; its arrays: {shapes}")


def save_stats(path: str, mu, sigma, **extra):
  """Writes `mu` and `sigma` (the keys ADM and pytorch-fid read) to npz,
  local or remote; `extra` arrays (e.g. num_images, protocol) beside them."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    np.savez(f, mu=np.asarray(mu, np.float64),
             sigma=np.asarray(sigma, np.float64), **extra)
