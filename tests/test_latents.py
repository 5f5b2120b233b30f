"""Latent preparation (ImageNet folder -> VAE latent shards) and its reader.

A fake class-per-folder tree (2 classes, PNGs of odd sizes, one large
enough for the ADM crop's BOX halving) and a tiny random-weight VAE saved
in diffusers layout, both made here; no torch.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.sparse import linalg as sparse_linalg

from configs import imagenet256_trial
from mf_jax import config_lib
from mf_jax.data import imagenet
from mf_jax.data import latents
from mf_jax.data import pipeline
from mf_jax.evaluation import inception
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


def _grid_tiles(path, size, count, pad=1):
  """The `count` images of a sample grid PNG, row-major, frames removed."""
  grid = np.asarray(Image.open(path))
  cell = 256 + 2 * pad
  assert grid.shape == (size * cell, size * cell, 3)
  return np.stack([grid[r * cell + pad:r * cell + pad + 256,
                        q * cell + pad:q * cell + pad + 256]
                   for r, q in (divmod(i, size) for i in range(count))])


def test_trial_config_runs_end_to_end(prepared, tmp_path):
  """configs/imagenet256_trial.py on prepared latents: trains, checkpoints,
  writes a sample grid decoded by the VAE, and scores FID/IS through it.

  A tiny DiT, the fixture's tiny VAE and a random Inception at 75x75 keep
  it fast; the chain is the one a real trial runs. The grid is recomputed
  here from the checkpoint's EMA (one step x = e - u(e, t=1, h=1, y), the
  fixture's VAE decoding x / 0.18215) and the FID from its formula.
  """
  _, weights, out, _, module, vae_params = prepared
  c = imagenet256_trial.get_config("num_steps=2")
  c.model.update(variant="", hidden_size=32, depth=1, num_heads=2,
                 patch_size=4)
  c.data.update(latents_dir=out, vae=weights)
  c.mesh.num_devices = 1  # a CPU host has one device (the tests fake 8)
  c.training.batch_size = 8
  c.checkpoint.update(every_steps=2, async_save=False)
  c.sample.update(every_steps=2, grid_size=2)
  c.eval.update(batch_size=8, errors_fatal=True)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(c, workdir)

  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert (saved["data"]["latents_dir"], saved["training"]["num_steps"]) == (
      out, 2)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = json.loads(f.read().splitlines()[-1])
  # p = 1: the loss is mean(e / (e + 0.01)), just under 1 at init's error.
  assert last["step"] == 2 and 0.99 < last["loss"] < 1 < last["mse"]

  exp = trainer.Experiment(c, workdir)
  state, step = exp.restore()
  exp.checkpointer.close()
  assert step == 2 and int(state.step) == 2
  assert list(state.ema_params) == ["0.99"]  # the trial's EMA
  ema = state.ema_params["0.99"]
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(state.params),
                           jax.tree.leaves(ema))]
  assert max(moved) > 0  # trained, and the EMA lags behind

  # The grid: labels 0..3 (balanced), noise of key(seed + 2) as the trainer
  # draws it for a batch of eval.batch_size.
  _, rng_noise = jax.random.split(jax.random.key(c.training.seed + 2))
  noise = jax.random.normal(jax.random.fold_in(rng_noise, 0), (8, 32, 32, 4))
  labels = jnp.arange(8, dtype=jnp.int32) % 4

  @jax.jit
  def one_step_decoded(ema, vae_params):
    ones = jnp.ones((8,))
    x = noise - exp.model.apply({"params": ema}, noise, ones, ones, labels,
                                train=False)
    return vae.decode(module, vae_params, x[:4] / vae.LATENT_SCALE)

  decoded = np.asarray(one_step_decoded(ema, vae_params))
  want = np.clip(np.round(127.5 * decoded + 127.5), 0, 255)
  tiles = _grid_tiles(os.path.join(workdir, "samples", "2_nfe1.png"), 2, 4)
  assert np.abs(tiles - want).max() <= 1
  assert tiles.std() > 1.0

  # FID/IS of 8 samples against reference statistics N(m, s^2 I): then
  # FID = |mu - m|^2 + tr(S) + d s^2 - 2 s sum(sqrt(eig(S))).
  size, net = 75, inception.FIDInceptionV3()
  inception_file = inception.save_weights(
      inception.random_params(net, size), str(tmp_path / "inception.npz"))
  dim = inception.FEATURE_DIM
  m, s = np.full(dim, 0.05), 0.1
  ref = str(tmp_path / "ref_stats.npz")
  np.savez(ref, mu=m, sigma=s**2 * np.eye(dim))
  stats_out = str(tmp_path / "sample_stats.npz")
  npz_out = str(tmp_path / "samples.npz")
  record = fid_tool.evaluate_fid(
      c, workdir, inception_path=inception_file, ref_stats_path=ref,
      num_samples=8, nfe=1, vae_path=weights, batch_size=8,
      inception_size=size, num_splits=2, stats_out=stats_out,
      npz_out=npz_out)
  assert record["step"] == 2 and record["num_samples"] == 8
  assert record["vae"] == os.path.abspath(weights) and record["vae_sha256"]
  with open(os.path.join(workdir, "eval", "fid_2_nfe1.json")) as f:
    assert json.load(f) == record
  with np.load(npz_out) as samples:
    assert samples["arr_0"].shape == (8, 256, 256, 3)
    assert samples["arr_0"].dtype == np.uint8 and len(samples["arr_1"]) == 8
  with np.load(stats_out) as stats:
    mu, sigma = stats["mu"], stats["sigma"]
  assert mu.shape == (dim,) and sigma.shape == (dim, dim)
  # S of 8 samples has rank <= 7: its 8 largest eigenvalues are all.
  eig = sparse_linalg.eigsh(sigma, k=8, return_eigenvectors=False)
  want_fid = (np.sum((mu - m) ** 2) + np.trace(sigma) + dim * s**2
              - 2 * s * np.sqrt(np.clip(eig, 0, None)).sum())
  np.testing.assert_allclose(record["fid"], want_fid, rtol=1e-5)
  assert 1.0 <= record["inception_score"] <= 8
