"""Paths that are URIs: a latent run with everything on a fake gs:// bucket,
the local copies of remote weights, and weight files checked at start-up.

The fake bucket is a local directory. etils.epath's own test helper
(`epath.testing.mock_epath`) routes every epath call through functions
that map gs://bucket/... into it; the one reader outside epath, the C++
ArrayRecord reader (which reads gs:// itself in GCS-enabled builds), gets
the same mapping. No network is touched: a path that escaped the fake (an
os.path call on "gs://...") would create a "gs:" folder in the working
directory, which the tests check for.
"""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from etils import epath
from etils.epath import gpath
from PIL import Image

from configs import imagenet256_trial
from mf_jax import files
from mf_jax.evaluation import fid_eval
from mf_jax.evaluation import inception
from mf_jax.evaluation import npz_export
from mf_jax.models import vae
from mf_jax.tools import prepare_latents
from mf_jax.training import trainer

BUCKET = "gs://bucket"
INCEPTION_SIZE = 75  # random Inception weights at 75x75 keep FID fast


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """A fake gs:// filesystem; yields the local folder holding its objects.

  Remote copies go to tmp_path/cache; the working directory is tmp_path.
  """
  root = tmp_path / "gcs"
  root.mkdir()

  def local(path):
    path = os.fspath(path)
    if path.startswith("gs://"):
      return str(root / path[len("gs://"):])
    return path

  def uri(path):
    path = os.fspath(path)
    if path.startswith(str(root) + os.sep):
      return "gs://" + os.path.relpath(path, root)
    return path

  def one_path(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two_paths(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  def glob(original, pattern):
    return [uri(p) for p in original(local(pattern))]

  def walk(original, top, **kwargs):
    for folder, dirs, names in original(local(top), **kwargs):
      yield uri(folder), dirs, names

  # With TensorFlow installed, epath sends gs:// to tf.io.gfile without
  # looking at the backend table that mock_epath replaces.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  reader = array_record_module.ArrayRecordReader
  monkeypatch.setattr(array_record_module, "ArrayRecordReader",
                      lambda path, *a, **k: reader(local(path), *a, **k))
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  fns = {name: one_path for name in (
      "open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove",
      "rmtree", "stat")}
  fns.update(copy=two_paths, rename=two_paths, replace=two_paths, glob=glob,
             walk=walk)
  with epath.testing.mock_epath(**fns):
    yield root
  assert not (tmp_path / "gs:").exists(), "a gs:// path went to os.path"


def _cached(tmp_path) -> list[str]:
  found = []
  for _, _, names in os.walk(tmp_path / "cache"):
    found.extend(names)
  return sorted(found)


def test_local_copy_once_per_version(gcs, tmp_path):
  (gcs / "bucket").mkdir()
  (gcs / "bucket" / "w.npz").write_bytes(b"first")
  first = files.local_copy(f"{BUCKET}/w.npz")
  assert first.startswith(str(tmp_path / "cache")) and first.endswith("w.npz")
  assert open(first, "rb").read() == b"first"
  assert files.local_copy(f"{BUCKET}/w.npz") == first
  (gcs / "bucket" / "w.npz").write_bytes(b"second, longer")
  second = files.local_copy(f"{BUCKET}/w.npz")
  assert second != first and open(second, "rb").read() == b"second, longer"
  assert _cached(tmp_path) == ["w.npz", "w.npz"]  # no temporary files left
  local = str(tmp_path / "local.npz")
  assert files.local_copy(local) == local  # local paths are used in place
  with pytest.raises(FileNotFoundError, match="gs://bucket/missing"):
    files.local_copy(f"{BUCKET}/missing.npz")

  files.write_json(f"{BUCKET}/run/eval/1.json", {"a": 1})
  assert json.loads((gcs / "bucket/run/eval/1.json").read_text()) == {"a": 1}
  assert files.read_json(f"{BUCKET}/run/eval/1.json") == {"a": 1}
  assert not list((gcs / "bucket/run/eval").glob("*.tmp"))


def _tiny_vae(path: str):
  module = vae.AutoencoderKL(block_out_channels=(8, 8, 8, 16),
                             layers_per_block=1, norm_num_groups=4)
  return vae.save_vae(path, vae.random_params(module, seed=0), module)


def _images(root):
  rng = np.random.default_rng(0)
  for label in ("n01", "n02"):
    os.makedirs(root / label)
    for i in range(2):
      pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
      Image.fromarray(pixels).resize((300, 280)).save(root / label / f"{i}.png")
  return str(root)


def _latent_config(num_steps=4):
  c = imagenet256_trial.get_config(f"num_steps={num_steps}")
  c.model.update(variant="", hidden_size=32, depth=1, num_heads=2,
                 patch_size=4)
  c.training.update(batch_size=8, log_every_steps=2)
  c.checkpoint.update(every_steps=2, async_save=False)
  c.data.update(latents_dir=f"{BUCKET}/latents", vae=f"{BUCKET}/vae")
  c.eval.update(every_steps=4, nfe=(1,), num_samples=8, batch_size=8,
                inception=f"{BUCKET}/inception.npz",
                ref_stats=f"{BUCKET}/ref.npz")
  c.sample.every_steps = 0  # grids through the VAE: test_latents.py
  return c


def _final_state(config, workdir):
  exp = trainer.Experiment(config, workdir)
  state, step = exp.restore()
  exp.checkpointer.close()
  return jax.device_get(state), step


def test_latent_run_on_gcs_trains_evaluates_and_resumes(gcs, tmp_path,
                                                        monkeypatch):
  """Latents, VAE, Inception weights and reference images all on gs://:
  prepare_latents writes the shards there, a run trains on them, samples
  through the VAE, scores FID/IS, and a resume from an earlier checkpoint
  ends where the uninterrupted run ended; each remote weight file is
  copied to the local cache once."""
  bucket = gcs / "bucket"
  _tiny_vae(str(bucket / "vae"))
  inception.save_weights(
      inception.random_params(inception.FIDInceptionV3(), INCEPTION_SIZE),
      str(bucket / "inception.npz"))
  npz_export.save_npz(str(bucket / "ref.npz"), np.random.default_rng(1)
                      .integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
  manifest = prepare_latents.prepare(
      f"{BUCKET}/vae", _images(tmp_path / "train"), f"{BUCKET}/latents",
      batch=8, shard_size=2, workers=2)
  assert manifest["vae"] == f"{BUCKET}/vae/{vae.WEIGHTS_NAME}"
  assert sorted(os.listdir(bucket / "latents")) == [
      "manifest.json", "shard-00000-of-00002.array_record",
      "shard-00001-of-00002.array_record"]

  monkeypatch.setattr(fid_eval, "score_params", functools.partial(
      fid_eval.score_params, inception_size=INCEPTION_SIZE))
  straight = str(tmp_path / "straight")
  results = trainer.train_and_evaluate(_latent_config(), straight)
  assert np.isfinite(results["nfe1/fid"]) and results["nfe1/fid"] > 0
  with open(os.path.join(straight, "eval", "fid_4_nfe1.json")) as f:
    record = json.load(f)
  assert record["inception"] == f"{BUCKET}/inception.npz"
  assert record["ref_stats"] == f"{BUCKET}/ref.npz"
  assert record["vae"] == f"{BUCKET}/vae" and record["vae_sha256"]
  assert _cached(tmp_path) == sorted(
      [vae.WEIGHTS_NAME, "inception.npz", "ref.npz"])

  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  os.remove(os.path.join(resumed, "eval", "4.json"))
  again = trainer.train_and_evaluate(_latent_config(), resumed)
  assert again == results  # same samples, same scores
  a, step_a = _final_state(_latent_config(), straight)
  b, step_b = _final_state(_latent_config(), resumed)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_wrong_weight_files_fail_at_start_up(gcs, tmp_path):
  """A wrong or damaged VAE, Inception or statistics file stops the run
  before anything is built or trained, with one line naming the field,
  the file and what is wrong."""
  bucket = gcs / "bucket"
  good_vae = _tiny_vae(str(bucket / "vae"))
  weights = inception.random_params(inception.FIDInceptionV3(),
                                    INCEPTION_SIZE)
  good_inception = inception.save_weights(weights,
                                          str(bucket / "inception.npz"))
  inception.save_weights(weights, str(bucket / "inception.safetensors"))
  npz_export.save_npz(str(bucket / "ref.npz"), np.zeros((2, 8, 8, 3),
                                                         np.uint8))
  data = open(good_vae, "rb").read()
  (bucket / "truncated.safetensors").write_bytes(data[:len(data) // 2])
  data = open(good_inception, "rb").read()
  (bucket / "truncated.npz").write_bytes(data[:len(data) // 2])
  np.savez(bucket / "small_stats.npz", mu=np.zeros(64), sigma=np.eye(64))

  cases = [
      ("data.vae", "inception.safetensors",
       "not a diffusers AutoencoderKL: no decoder.conv_in.weight"),
      ("data.vae", "inception.npz", "not a readable safetensors file"),
      ("data.vae", "truncated.safetensors", "not a readable safetensors"),
      ("eval.inception", "vae/" + vae.WEIGHTS_NAME,
       "not pytorch-fid's Inception: no Conv2d_1a_3x3/conv/kernel"),
      ("eval.inception", "truncated.npz", "not a readable npz file"),
      ("eval.ref_stats", "small_stats.npz", r"mu has shape \(64,\)"),
      ("eval.ref_stats", "inception.npz", "neither statistics"),
  ]
  for field, name, message in cases:
    config = _latent_config()
    section, key = field.split(".")
    config[section][key] = f"{BUCKET}/{name}"
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message) as error:
      trainer.train_and_evaluate(config, str(workdir))
    assert str(error.value).startswith(f"{field}='{BUCKET}/{name}': ")
    assert "\n" not in str(error.value)
    assert not workdir.exists()  # nothing was trained or written

  config = _latent_config()
  config.model.in_channels = 8
  with pytest.raises(ValueError, match="decodes 4-channel latents but the "
                     r"model makes 8 \(model.in_channels\)"):
    trainer.Experiment(config, str(tmp_path / "run"))


def test_gcs_latents_errors_name_the_fix(gcs, monkeypatch):
  """On gs://, missing shards name the prepare command, and an array_record
  build that cannot read gs:// (older ones say "open() failed") points to
  the gcsfuse mount instead, in one line, before anything compiles."""
  from mf_jax.data import latents  # pylint: disable=g-import-not-at-top
  from mf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  folder = gcs / "bucket" / "latents"
  folder.mkdir(parents=True)
  (folder / latents.MANIFEST).write_text(json.dumps(
      {"num_shards": 2, "latent_shape": [4, 4, 4], "dtype": "float32"}))
  (folder / latents.shard_name(0, 2)).write_bytes(b"")
  config = _latent_config()
  with pytest.raises(FileNotFoundError, match=r"1 of 2 latent shards are "
                     r"missing in gs://bucket/latents .*prepare_latents"):
    pipeline.make_train_iterator(config)

  (folder / latents.shard_name(1, 2)).write_bytes(b"")

  def old_reader(path, *args, **kwargs):
    del args, kwargs
    raise RuntimeError(f"open() failed: No such file or directory; opening "
                       f"{path}\nmore detail")

  monkeypatch.setattr(array_record_module, "ArrayRecordReader", old_reader)
  with pytest.raises(RuntimeError, match="gcsfuse") as error:
    pipeline.make_train_iterator(config)
  assert "\n" not in str(error.value)
  assert "gs://bucket/latents/shard-0000" in str(error.value)
