"""Training data as grain pipelines, one per host, and global batches.

Each host reads only its shard of the data and yields its share of the
global batch as numpy; `to_global` assembles the global `jax.Array` sharded
over the mesh. Pipelines are grain iterators, so their position is part of
every checkpoint and a resumed run sees exactly the data it would have seen.

Batches are dicts: 'x' float32 data (NHWC images in [-1, 1], or (B, D)
points) and 'y' int32 class labels (zeros for unconditional data).
"""

import os

import grain
import jax
import numpy as np

from mf_jax.data import digits
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


def _toy2d_dataset(config, local_batch, process_index):
  """Fresh points every step: element i is a whole batch drawn from seed i."""
  name = config.data.name

  def make_batch(_, rng):
    return {"x": toy2d.sample(name, local_batch, rng),
            "y": np.zeros((local_batch,), np.int32)}

  seed = config.data.shuffle_seed * 1_000_003 + process_index
  return grain.MapDataset.range(2**40).random_map(make_batch, seed=seed)


def _array_dataset(images, labels, config, local_batch, process_index,
                   process_count, flip: bool):
  """Shuffled epochs (a new order each epoch) over in-memory arrays."""
  def element(i):
    return {"x": images[i], "y": labels[i]}

  ds = grain.MapDataset.source(np.arange(len(images)))
  ds = ds[process_index::process_count].map(element)
  ds = ds.shuffle(seed=config.data.shuffle_seed).repeat()
  if flip:
    ds = ds.random_map(_random_flip, seed=config.data.shuffle_seed + 1)
  return ds.batch(local_batch, drop_remainder=True)


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


def _tfds_dataset(config, local_batch, process_index, process_count):
  source = tfds_source(config.data.name, "train", config.data.tfds_data_dir)

  def element(record):
    image = np.asarray(record["image"], np.float32) / 127.5 - 1.0
    return {"x": image, "y": np.int32(record["label"])}

  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=config.data.shuffle_seed).repeat().map(element)
  ds = ds.random_map(_random_flip, seed=config.data.shuffle_seed + 1)
  return ds.batch(local_batch, drop_remainder=True)


def make_train_iterator(config) -> grain.DatasetIterator:
  """This host's iterator of its share of each global training batch."""
  process_index, process_count = jax.process_index(), jax.process_count()
  local_batch = config.training.batch_size // process_count
  kind = dataset_kind(config.data.name)
  if kind == "toy2d":
    ds = _toy2d_dataset(config, local_batch, process_index)
  elif kind == "digits":
    images, labels = digits.load("train")
    ds = _array_dataset(images, labels, config, local_batch, process_index,
                        process_count, flip=False)
  elif kind == "tfds":
    ds = _tfds_dataset(config, local_batch, process_index, process_count)
  else:
    raise FileNotFoundError(
        f"No reader for {config.data.name!r} latents yet: the ImageNet latent "
        "preparation tool and its reader are not part of this build.")
  return iter(ds.to_iter_dataset())


def to_global(batch, sharding) -> dict[str, jax.Array]:
  """Assembles the global batch from every host's local numpy batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
