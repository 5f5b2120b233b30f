"""FID-50K and Inception Score of a network, as papers report them.

`score_params` takes a network's evaluation (EMA) parameters, draws
`num_samples` samples over all devices with labels as `eval.labels` says
('balanced': the label of sample i is i mod num_classes, exactly 50 per
class for 50k ImageNet samples; 'random': uniform, as the official
MeanFlow evaluator draws them), decodes latents with the VAE when the model
works in latent space, quantises to uint8 (what a saved sample batch holds,
so scores match an exported npz) and feeds the FID Inception network batch
by batch, both as `eval.fid_protocol` says (inception.PROTOCOLS: 'adm' for
ImageNet papers, 'torchmetrics' for py-meanflow's CIFAR-10, 'pytorch_fid').
Only pool3 statistics (float64 running sums) and the logits stay on the
host; images are kept only while they are written to the optional ADM-style
npz.

Everything runs on every process (the same jitted programs on global
arrays); process 0 alone writes files. This module knows nothing of
training: callers (the trainer, tools/fid.py) pass the config, the
network's u_fn, the mesh and the input shape. `check_files` opens the
weight and statistics files a config names before anything trains.
Weights and statistics may be URIs (gs://...), read from local copies.
"""

import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from mf_jax import files
from mf_jax import objectives
from mf_jax import samplers
from mf_jax import sharding
from mf_jax.data import pipeline
from mf_jax.evaluation import fid
from mf_jax.evaluation import inception
from mf_jax.evaluation import npz_export
from mf_jax.models import vae


def balanced_labels(start, batch: int, num_classes: int) -> jax.Array:
  """Labels of samples start .. start + batch - 1: index mod num_classes."""
  if num_classes == 0:
    return jnp.zeros((batch,), jnp.int32)
  return ((start + jnp.arange(batch)) % num_classes).astype(jnp.int32)


def sample_labels(mode: str, rng, start, batch: int,
                  num_classes: int) -> jax.Array:
  """A batch's labels: 'balanced' (index mod num_classes) or 'random'
  (uniform, from `rng`); zeros for unconditional models."""
  if mode == "balanced" or num_classes == 0:
    return balanced_labels(start, batch, num_classes)
  if mode == "random":
    return jax.random.randint(rng, (batch,), 0, num_classes, jnp.int32)
  raise ValueError(f"Unknown label mode {mode!r}; valid: "
                   f"{samplers.LABEL_MODES}.")


def to_uint8(x, protocol: "str | inception.Protocol") -> jax.Array:
  """Samples in [-1, 1] -> uint8 pixels, as the protocol's reference does.

  'round': floor(127.5 x + 128) clipped (npz_export.to_uint8, the official
  MeanFlow evaluator's conversion); 'floor': py-meanflow's
  floor(255 clip(0.5 x + 0.5, 0, 1)), the same float32 operations in the
  same order.
  """
  if inception.get_protocol(protocol).uint8 == "round":
    return npz_export.to_uint8(x, xp=jnp)
  x = jnp.clip(jnp.asarray(x, jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
  return jnp.floor(x * 255.0).astype(jnp.uint8)


def fid_protocol(config) -> str:
  """The config's FID protocol; runs saved before the field existed
  measured pytorch-fid's."""
  return config.eval.get("fid_protocol", "pytorch_fid")


def is_latent(config) -> bool:
  return pipeline.dataset_kind(config.data.name) == "latents"


def check_files(config):
  """The weights and statistics a config names exist, are what their
  fields say (a few tensor shapes, read from the files' headers), and FID
  has what it needs: one-line errors naming the field, the file and what
  is wrong, before anything compiles, so a wrong file costs seconds, not
  the run up to its first sample grid."""
  named = {"data.vae": config.data.get("vae"),
           "eval.inception": config.eval.get("inception"),
           "eval.ref_stats": config.eval.get("ref_stats")}
  for field, path in named.items():
    if path and not files.exists(path):
      raise FileNotFoundError(
          f"{field}={path!r} does not exist; weights and statistics are "
          "files you name, local or gs:// (nothing is downloaded).")
  if bool(named["eval.inception"]) != bool(named["eval.ref_stats"]):
    raise ValueError("FID needs both eval.inception (pytorch-fid's Inception "
                     "weights) and eval.ref_stats (reference statistics).")
  if named["eval.inception"] and is_latent(config) and not named["data.vae"]:
    raise ValueError("FID of latent samples needs data.vae=FILE (the SD-VAE "
                     "the latents were made with) to decode them.")
  channels = config.model.in_channels if is_latent(config) else None
  for (field, path), kind in zip(named.items(), ("vae", "inception",
                                                  "ref_stats")):
    if path:
      check_file(kind, path, field, channels, fid_protocol(config))


def check_file(kind: str, path: str, name: str,
               latent_channels: int | None = None,
               protocol: str | None = None):
  """Checks that `path` is a `kind` file ('vae', 'inception' or
  'ref_stats', of `protocol` when given); errors name it as `name` (a
  config field or a flag)."""
  checks = {
      "vae": lambda: vae.check_weights(path, latent_channels),
      "inception": lambda: inception.check_weights(path),
      "ref_stats": lambda: fid.check_stats(path, inception.FEATURE_DIM,
                                           protocol),
  }
  if not files.exists(path):
    raise FileNotFoundError(f"{name}={path!r} does not exist.")
  try:
    checks[kind]()
  except (ValueError, OSError, ImportError) as e:  # e.g. .pth without torch
    error = type(e) if type(e) in (FileNotFoundError, ImportError) else (
        ValueError)
    reason = " ".join(str(e).split()).rstrip(".")
    raise error(f"{name}={path!r}: {reason}.") from None


# Cached: an evaluation at several NFE (and each periodic evaluation of a
# run) reads the Inception weights once.
_load_inception = functools.lru_cache(maxsize=1)(inception.load_inception)


def make_image_fn(config, u_fn, mesh, input_shape, nfe: int, batch: int,
                  decode=None, labels: str = "balanced",
                  protocol: str = "pytorch_fid"):
  """Jitted (params, vae_params, rng, start) -> (uint8 images, labels).

  `rng` draws the noise; fold_in(rng, 1) draws 'random' labels and
  fold_in(rng, 2) the noise a re-noising sampler draws as it goes.
  """
  sampler = samplers.SAMPLERS[objectives.get(config.objective.name).SAMPLER]
  batch_sharding = sharding.batch_sharding(mesh)
  label_mode = labels

  def image_fn(params, vae_params, rng, start):
    labels = jax.lax.with_sharding_constraint(
        sample_labels(label_mode, jax.random.fold_in(rng, 1), start, batch,
                      config.model.num_classes), batch_sharding)
    noise = jax.lax.with_sharding_constraint(
        jax.random.normal(rng, (batch, *input_shape)), batch_sharding)
    x = sampler(u_fn, params, noise, labels, samplers.timesteps(nfe),
                rng=jax.random.fold_in(rng, 2))
    if decode is not None:
      x = jax.lax.with_sharding_constraint(decode(vae_params, x),
                                           batch_sharding)
    return to_uint8(x, protocol), labels

  return jax.jit(image_fn)


@functools.lru_cache(maxsize=4)
def make_feature_fn(module, size: int = inception.INPUT_SIZE,
                    protocol: str = "pytorch_fid"):
  """Jitted (inception_params, uint8 images) -> (pool3, logits).

  Cached, so that reference and sample batches of one shape (and repeated
  evaluations) compile the network once.
  """
  return jax.jit(
      lambda params, images: inception.features_and_logits(
          module, params, images, size, protocol))


def _gather(x) -> np.ndarray:
  """A global (possibly multi-process) array as numpy on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global_batch(host_batch: np.ndarray, mesh) -> jax.Array:
  """A batch every process holds in full -> a batch-sharded global array."""
  return jax.make_array_from_callback(
      host_batch.shape, sharding.batch_sharding(mesh),
      lambda index: host_batch[index])


def stats_from_batches(feature_fn, inception_params, batches, mesh,
                       batch_size: int, total: int | None = None):
  """(RunningStats, logits) of uint8 NHWC numpy batches, e.g. a dataset.

  Batches are padded to `batch_size` (a multiple of the device count) so
  one compiled program serves them all; the padding is dropped again.
  """
  stats, logits = fid.RunningStats(inception.FEATURE_DIM), []
  progress = tqdm(total=total, unit="img", desc="reference",
                  disable=jax.process_index() != 0)
  for batch in batches:
    count = len(batch)
    padded = np.resize(batch, (batch_size, *batch.shape[1:]))
    pool3, batch_logits = feature_fn(inception_params,
                                     _global_batch(padded, mesh))
    stats.update(_gather(pool3)[:count])
    logits.append(_gather(batch_logits)[:count])
    progress.update(count)
  progress.close()
  return stats, np.concatenate(logits)


def reference_stats(source: str, inception_path: str, out_path: str,
                    batch_size: int = 200, tfds_data_dir: str = "",
                    mesh=None,
                    inception_size: int = inception.INPUT_SIZE,
                    protocol: str = "pytorch_fid") -> dict:
  """Statistics of reference images, written as an npz (mu, sigma and the
  FID protocol they were computed with).

  `source` is an npz of uint8 images `arr_0` (e.g. ADM's reference batch;
  local or a URI) or `tfds:NAME`, the train split of a TFDS dataset
  prepared locally (`tfds:cifar10`: the 50,000 training images CIFAR-10
  FID is measured against). The same Inception, protocol (resize and
  scaling) and float64 statistics as samples. `out_path` may be a URI.
  """
  protocol = inception.get_protocol(protocol).name
  mesh = mesh or sharding.make_mesh(
      ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  batch_size = _round_up(batch_size, mesh.size)
  if source.startswith("tfds:"):
    images = pipeline.tfds_source(source[len("tfds:"):], "train",
                                  tfds_data_dir)
    total = len(images)
    batches = (np.stack([np.asarray(images[i]["image"], np.uint8)
                         for i in range(start, min(start + batch_size,
                                                   total))])
               for start in range(0, total, batch_size))
  else:
    local = files.local_copy(source)
    total = npz_export.num_images(local)
    batches = npz_export.iterate_npz(local, batch_size)
  module, params = _load_inception(inception_path)
  params = jax.device_put(params, sharding.replicated(mesh))
  stats, _ = stats_from_batches(
      make_feature_fn(module, inception_size, protocol), params, batches,
      mesh, batch_size, total=total)
  if jax.process_index() == 0:
    fid.save_stats(out_path, stats.mean, stats.cov,
                   num_images=np.int64(stats.count), protocol=protocol)
  return {"ref_stats": out_path, "num_images": stats.count,
          "images": source, "fid_protocol": protocol}


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _file_digest(path: str | None) -> str | None:
  """Short sha256 of a weight file, so a result names its exact weights."""
  if not path or not files.exists(path) or files.is_dir(path):
    return None
  digest = hashlib.sha256()
  with open(files.local_copy(path), "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


def _reference(ref_stats_path, feature_fn, inception_params, mesh, batch,
               protocol: str):
  """(mu, sigma): stored statistics (of `protocol`, where they say), else
  those of the file's images."""
  if fid.has_stats(ref_stats_path):
    try:
      fid.check_protocol(ref_stats_path, protocol)
    except ValueError as e:
      raise ValueError(f"{ref_stats_path}: {e}.") from None
    return fid.load_stats(ref_stats_path)
  logging.info("%s holds no mu/sigma: computing them from its images.",
               ref_stats_path)
  local = files.local_copy(ref_stats_path)
  stats, _ = stats_from_batches(
      feature_fn, inception_params, npz_export.iterate_npz(local, batch),
      mesh, batch, total=npz_export.num_images(local))
  return stats.mean, stats.cov


def check_vae(config, vae_path):
  if is_latent(config) and not vae_path:
    raise ValueError(f"data.name={config.data.name!r} is a latent dataset: "
                     "pass the VAE weights (--vae=FILE) to decode samples.")


def score_params(config, u_fn, mesh, input_shape, params, step: int, *,
                 workdir: str, inception_path: str, ref_stats_path: str,
                 num_samples: int = 50_000, nfe: int = 1,
                 vae_path: str | None = None, npz_out: str | None = None,
                 batch_size: int | None = None, seed: int = 0,
                 num_splits: int = 10, stats_out: str | None = None,
                 inception_size: int = inception.INPUT_SIZE,
                 protocol: str | None = None,
                 labels: str | None = None) -> dict:
  """FID and IS of `num_samples` samples of `params` at `nfe` steps.

  `u_fn(params, z, t, h, y)` is the network, `input_shape` one example's
  shape. `protocol` and `labels` default to the config's
  eval.fid_protocol and eval.labels. Writes and returns
  WORKDIR/eval/fid_<step>_nfe<nfe>.json.
  `npz_out` optionally exports the samples (ADM layout), `stats_out` their
  (mu, sigma), to compare runs later without sampling again.
  `inception_size` is 299 for real FID; tests shrink it to run fast.
  """
  check_vae(config, vae_path)
  protocol = inception.get_protocol(protocol or fid_protocol(config))
  labels = labels or config.eval.get("labels", "balanced")
  if labels not in samplers.LABEL_MODES:
    raise ValueError(f"Unknown label mode {labels!r}; valid: "
                     f"{samplers.LABEL_MODES}.")
  if num_samples != protocol.num_samples:
    logging.warning("FID of %d samples: protocol %r publishes FID of %d, "
                    "which this is not comparable to.", num_samples,
                    protocol.name, protocol.num_samples)
  batch = batch_size or config.eval.batch_size
  sharding.check_batch_size(batch, mesh, "FID batch size")
  replicated = sharding.replicated(mesh)
  decode, vae_params = None, None
  if is_latent(config):
    decode, vae_params = vae.load_latent_decoder(vae_path)
    vae_params = jax.device_put(vae_params, replicated)
  module, inception_params = _load_inception(inception_path)
  inception_params = jax.device_put(inception_params, replicated)
  feature_fn = make_feature_fn(module, inception_size, protocol.name)
  ref_mu, ref_sigma = _reference(ref_stats_path, feature_fn, inception_params,
                                 mesh, batch, protocol.name)

  image_fn = make_image_fn(config, u_fn, mesh, input_shape, nfe, batch,
                           decode, labels, protocol.name)
  batches = _sample_batches(image_fn, params, vae_params, num_samples, batch,
                            seed, desc=f"FID nfe={nfe}")
  stats, logits = _score_batches(batches, feature_fn, inception_params,
                                 num_samples, npz_out)
  if stats_out and jax.process_index() == 0:
    fid.save_stats(stats_out, stats.mean, stats.cov,
                   num_images=np.int64(stats.count), protocol=protocol.name)
  is_mean, is_std = fid.inception_score(logits, num_splits)
  num_classes = config.model.num_classes
  record = {
      "step": int(step), "nfe": nfe, "num_samples": stats.count,
      "fid": fid.frechet_distance(stats.mean, stats.cov, ref_mu, ref_sigma),
      "inception_score": is_mean, "inception_score_std": is_std,
      "is_splits": num_splits, "fid_protocol": protocol.name,
      "resize": protocol.resize, "input_scaling":
          f"(x - {protocol.center:g}) / {protocol.center:g}",
      "labels": labels if num_classes else "none (unconditional)",
      "num_classes": num_classes, "seed": seed,
      "uint8": ("floor(127.5 x + 128)" if protocol.uint8 == "round"
                else "floor(255 clip(0.5 x + 0.5, 0, 1))"),
      "inception": files.absolute(inception_path),
      "inception_sha256": _file_digest(inception_path),
      "inception_size": inception_size,
      "ref_stats": files.absolute(ref_stats_path),
      "ref_mu_sha256": hashlib.sha256(
          np.asarray(ref_mu, np.float64).tobytes()).hexdigest()[:16],
      "vae": files.absolute(vae_path) if vae_path else None,
      "vae_sha256": _file_digest(vae.weights_file(vae_path) if vae_path
                                 else None),
      "npz": files.absolute(npz_out) if npz_out else None,
      "sample_stats": files.absolute(stats_out) if stats_out else None,
  }
  record["json"] = str(epath.Path(workdir) / "eval" /
                       f"fid_{step}_{samplers.schedule_name(nfe)}.json")
  files.write_json(record["json"], record)
  return record


def _sample_batches(image_fn, params, vae_params, num_samples, batch, seed,
                    desc):
  """Yields (uint8 images, labels, count) on the devices, batch by batch.

  Batch i uses the key fold_in(key(seed), i) (its noise; fold_in of it by
  1 draws random labels) and balanced labels of samples i * batch ...; the
  last batch is full size, of which `count` are kept.
  """
  rng = jax.random.key(seed)
  for i in tqdm(range(math.ceil(num_samples / batch)), desc=desc,
                unit="batch", disable=jax.process_index() != 0):
    images, labels = image_fn(params, vae_params, jax.random.fold_in(rng, i),
                              jnp.int32(i * batch))
    yield images, labels, min(batch, num_samples - i * batch)


def _score_batches(batches, feature_fn, inception_params, num_samples,
                   npz_out):
  """Running pool3 statistics and all logits; optionally exports images."""
  stats, logits, writer = fid.RunningStats(inception.FEATURE_DIM), [], None
  try:
    for images, labels, count in batches:
      pool3, batch_logits = feature_fn(inception_params, images)
      stats.update(_gather(pool3)[:count])
      logits.append(_gather(batch_logits)[:count])
      if not npz_out:
        continue
      host_images, host_labels = _gather(images), _gather(labels)
      if jax.process_index() == 0:
        if writer is None:
          writer = npz_export.NpzWriter(npz_out, num_samples,
                                        host_images.shape[1:])
        writer.write(host_images[:count], host_labels[:count])
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  if writer is not None:
    writer.close()
  return stats, np.concatenate(logits)
