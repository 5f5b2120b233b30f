"""Training data as grain pipelines, one per host, and global batches.

There is one global stream of examples, the same for any number of hosts;
each host reads (loads, decodes, augments) only the rows of each global
batch its devices hold (`sharding.process_batch_rows`) and yields them as
numpy; `to_global` assembles the global `jax.Array` sharded over the mesh.
So a run on 2 hosts x 4 devices trains on exactly the batches of a run on
one host with 8 devices. Batch k of the stream is the batch of training
step k + 1 on every host count, so a resumed run starts the stream at its
step and sees exactly the data it would have seen, on any number of hosts,
with nothing but the step stored in the checkpoint.

Batches are dicts: 'x' float32 data (NHWC images in [-1, 1], or (B, D)
points) and 'y' int32 class labels (zeros for unconditional data); image
batches for a model with `augment_dim` also carry 'augment_labels' (B, 6),
EDM's augmentation parameters (data/augment.py, probability data.augment_p).
With `data.pairs_dir` the examples are a teacher's pairs instead (reflow,
data/pairs.py): batches {'x': sample, 'e': its noise, 'y'}, not augmented.
"""

import os

import grain
import jax
import numpy as np

from mf_jax.data import augment
from mf_jax.data import digits
from mf_jax.data import latents
from mf_jax.data import pairs
from mf_jax.data import toy2d

TFDS_DATASETS = ("cifar10", "mnist", "fashion_mnist", "svhn_cropped")
LATENT_DATASETS = ("imagenet256_latents",)


def dataset_kind(name: str) -> str:
  """'toy2d', 'digits' or 'tfds'; a clear error for anything else."""
  if name in toy2d.DATASETS:
    return "toy2d"
  if name == "digits":
    return "digits"
  if name in TFDS_DATASETS:
    return "tfds"
  if name in LATENT_DATASETS:
    return "latents"
  raise ValueError(
      f"Unknown data.name {name!r}; valid: {sorted(toy2d.DATASETS)}, "
      f"'digits', a TFDS image dataset {TFDS_DATASETS} or {LATENT_DATASETS}.")


def _toy2d_dataset(config, rows):
  """Fresh points every step: element i is a whole global batch drawn from
  seed i, of which this host keeps its rows (2-D points cost nothing)."""
  name, batch_size = config.data.name, config.training.batch_size

  def make_batch(_, rng):
    return {"x": toy2d.sample(name, batch_size, rng)[rows],
            "y": np.zeros((len(rows),), np.int32)}

  seed = config.data.shuffle_seed * 1_000_003
  return grain.MapDataset.range(2**40).random_map(make_batch, seed=seed)


def _process_share(ds, rows, batch_size: int):
  """Batches of this host's `rows` of each global batch of `ds`.

  `ds` is the global, per-example stream; it is indexed lazily, so only
  this host's examples are loaded and mapped, and random maps see the same
  global index (the same flip, the same augmentation) on any host count.
  """
  rows = np.asarray(rows)

  def element(j):
    step, k = divmod(j, len(rows))
    return ds[step * batch_size + int(rows[k])]

  share = grain.MapDataset.range(len(ds) // batch_size * len(rows))
  return share.map(element).batch(len(rows), drop_remainder=True)


def _array_dataset(images, labels, config, rows, flip: bool):
  """Shuffled epochs (a new order each epoch) over in-memory arrays."""
  def element(i):
    return {"x": images[i], "y": labels[i]}

  ds = grain.MapDataset.source(np.arange(len(images))).map(element)
  ds = ds.shuffle(seed=config.data.shuffle_seed).repeat()
  if flip:
    ds = ds.random_map(_random_flip, seed=config.data.shuffle_seed + 1)
  ds = augment.add_to_dataset(ds, config, seed=config.data.shuffle_seed + 2)
  return _process_share(ds, rows, config.training.batch_size)


def _random_flip(element, rng):
  if rng.random() < 0.5:
    element = dict(element, x=element["x"][:, ::-1])
  return element


def tfds_source(name: str, split: str, data_dir: str):
  """A random-access TFDS source, or a one-line error saying how to make it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or os.path.expanduser("~/tensorflow_datasets")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not os.path.isdir(builder.data_dir):
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it "
        f"once with: tfds build {name} --data_dir={data_dir} "
        f"--file_format=array_record")
  return tfds.data_source(name, split=split, data_dir=data_dir,
                          download=False)


def _tfds_dataset(config, rows):
  source = tfds_source(config.data.name, "train", config.data.tfds_data_dir)

  def element(record):
    image = np.asarray(record["image"], np.float32) / 127.5 - 1.0
    return {"x": image, "y": np.int32(record["label"])}

  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=config.data.shuffle_seed).repeat().map(element)
  ds = ds.random_map(_random_flip, seed=config.data.shuffle_seed + 1)
  ds = augment.add_to_dataset(ds, config, seed=config.data.shuffle_seed + 2)
  return _process_share(ds, rows, config.training.batch_size)


def default_rows(batch_size: int) -> np.ndarray:
  """Process p's rows when each host's devices hold one contiguous block."""
  local = batch_size // jax.process_count()
  return np.arange(local) + jax.process_index() * local


def make_train_iterator(config, rows=None,
                        start_step: int = 0) -> grain.DatasetIterator:
  """This host's iterator of its `rows` of each global training batch
  (from `sharding.process_batch_rows`; default: `default_rows`), from the
  batch of step `start_step + 1` on."""
  if rows is None:
    rows = default_rows(config.training.batch_size)
  kind = dataset_kind(config.data.name)
  if config.data.get("pairs_dir"):  # a teacher's (noise, sample) pairs
    ds = pairs.examples(config.data.pairs_dir, config.data.shuffle_seed)
    ds = _process_share(ds, rows, config.training.batch_size)
  elif kind == "toy2d":
    ds = _toy2d_dataset(config, rows)
  elif kind == "digits":
    images, labels = digits.load("train")
    ds = _array_dataset(images, labels, config, rows, flip=False)
  elif kind == "tfds":
    ds = _tfds_dataset(config, rows)
  else:  # VAE latents made by mf_jax.tools.prepare_latents
    ds = latents.examples(config.data.latents_dir, config.data.shuffle_seed,
                          config.data.get("random_flip", True))
    ds = _process_share(ds, rows, config.training.batch_size)
  return iter(ds[start_step:].to_iter_dataset())


def to_global(batch, sharding) -> dict[str, jax.Array]:
  """Assembles the global batch from every host's local numpy batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
