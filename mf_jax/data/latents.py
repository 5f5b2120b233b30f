"""Pre-encoded VAE latents on disk (ArrayRecord shards) and their reader.

`python -m mf_jax.tools.prepare_latents` writes, per image, the posterior
mean and std of the centre crop and of its mirror image. Training reads a
random one of the two (a horizontal flip, which the official MeanFlow code
skips) and samples `(mean + std * eps) * LATENT_SCALE` with fresh eps each
time an image is visited, as the official code does on device.

Layout of a latents directory:
  manifest.json                 what was encoded (VAE file, sizes, counts)
  shard-00000-of-01252.array_record ...
Each record is `label` (int32, little endian) followed by the moments array
(2 views [plain, flipped], 2 moments [mean, std], h, w, c) in the manifest's
dtype. The format is this raw layout, so reading costs one `np.frombuffer`.
"""

import json
import os

import grain
import numpy as np

from mf_jax.models.vae import LATENT_SCALE

MANIFEST = "manifest.json"
PREPARE_COMMAND = ("python -m mf_jax.tools.prepare_latents --vae=FILE "
                   "--source=IMAGENET_TRAIN_DIR --output=DIR")
_LABEL = np.dtype("<i4")


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def encode_record(label: int, moments: np.ndarray) -> bytes:
  """`moments`: (2 views, 2 moments, h, w, c)."""
  return np.array(label, _LABEL).tobytes() + np.ascontiguousarray(
      moments).tobytes()


def decode_record(record: bytes, shape, dtype) -> tuple[int, np.ndarray]:
  label = int(np.frombuffer(record, _LABEL, count=1)[0])
  moments = np.frombuffer(record, np.dtype(dtype), offset=_LABEL.itemsize)
  return label, moments.reshape(2, 2, *shape)


def read_manifest(latents_dir: str) -> dict:
  path = os.path.join(latents_dir or "", MANIFEST)
  if not latents_dir or not os.path.isfile(path):
    raise FileNotFoundError(
        f"No latents in data.latents_dir={latents_dir!r} (no {MANIFEST}); "
        f"make them once with: {PREPARE_COMMAND}")
  with open(path) as f:
    return json.load(f)


def shard_paths(latents_dir: str, manifest: dict) -> list[str]:
  """All shard files; an incomplete preparation is an error, not less data."""
  count = manifest["num_shards"]
  paths = [os.path.join(latents_dir, shard_name(i, count))
           for i in range(count)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} of {count} latent shards are missing in "
        f"{latents_dir} (e.g. {os.path.basename(missing[0])}); rerun the "
        f"same prepare_latents command to finish them: {PREPARE_COMMAND}")
  return paths


class _SampleLatent(grain.transforms.RandomMap):
  """Record -> {'x': scaled latent sample of a random view, 'y': label}."""

  def __init__(self, shape, dtype):
    self._shape, self._dtype = tuple(shape), np.dtype(dtype)

  def random_map(self, element, rng: np.random.Generator):
    label, moments = decode_record(element, self._shape, self._dtype)
    mean, std = moments[rng.integers(2)].astype(np.float32)
    eps = rng.standard_normal(self._shape, dtype=np.float32)
    return {"x": (mean + std * eps) * np.float32(LATENT_SCALE),
            "y": np.int32(label)}


def examples(latents_dir: str, seed: int) -> grain.MapDataset:
  """The global stream of training examples: every record once per epoch,
  a new order each epoch, a random view and fresh noise at every visit.

  Elements are {'x': (h, w, c) float32 scaled latents, 'y': int32}. Hosts
  take their rows of each global batch from this one stream (pipeline.py),
  and only the records they take are read.
  """
  manifest = read_manifest(latents_dir)
  source = grain.sources.ArrayRecordDataSource(
      shard_paths(latents_dir, manifest))
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds.random_map(
      _SampleLatent(manifest["latent_shape"], manifest["dtype"]),
      seed=seed + 1)
