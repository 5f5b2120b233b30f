"""A small digits MLP whose penultimate layer defines FD-digits.

There is no Inception network for 8x8 digits, so the project trains its own
feature extractor: a deterministic recipe (fixed seed, fixed steps, trained on
CPU) on the "classifier_train" split. Parameters are cached on disk under a
name that hashes the recipe, so changing the recipe retrains automatically and
everybody's FD-digits numbers come from the same features.
"""

import hashlib
import json
import os
import tempfile

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mf_jax.data import digits
from mf_jax.evaluation import distances

# Any change here changes the cache file name and hence retrains.
RECIPE = {
    "version": 1,
    "hidden_dims": (256,),
    "feature_dim": 128,
    "seed": 0,
    "steps": 1000,
    "batch_size": 128,
    "learning_rate": 2e-3,
    "weight_decay": 1e-4,
}
_EVAL_BATCH = 1024


class DigitsMLP(nn.Module):
  """ReLU MLP on flattened pixels; returns (features, logits).

  An MLP rather than a CNN: on 8x8 inputs it is as accurate (~97%), and its
  training loop runs in about a second on CPU where XLA's small convolutions
  inside `lax.scan` take minutes.
  """
  hidden_dims: tuple[int, ...]
  feature_dim: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden_dims:
      x = nn.relu(nn.Dense(width)(x))
    features = nn.relu(nn.Dense(self.feature_dim)(x))
    return features, nn.Dense(digits.NUM_CLASSES)(features)


def _model() -> DigitsMLP:
  return DigitsMLP(tuple(RECIPE["hidden_dims"]), RECIPE["feature_dim"])


def train_params() -> dict:
  """Trains from scratch with AdamW on shuffled minibatches; deterministic.

  The whole loop is one jitted `lax.scan` pinned to the CPU, so reruns are
  bit-identical and take about a second regardless of the available accelerator.
  """
  images, labels = digits.load("classifier_train")
  model, tx = _model(), optax.adamw(RECIPE["learning_rate"],
                                    weight_decay=RECIPE["weight_decay"])
  steps, batch = RECIPE["steps"], RECIPE["batch_size"]

  def loss_fn(params, idx):
    _, logits = model.apply({"params": params}, images[idx])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels[idx]).mean()

  def step(state, idx):
    params, opt_state = state
    grads = jax.grad(loss_fn)(params, idx)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def train(key):
    init_key, perm_key = jax.random.split(key)
    params = model.init(init_key, images[:1])["params"]
    # Epoch-wise permutations, flattened and cut into `steps` minibatches.
    epochs = -(-steps * batch // len(labels))
    order = jax.vmap(lambda k: jax.random.permutation(k, len(labels)))(
        jax.random.split(perm_key, epochs))
    order = order.reshape(-1)[:steps * batch].reshape(steps, batch)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), order)
    return params

  with jax.default_device(jax.devices("cpu")[0]):
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    params = train(jax.random.key(RECIPE["seed"]))
  return jax.tree.map(np.asarray, params)


def cache_path(cache_dir: str | None = None) -> str:
  """Cache file for the current recipe in `cache_dir` ($MF_JAX_CACHE default)."""
  if cache_dir is None:
    cache_dir = os.environ.get("MF_JAX_CACHE", "~/.cache/mf_jax")
  digest = hashlib.sha256(
      json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser(os.fspath(cache_dir)),
                      f"digits_classifier_{digest}.msgpack")


class DigitsClassifier:
  """Feature extractor and classifier with batched, jitted inference."""

  def __init__(self, params: dict):
    self.params = params
    self._reference_stats = None
    model = _model()
    self._forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def _apply(self, images) -> tuple[np.ndarray, np.ndarray]:
    """Runs fixed-size padded batches so any N compiles only once.

    Inputs are clipped to the data range [-1, 1], as an image pipeline would
    before saving samples, so slightly out-of-range generations are not
    penalised for values no real image can take.
    """
    images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    if images.shape[1:] != digits.IMAGE_SHAPE:
      raise ValueError(f"Expected (N, 8, 8, 1) images, got {images.shape}.")
    feats, logits = [], []
    for start in range(0, len(images), _EVAL_BATCH):
      chunk = images[start:start + _EVAL_BATCH]
      padded = np.zeros((_EVAL_BATCH, *digits.IMAGE_SHAPE), np.float32)
      padded[:len(chunk)] = chunk
      f, l = self._forward(self.params, padded)
      feats.append(np.asarray(f)[:len(chunk)])
      logits.append(np.asarray(l)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features, float32 (N, feature_dim)."""
    return self._apply(images)[0]

  def logits(self, images) -> np.ndarray:
    """Class logits, float32 (N, 10)."""
    return self._apply(images)[1]

  def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of all 1797 digits, computed once."""
    if self._reference_stats is None:
      self._reference_stats = distances.gaussian_stats(
          self.features(digits.load("train")[0]))
    return self._reference_stats


def get_classifier(cache_dir: str | None = None) -> DigitsClassifier:
  """Loads the cached classifier, training and caching it first if needed."""
  path = cache_path(cache_dir)
  if os.path.exists(path):
    with open(path, "rb") as f:
      return DigitsClassifier(serialization.msgpack_restore(f.read()))
  params = train_params()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Write-then-rename so concurrent readers never see a partial file.
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
    f.write(serialization.msgpack_serialize(params))
  os.replace(f.name, path)
  return DigitsClassifier(params)


def fd_digits(classifier: DigitsClassifier, images) -> float:
  """Frechet distance between the features of `images` and of the real digits."""
  mu, sigma = distances.gaussian_stats(classifier.features(images))
  return distances.frechet_distance(mu, sigma, *classifier.reference_stats())


def class_accuracy(classifier: DigitsClassifier, images, labels) -> float:
  """Fraction of `images` classified as their conditioning `labels`."""
  predicted = np.argmax(classifier.logits(images), axis=-1)
  return float(np.mean(predicted == np.asarray(labels)))
