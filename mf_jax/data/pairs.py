"""A teacher's (noise, sample) pairs on disk: the data of reflow.

`python -m mf_jax.tools.make_pairs --teacher=FILE --num=N --output=DIR`
integrates a frozen network's probability-flow ODE from noise e at t = 1
to its sample x at t = 0 and stores each pair with its class label. Reflow
(objectives/reflow.py) then trains on the coupling (x, e) instead of an
independent draw of noise per example: `data.pairs_dir=DIR` makes the
training pipeline read these pairs, with batches {'x': sample, 'e': noise,
'y': label}.

Layout of a pairs directory (the latents' layout, data/latents.py):
  manifest.json                 teacher, solver, seed, shape, counts
  shard-00000-of-00010.array_record ...
Shard k holds pairs k * shard_size, ... in index order. Each record is the
label (int32, little endian) followed by a float32 array (2, *shape): the
noise, then the sample (latents.encode_record of the two stacked, as
tools/prepare_latents.write_shard writes it). Pair i is a function of
(seed, i) alone, so a directory's content does not depend on how many
devices or hosts made it.
"""

import grain
import numpy as np
from etils import epath

from mf_jax import files
from mf_jax.data import latents

MANIFEST = latents.MANIFEST
MAKE_COMMAND = ("python -m mf_jax.tools.make_pairs --teacher=FILE --num=N "
                "--output=DIR")
_DTYPE = np.dtype("<f4")


def decode_record(record: bytes, shape) -> tuple[int, np.ndarray, np.ndarray]:
  """(label, noise, sample) of one record; `shape` is one example's."""
  label, = np.frombuffer(record, "<i4", count=1)
  arrays = np.frombuffer(record, _DTYPE, offset=4).reshape(2, *shape)
  return int(label), arrays[0], arrays[1]


def exists(pairs_dir: str) -> bool:
  return bool(pairs_dir) and files.exists(epath.Path(pairs_dir) / MANIFEST)


def read_manifest(pairs_dir: str) -> dict:
  if not exists(pairs_dir):
    raise FileNotFoundError(
        f"No pairs in data.pairs_dir={pairs_dir!r} (no {MANIFEST}); make "
        f"them with: {MAKE_COMMAND}")
  return files.read_json(epath.Path(pairs_dir) / MANIFEST)


def shard_paths(pairs_dir: str, manifest: dict) -> list[str]:
  """All shard files; an unfinished make_pairs run is an error, not less
  data (rerunning its command finishes it)."""
  count = manifest["num_shards"]
  names = [latents.shard_name(k, count) for k in range(count)]
  present = {p.name for p in epath.Path(pairs_dir).iterdir()}
  missing = [name for name in names if name not in present]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} of {count} pair shards are missing in {pairs_dir} "
        f"(e.g. {missing[0]}); rerun the make_pairs command that started "
        "them to finish.")
  return [str(epath.Path(pairs_dir) / name) for name in names]


def check_fits(pairs_dir: str, model_config):
  """The pairs are examples of the model's input shape and classes: one
  line naming both if not (checked before anything compiles)."""
  manifest = read_manifest(pairs_dir)
  shape = tuple(manifest["shape"])
  want = {"in_channels": shape[-1]}
  if len(shape) == 3:
    want["input_size"] = shape[0]
  want["num_classes"] = manifest["num_classes"]
  for field, theirs in want.items():
    ours = model_config.get(field)
    if ours is not None and ours != theirs:
      raise ValueError(
          f"data.pairs_dir={pairs_dir!r} holds pairs of shape {shape} with "
          f"num_classes={manifest['num_classes']}; the model has "
          f"model.{field}={ours}.")


def _source(pairs_dir: str):
  manifest = read_manifest(pairs_dir)
  source = grain.sources.ArrayRecordDataSource(
      shard_paths(pairs_dir, manifest))
  return source, tuple(manifest["shape"])


def examples(pairs_dir: str, seed: int) -> grain.MapDataset:
  """The global stream of training examples: every pair once per epoch, a
  new order each epoch; elements {'x': sample, 'e': noise, 'y': label}.
  No augmentation: a flipped sample is not its noise's image."""
  source, shape = _source(pairs_dir)

  def element(record):
    label, noise, sample = decode_record(record, shape)
    return {"x": sample, "e": noise, "y": np.int32(label)}

  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds.map(element)


def read_all(pairs_dir: str) -> dict[str, np.ndarray]:
  """Every pair in index order, {'x', 'e', 'y'} numpy arrays (small sets:
  tests and figures)."""
  source, shape = _source(pairs_dir)
  rows = [decode_record(source[i], shape) for i in range(len(source))]
  return {"x": np.stack([r[2] for r in rows]),
          "e": np.stack([r[1] for r in rows]),
          "y": np.array([r[0] for r in rows], np.int32)}
