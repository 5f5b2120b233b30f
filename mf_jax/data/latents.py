"""Pre-encoded VAE latents on disk (ArrayRecord shards) and their reader.

`python -m mf_jax.tools.prepare_latents` writes, per image, the posterior
mean and std of the centre crop and of its mirror image. Training reads a
random one of the two (a horizontal flip; `data.random_flip`, default on)
or, with `random_flip=False`, the plain one only, as the official MeanFlow
runs do (their loader ignores its use_flip flag and their latents come
from unflipped crops only). Either way it samples
`(mean + std * eps) * LATENT_SCALE` with fresh eps each time an image is
visited, as the official code does on device.

The directory may be local or a URI (gs://...): the manifest and the
shard listing go through etils.epath, and array_record reads gs:// shards
itself (builds with GCS support, e.g. 0.8.6; with older ones, mount the
bucket with gcsfuse and name the mounted directory).

Layout of a latents directory:
  manifest.json                 what was encoded (VAE file, sizes, counts)
  shard-00000-of-01252.array_record ...
Each record is `label` (int32, little endian) followed by the moments array
(2 views [plain, flipped], 2 moments [mean, std], h, w, c) in the manifest's
dtype. The format is this raw layout, so reading costs one `np.frombuffer`.
"""

import grain
import numpy as np
from etils import epath

from mf_jax import files
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
  if not latents_dir or not files.exists(epath.Path(latents_dir) / MANIFEST):
    raise FileNotFoundError(
        f"No latents in data.latents_dir={latents_dir!r} (no {MANIFEST}); "
        f"make them once with: {PREPARE_COMMAND}")
  return files.read_json(epath.Path(latents_dir) / MANIFEST)


def shard_paths(latents_dir: str, manifest: dict) -> list[str]:
  """All shard files; an incomplete preparation is an error, not less data.

  One directory listing, not a request per shard: on GCS that is a few
  list calls instead of ~1,250 round trips on every host.
  """
  count = manifest["num_shards"]
  names = [shard_name(i, count) for i in range(count)]
  present = {p.name for p in epath.Path(latents_dir).iterdir()}
  missing = [name for name in names if name not in present]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} of {count} latent shards are missing in "
        f"{latents_dir} (e.g. {missing[0]}); rerun the same "
        f"prepare_latents command to finish them: {PREPARE_COMMAND}")
  return [str(epath.Path(latents_dir) / name) for name in names]


def _open_shards(paths: list[str]) -> grain.sources.ArrayRecordDataSource:
  """grain's source over the shards; a build of array_record that cannot
  read the URI is a one-line error saying what to do instead."""
  try:
    return grain.sources.ArrayRecordDataSource(paths)
  except RuntimeError as e:
    if not files.is_remote(paths[0]):
      raise
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise RuntimeError(
        f"array_record could not open {paths[0]} ({reason}): this build may "
        "lack GCS support (array-record 0.8.6 reads gs://). Mount the bucket "
        "with gcsfuse (launch/tpu_pod.sh --latents_bucket=BUCKET) and set "
        "data.latents_dir to the mounted directory, or upgrade "
        "array-record.") from None


class _SampleLatent(grain.transforms.RandomMap):
  """Record -> {'x': scaled latent sample of a view, 'y': label}.

  The view is drawn even when flips are off, so that eps is the same in
  both settings: they differ only in the view read.
  """

  def __init__(self, shape, dtype, random_flip: bool):
    self._shape, self._dtype = tuple(shape), np.dtype(dtype)
    self._random_flip = random_flip

  def random_map(self, element, rng: np.random.Generator):
    label, moments = decode_record(element, self._shape, self._dtype)
    view = rng.integers(2)
    mean, std = moments[view if self._random_flip else 0].astype(np.float32)
    eps = rng.standard_normal(self._shape, dtype=np.float32)
    return {"x": (mean + std * eps) * np.float32(LATENT_SCALE),
            "y": np.int32(label)}


def examples(latents_dir: str, seed: int,
             random_flip: bool = True) -> grain.MapDataset:
  """The global stream of training examples: every record once per epoch,
  a new order each epoch, a random view (the plain one without
  `random_flip`) and fresh noise at every visit.

  Elements are {'x': (h, w, c) float32 scaled latents, 'y': int32}. Hosts
  take their rows of each global batch from this one stream (pipeline.py),
  and only the records they take are read.
  """
  manifest = read_manifest(latents_dir)
  source = _open_shards(shard_paths(latents_dir, manifest))
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds.random_map(
      _SampleLatent(manifest["latent_shape"], manifest["dtype"],
                    random_flip), seed=seed + 1)
