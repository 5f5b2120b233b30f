"""Latent preparation (ImageNet folder -> VAE latent shards) and its reader.

A fake class-per-folder tree (2 classes, PNGs of odd sizes, one large
enough for the ADM crop's BOX halving) and a tiny random-weight VAE saved
in diffusers layout, both made here; no torch.
"""

import os

import numpy as np
import pytest
from PIL import Image

from configs import imagenet256_trial
from mf_jax import config_lib
from mf_jax.data import imagenet
from mf_jax.data import latents
from mf_jax.data import pipeline
from mf_jax.evaluation import inception
from mf_jax.evaluation import npz_export
from mf_jax.models import vae
from mf_jax.tools import fid as fid_tool
from mf_jax.tools import prepare_latents
from mf_jax.training import trainer

SIZES = {"n01": [(300, 280), (280, 300), (600, 540)],
         "n02": [(257, 256), (300, 280), (320, 300)]}  # PIL (width, height)
LIMIT, SHARD, BATCH = 5, 2, 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("latents")
  rng = np.random.default_rng(0)
  for name, sizes in SIZES.items():
    os.makedirs(root / "train" / name)
    for i, (w, h) in enumerate(sizes):
      pixels = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
      image = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
      image.save(root / "train" / name / f"img{i}.png")
  module = vae.AutoencoderKL(block_out_channels=(8, 8, 8, 16),
                             layers_per_block=1, norm_num_groups=4)
  params = vae.random_params(module, seed=0)
  weights = vae.save_vae(str(root / "vae"), params, module)
  out = str(root / "out")
  manifest = prepare_latents.prepare(weights, str(root / "train"), out,
                                     limit=LIMIT, batch=BATCH,
                                     shard_size=SHARD, workers=2)
  return root, weights, out, manifest, module, params


def _records(out, manifest):
  from array_record.python import array_record_module
  found = []
  for path in latents.shard_paths(out, manifest):
    reader = array_record_module.ArrayRecordReader(path)
    found.append([latents.decode_record(r, manifest["latent_shape"],
                                        manifest["dtype"])
                  for r in reader.read_all()])
    reader.close()
  return found


def _adm_crop(path, size=256):
  """ADM's center_crop_arr, written out step by step in PIL."""
  image = Image.open(path).convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize((image.width // 2, image.height // 2), Image.BOX)
  scale = size / min(image.size)
  image = image.resize((round(image.width * scale),
                        round(image.height * scale)), Image.BICUBIC)
  arr = np.array(image)
  y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[y:y + size, x:x + size]


def test_shards_labels_and_manifest(prepared):
  root, _, out, manifest, _, _ = prepared
  assert manifest["num_images"] == LIMIT and manifest["num_shards"] == 3
  assert manifest["latent_shape"] == [32, 32, 4]
  shards = _records(out, manifest)
  assert [len(s) for s in shards] == [2, 2, 1]
  source = imagenet.FolderSource(str(root / "train"))
  chosen = prepare_latents.select(len(source), LIMIT)
  want_labels = [source.items[i][1] for i in chosen]
  assert [label for s in shards for label, _ in s] == want_labels
  assert set(want_labels) == {0, 1}  # the evenly spaced subset spans classes
  for _, moments in (r for s in shards for r in s):
    assert moments.shape == (2, 2, 32, 32, 4)
    assert np.all(moments[:, 1] > 0)  # std


def test_crop_and_latents_match_a_direct_computation(prepared):
  """The stored moments are the VAE posterior of ADM's crop and its mirror."""
  root, _, out, manifest, module, params = prepared
  source = imagenet.FolderSource(str(root / "train"))
  chosen = list(prepare_latents.select(len(source), LIMIT))
  big = source.items.index((str(root / "train/n01/img2.png"), 0))
  position = chosen.index(big)  # the 600x540 image: BOX halving happens
  crop = _adm_crop(source.items[big][0])
  image, _ = source[big]
  np.testing.assert_array_equal(imagenet.center_crop(image, 256), crop)
  _, stored = _records(out, manifest)[position // SHARD][position % SHARD]
  x = crop.astype(np.float32) / 127.5 - 1.0
  mean, std = vae.encode(module, params, np.stack([x, x[:, ::-1]]))
  np.testing.assert_allclose(stored[:, 0], mean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stored[:, 1], std, rtol=1e-4, atol=1e-5)
  assert not np.allclose(stored[0, 0], stored[1, 0], atol=1e-3)


def test_rerun_skips_finished_shards_and_refuses_other_settings(prepared):
  root, weights, out, manifest, _, _ = prepared
  paths = latents.shard_paths(out, manifest)
  before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}
  os.remove(paths[1])
  prepare_latents.prepare(weights, str(root / "train"), out, limit=LIMIT,
                          batch=BATCH, shard_size=SHARD, workers=2)
  for p in (paths[0], paths[2]):
    assert os.stat(p).st_mtime_ns == before[p][0]  # untouched
  assert open(paths[1], "rb").read() == before[paths[1]][1]  # same bytes
  assert not [f for f in os.listdir(out) if ".tmp" in f]
  with pytest.raises(ValueError, match="shard_size"):
    prepare_latents.prepare(weights, str(root / "train"), out, limit=LIMIT,
                            batch=BATCH, shard_size=3, workers=2)


def _config(out, batch_size, seed=0, random_flip=True):
  c = config_lib.base_config()
  c.data.name = "imagenet256_latents"
  c.data.latents_dir = out
  c.data.shuffle_seed = seed
  c.data.random_flip = random_flip
  c.training.batch_size = batch_size
  return c


def _record_and_view(batch, records):
  """(record index, view) each row was drawn from: x = mean + std * eps of
  exactly one view of one record with that label (|eps| < 6)."""
  found = []
  for x, y in zip(batch["x"] / vae.LATENT_SCALE, batch["y"]):
    hits = [(i, v) for i, (label, m) in enumerate(records) for v in (0, 1)
            if label == y and np.all(np.abs(x - m[v, 0]) < 6 * m[v, 1])]
    assert len(hits) == 1
    found.append(hits[0])
  return found


def test_reader_samples_random_views_deterministically(prepared):
  _, _, out, manifest, _, _ = prepared
  records = [r for s in _records(out, manifest) for r in s]
  it = pipeline.make_train_iterator(_config(out, LIMIT))
  epochs = [next(it) for _ in range(6)]  # batch = all 5 records: 1 epoch
  views_seen = set()
  for batch in epochs:
    assert batch["x"].shape == (LIMIT, 32, 32, 4)
    assert batch["x"].dtype == np.float32 and batch["y"].dtype == np.int32
    matched = _record_and_view(batch, records)
    views_seen.update(v for _, v in matched)
    # each record once an epoch
    assert sorted(i for i, _ in matched) == list(range(LIMIT))
  assert views_seen == {0, 1}
  again = pipeline.make_train_iterator(_config(out, LIMIT))
  for want in epochs[:2]:
    got = next(again)
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["y"], want["y"])
  other = next(pipeline.make_train_iterator(_config(out, LIMIT, seed=1)))
  assert not np.array_equal(other["x"], epochs[0]["x"])


def test_without_random_flip_only_the_plain_view_is_read(prepared):
  """data.random_flip=False (the official runs): every row is the plain
  crop's latent; the order and eps are those of the flipping stream, so a
  row it read flipped is the same eps on the plain view's moments."""
  _, _, out, manifest, _, _ = prepared
  records = [r for s in _records(out, manifest) for r in s]
  flips = pipeline.make_train_iterator(_config(out, LIMIT))
  plain = pipeline.make_train_iterator(_config(out, LIMIT, random_flip=False))
  flipped_rows = 0
  for _ in range(4):
    a, b = next(flips), next(plain)
    np.testing.assert_array_equal(a["y"], b["y"])
    for (i, view), (j, plain_view), x_a, x_b in zip(
        _record_and_view(a, records), _record_and_view(b, records),
        a["x"], b["x"]):
      assert (j, plain_view) == (i, 0)
      if view == 0:
        np.testing.assert_array_equal(x_b, x_a)
        continue
      flipped_rows += 1
      m = records[i][1].astype(np.float32)
      eps = (x_a / vae.LATENT_SCALE - m[1, 0]) / m[1, 1]
      np.testing.assert_allclose(
          x_b, (m[0, 0] + m[0, 1] * eps) * vae.LATENT_SCALE,
          rtol=1e-4, atol=1e-4)
  assert flipped_rows > 0


def test_missing_latents_name_the_prepare_command(tmp_path):
  for latents_dir in ("", str(tmp_path)):
    with pytest.raises(FileNotFoundError, match="prepare_latents"):
      pipeline.make_train_iterator(_config(latents_dir, 4))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_record_round_trip(dtype):
  moments = np.random.default_rng(0).normal(size=(2, 2, 4, 4, 3))
  moments = moments.astype(dtype)
  label, back = latents.decode_record(
      latents.encode_record(917, moments), (4, 4, 3), dtype)
  assert label == 917 and back.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(back, moments)


def test_trial_config_runs_end_to_end(prepared, tmp_path):
  """configs/imagenet256_trial.py on prepared latents: trains, writes sample
  grids decoded by the VAE, and scores FID/IS through that VAE.

  A tiny DiT, the fixture's tiny VAE and a random Inception at 75x75 keep it
  fast; the chain is the one a real trial runs.
  """
  root, weights, out, _, module, vae_params = prepared
  # Scaled latents decode as the VAE decodes latents / 0.18215.
  decode_fn, loaded = vae.load_latent_decoder(weights)
  latent = np.random.default_rng(0).normal(size=(1, 32, 32, 4)).astype(
      np.float32)
  np.testing.assert_allclose(
      decode_fn(loaded, latent * vae.LATENT_SCALE),
      vae.decode(module, vae_params, latent), rtol=1e-5, atol=1e-5)

  c = imagenet256_trial.get_config("num_steps=4")
  c.model.update(variant="", hidden_size=32, depth=1, num_heads=2,
                 patch_size=4)
  c.data.latents_dir = out
  c.training.batch_size = 8
  c.checkpoint.update(every_steps=4, async_save=False)
  c.data.vae = weights
  c.sample.update(every_steps=4, grid_size=2)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(c, workdir)
  grid = np.asarray(Image.open(os.path.join(workdir, "samples",
                                            "4_nfe1.png")))
  assert grid.shape == (2 * 258, 2 * 258, 3)  # 256x256 RGB, 1-pixel frames
  assert grid.std() > 1.0

  size, net = 75, inception.FIDInceptionV3()
  inception_file = inception.save_weights(
      inception.random_params(net, size), str(tmp_path / "inception.npz"))
  ref = str(tmp_path / "ref.npz")
  npz_export.save_npz(ref, np.stack([
      _adm_crop(root / "train" / name / f"img{i}.png")
      for name, sizes in SIZES.items() for i in range(len(sizes))]))
  record = fid_tool.evaluate_fid(
      c, workdir, inception_path=inception_file, ref_stats_path=ref,
      num_samples=8, nfe=1, vae_path=weights, batch_size=8,
      inception_size=size, num_splits=2)
  assert record["step"] == 4 and record["num_samples"] == 8
  assert record["vae"] == os.path.abspath(weights) and record["vae_sha256"]
  assert np.isfinite(record["fid"]) and record["fid"] > 0
  assert record["inception_score"] >= 1.0
