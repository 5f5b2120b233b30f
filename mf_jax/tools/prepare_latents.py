r"""Encodes ImageNet train images into VAE latent shards for training.

  python -m mf_jax.tools.prepare_latents --vae=sd-vae-ft-mse/ \
      --source=/data/imagenet/train --output=/data/in256_latents
  python -m mf_jax.tools.prepare_latents --vae=FILE --source=tfds \
      --tfds_manual_dir=/data/imagenet_tars --output=DIR

Each image gets the ADM centre crop to 256, then the VAE posterior (mean,
std) of the crop and of its mirror image (mf_jax/data/latents.py describes
the records). Shards are fixed runs of `--shard_size` images of the sorted
image list; process p of P encodes shards p, p + P, ... on its local devices
(the batch split over them), so hosts never wait for each other. A shard is
written to a temporary name and renamed when complete, and finished shards
are skipped: rerun the same command after an interruption. `--limit=N`
encodes an evenly spaced subset of N images, for trials. `--output` and
`--vae` may be URIs (gs://...): shards are written locally, then uploaded
under a temporary name and renamed.
"""

import concurrent.futures
import hashlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app
from absl import flags
from absl import logging
from etils import epath

from mf_jax import files
from mf_jax import distributed
from mf_jax import sharding
from mf_jax.data import imagenet
from mf_jax.data import latents
from mf_jax.models import vae as vae_lib

# Manifest fields that must agree with an existing output before resuming.
_RESUME_KEYS = ("vae_sha256", "source", "image_size", "num_images",
                "shard_size", "dtype", "latent_shape")


def make_source(source: str, tfds_data_dir: str = "",
                tfds_manual_dir: str = ""):
  if source == "tfds":
    return imagenet.TfdsSource(tfds_data_dir, tfds_manual_dir)
  return imagenet.FolderSource(source)


def select(num_available: int, limit: int | None) -> np.ndarray:
  """Indices to encode: all, or `limit` evenly spaced (every class shows)."""
  if not limit or limit >= num_available:
    return np.arange(num_available)
  return np.linspace(0, num_available - 1, limit).round().astype(np.int64)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(files.local_copy(path), "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def check_or_write_manifest(output: str, manifest: dict,
                            resume_keys=_RESUME_KEYS):
  """Process 0 writes the manifest; a resume must match what was started
  in `resume_keys` (make_pairs passes its own)."""
  path = epath.Path(output) / latents.MANIFEST
  if path.exists():
    old = files.read_json(path)
    changed = [k for k in resume_keys if old.get(k) != manifest[k]]
    if changed:
      raise ValueError(f"{output} holds shards made with different "
                       f"{changed}; use a new --output directory.")
  elif jax.process_index() == 0:
    _atomic_write(path, json.dumps(manifest, indent=2).encode())


def _atomic_write(path: epath.Path, data: bytes):
  tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(path)


def _encoder(module, params, mesh):
  """Jitted uint8 crops (B, H, W, 3) -> moments (B, 2 views, 2, h, w, c)."""
  batch_sharding = sharding.batch_sharding(mesh)

  def encode(params, pixels):
    x = pixels.astype(jnp.float32) / 127.5 - 1.0
    # Views interleaved per image, so each device flips only its own images.
    views = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(-1, *x.shape[1:])
    mean, std = module.apply({"params": params}, views, method="encode")
    moments = jnp.stack([mean, std], axis=1)
    return moments.reshape(x.shape[0], 2, *moments.shape[1:])

  jitted = jax.jit(encode, in_shardings=(sharding.replicated(mesh),
                                         batch_sharding),
                   out_shardings=batch_sharding)
  params = jax.device_put(params, sharding.replicated(mesh))
  return lambda pixels: jitted(params, jax.device_put(pixels, batch_sharding))


def _load(source, index: int, size: int):
  image, label = source[index]
  return imagenet.center_crop(image, size), label


def write_shard(path: str, labels, moments, dtype):
  """Writes records `label + moments[i]` (latents.encode_record) to a local
  temporary file (array_record writes local files only), then publishes it
  under `path`, local or remote: it appears complete or not at all."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if files.is_remote(path):
    fd, tmp = tempfile.mkstemp(suffix=".array_record")
    os.close(fd)
  else:
    tmp = f"{path}.tmp{os.getpid()}"
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for label, m in zip(labels, moments):
      writer.write(latents.encode_record(label, m.astype(dtype)))
    writer.close()
    files.publish(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def prepare(vae: str, source: str, output: str, limit: int | None = None,
            batch: int = 256, shard_size: int = 1024, image_size: int = 256,
            dtype: str = "float32", workers: int = 16, tfds_data_dir: str = "",
            tfds_manual_dir: str = "") -> dict:
  """Encodes this process's missing shards; returns the manifest."""
  module, params = vae_lib.load_vae(vae)
  images = make_source(source, tfds_data_dir, tfds_manual_dir)
  indices = select(len(images), limit)
  num_shards = -(-len(indices) // shard_size)
  factor = module.downsample_factor
  manifest = {
      "vae": files.absolute(vae_lib.weights_file(vae)),
      "vae_sha256": _sha256(vae_lib.weights_file(vae)),
      "vae_config": module.config_dict(),
      "latent_scale": vae_lib.LATENT_SCALE,
      "source": source if source == "tfds" else os.path.abspath(source),
      "image_size": image_size, "crop": "adm_center_crop",
      "latent_shape": [image_size // factor, image_size // factor,
                       module.latent_channels],
      "dtype": dtype, "num_images": int(len(indices)),
      "num_available": len(images), "shard_size": shard_size,
      "num_shards": num_shards,
      "num_classes": len(getattr(images, "classes", ())) or 1000,
  }
  epath.Path(output).mkdir(parents=True, exist_ok=True)
  check_or_write_manifest(output, manifest)

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                            devices=jax.local_devices())
  if batch % mesh.size:
    raise ValueError(f"--batch={batch} must be a multiple of the "
                     f"{mesh.size} local devices.")
  encode = _encoder(module, params, mesh)
  mine = range(jax.process_index(), num_shards, jax.process_count())
  done = {p.name for p in epath.Path(output).iterdir()}
  todo = [k for k in mine if latents.shard_name(k, num_shards) not in done]
  logging.info("Process %d: %d of its %d shards to encode.",
               jax.process_index(), len(todo), len(mine))
  shard_indices = {k: indices[k * shard_size:(k + 1) * shard_size]
                   for k in todo}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(
      total=sum(len(v) for v in shard_indices.values()), unit="img",
      disable=jax.process_index() != 0) as progress:

    def submit(k):  # decoding runs ahead while the devices encode
      return [pool.submit(_load, images, int(i), image_size)
              for i in shard_indices[k]]

    pending = submit(todo[0]) if todo else []
    for n, k in enumerate(todo):
      loads, pending = pending, (submit(todo[n + 1]) if n + 1 < len(todo)
                                 else [])
      labels, moments = [], []
      for start in range(0, len(loads), batch):
        crops, batch_labels = zip(*(f.result()
                                    for f in loads[start:start + batch]))
        moments.append(_encode_padded(encode, np.stack(crops), batch))
        labels.extend(batch_labels)
        progress.update(len(crops))
      shard = epath.Path(output) / latents.shard_name(k, num_shards)
      write_shard(str(shard), labels, np.concatenate(moments),
                  np.dtype(dtype))
  return manifest


def _encode_padded(encode, crops: np.ndarray, batch: int) -> np.ndarray:
  """One compiled shape: the last, short batch is padded and trimmed."""
  count = len(crops)
  if count < batch:
    crops = np.concatenate(
        [crops, np.zeros((batch - count, *crops.shape[1:]), crops.dtype)])
  return np.asarray(encode(crops))[:count]


def main(argv):
  del argv
  distributed.initialize()
  manifest = prepare(
      _VAE.value, _SOURCE.value, _OUTPUT.value, limit=_LIMIT.value,
      batch=_BATCH.value, shard_size=_SHARD_SIZE.value,
      image_size=_IMAGE_SIZE.value, dtype=_DTYPE.value,
      workers=_WORKERS.value, tfds_data_dir=_TFDS_DATA_DIR.value,
      tfds_manual_dir=_TFDS_MANUAL_DIR.value)
  if jax.process_index() == 0:
    print(json.dumps({k: manifest[k] for k in (
        "num_images", "num_shards", "latent_shape", "dtype")}))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _VAE = flags.DEFINE_string("vae", None, "diffusers VAE safetensors file "
                             "(or its directory, with config.json).")
  _SOURCE = flags.DEFINE_string("source", None, "Class-per-folder image tree "
                                "(ImageNet train/), or 'tfds'.")
  _OUTPUT = flags.DEFINE_string("output", None, "Directory for the shards "
                                "(local or gs://).")
  _LIMIT = flags.DEFINE_integer("limit", None, "Encode only this many images "
                                "(evenly spaced), for trials.")
  _BATCH = flags.DEFINE_integer("batch", 256, "Images per host per encode "
                                "call; a multiple of the local devices.")
  _SHARD_SIZE = flags.DEFINE_integer("shard_size", 1024, "Images per shard.")
  _IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Centre crop size.")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"],
                             "Stored dtype of mean and std (float16 halves "
                             "the ~84 GB of float32 ImageNet latents).")
  _WORKERS = flags.DEFINE_integer("workers", 16, "Image decoding threads.")
  _TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data dir "
                                       "for --source=tfds.")
  _TFDS_MANUAL_DIR = flags.DEFINE_string(
      "tfds_manual_dir", "", "Directory with the ILSVRC2012 tar files, to "
      "build TFDS imagenet2012 the first time.")
  flags.mark_flags_as_required(["vae", "source", "output"])
  app.run(main)
