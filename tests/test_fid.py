"""FID Inception parity with pytorch-fid, FID/IS identities, npz, driver."""

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from mf_jax.evaluation import fid
from mf_jax.evaluation import fid_eval
from mf_jax.evaluation import inception
from mf_jax.evaluation import npz_export


# ------------------------------------------------------ Inception vs torch


def _random_torch_fid_inception(torch, seed=0):
  """pytorch-fid's FID InceptionV3 with random weights and no download.

  Built as pytorch_fid.inception.fid_inception_v3 builds it (torchvision
  trunk, 1008 classes, FID blocks swapped in), with random BatchNorm
  scales and offsets. Its running statistics are set later by
  `_calibrate`: with torch's default conv init and identity statistics the
  input's signal shrinks ~0.4x per layer and pool3 ends up the same for
  every image, which would make a parity test blind to most of the net.
  """
  torchvision = pytest.importorskip("torchvision")
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  net = torchvision.models.inception_v3(
      num_classes=1008, aux_logits=False, weights=None, init_weights=False)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=gen)
        m.bias.normal_(0.0, 0.2, generator=gen)
  return net


def _calibrate(torch, wrapper, images, var_floor=0.3):
  """Sets every BatchNorm's running statistics from those of `images`.

  The variances get `var_floor` times their channel mean added: statistics
  of just 2 images make near-constant channels blow float32 rounding up
  (torch's own float32 result was 5e-4 away from float64 without it, 4e-6
  with it), while the features still differ between images by ~18 %.
  """
  bns = [m for m in wrapper.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None  # cumulative average: one batch gives its statistics
  wrapper.train()
  with torch.no_grad():
    wrapper(images)
    for m in bns:
      m.running_var += var_floor * m.running_var.mean()
  return wrapper.eval()


def _pytorch_fid_wrapper(pfi, net):
  """pytorch-fid's InceptionV3([3], resize, normalize) around `net`."""
  original = pfi.fid_inception_v3
  pfi.fid_inception_v3 = lambda: net
  try:
    return pfi.InceptionV3([3], resize_input=True, normalize_input=True,
                           use_fid_inception=True).eval()
  finally:
    pfi.fid_inception_v3 = original


def test_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for shape in ((64, 64), (256, 256), (400, 333)):  # up, up, down
    x = rng.random((1, *shape, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299),
                         mode="bilinear", align_corners=False)
    want = want.permute(0, 2, 3, 1).numpy()
    got = (np.asarray(inception.preprocess(jnp.asarray(2 * x - 1))) + 1) / 2
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_inception_matches_pytorch_fid(tmp_path):
  """Same weights, same 2 images: pytorch-fid's network vs the Flax one.

  In float64 both compute the same function, so they agree to rounding:
  any difference in structure, padding, pooling, resize or weight layout
  would show. The float32 path the evaluator uses (uint8 in) is held to
  the float64 result at the ~1e-4 a float32 network can promise.
  """
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  pfi = pytest.importorskip("pytorch_fid.inception")
  net = _random_torch_fid_inception(torch)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3),
                                             dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
  wrapper = _calibrate(torch, _pytorch_fid_wrapper(pfi, net), x.float())
  pth = str(tmp_path / "random_fid_inception.pth")
  torch.save(net.state_dict(), pth)
  with torch.no_grad():
    want_pool = wrapper.double()(x)[0][:, :, 0, 0].numpy()
    want_logits = want_pool @ net.fc.weight.numpy().T  # unbiased, as IS uses

  npz = inception.convert_weights(pth, str(tmp_path / "converted.npz"))
  module, params = inception.load_inception(npz)
  _, params_pth = inception.load_inception(pth)
  jax.tree.map(np.testing.assert_array_equal, params, params_pth)

  def rel_err(got, want):
    return np.abs(np.asarray(got) - want).max() / np.abs(want).max()

  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    pool64, logits64 = jax.jit(
        lambda p, x: inception.features_and_logits(module, p, x))(
            params64, jnp.asarray(images, jnp.float64) / 127.5 - 1.0)
    pool64, logits64 = np.asarray(pool64), np.asarray(logits64)
  pool, logits = jax.jit(
      lambda p, x: inception.features_and_logits(module, p, x))(params, images)

  diff = want_pool[0] - want_pool[1]  # the image-dependent part
  assert np.abs(diff).max() > 0.1 * np.abs(want_pool).max()
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool64.dtype == np.float64
  assert rel_err(pool64, want_pool) < 1e-9
  assert rel_err(pool64[0] - pool64[1], diff) < 1e-9
  assert rel_err(logits64, want_logits) < 1e-9
  assert rel_err(pool, want_pool) < 1e-4
  assert rel_err(logits, want_logits) < 1e-4
  print(f"Inception parity: float64 {rel_err(pool64, want_pool):.1e}, "
        f"float32 {rel_err(pool, want_pool):.1e} (pool3), "
        f"{rel_err(logits, want_logits):.1e} (logits)")


def test_load_rejects_wrong_weights(tmp_path):
  path = str(tmp_path / "bad.npz")
  np.savez(path, **{"Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 31))})
  with pytest.raises(ValueError, match="do not fit"):
    inception.load_inception(path)


# -------------------------------------------------------------- FID and IS


def _sqrtm_fd(mu1, s1, mu2, s2):
  """ADM's formula (scipy sqrtm), the reference the eigen version must match."""
  covmean = linalg.sqrtm(s1 @ s2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # commuting, non-diagonal
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == (
      pytest.approx(exact, rel=1e-10))
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact,
                                                                 rel=1e-9)
  # Non-commuting full covariances: agrees with scipy's sqrtm (ADM).
  x, y = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
  s1, s2 = x @ x.T / d, y @ y.T / d
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
      _sqrtm_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_running_stats_and_self_fid():
  rng = np.random.default_rng(1)
  features = 5.0 + rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
  stats = fid.RunningStats(32)
  for chunk in np.array_split(features, 7):
    stats.update(chunk.astype(np.float32))
  features = features.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False),
                             rtol=1e-10, atol=1e-10)
  assert stats.count == 300
  assert fid.frechet_distance(stats.mean, stats.cov, features.mean(0),
                              np.cov(features, rowvar=False)) < 1e-8


def test_inception_score_identities():
  assert fid.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)
  # Confident, evenly spread over 10 classes in every split: IS = 10.
  confident = np.full((200, 1008), -1e4)
  confident[np.arange(200), np.arange(200) % 10] = 0.0
  mean, std = fid.inception_score(confident, num_splits=10)
  assert mean == pytest.approx(10.0, rel=1e-9) and std < 1e-9
  # One class only: no diversity, IS = 1.
  assert fid.inception_score(confident[::10])[0] == pytest.approx(1.0)


def test_stats_npz_keys(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  fid.save_stats(str(tmp_path / "a.npz"), mu, sigma)
  np.savez(tmp_path / "b.npz", ref_mu=mu, ref_sigma=sigma)  # official MF
  for name in ("a.npz", "b.npz"):
    got_mu, got_sigma = fid.load_stats(str(tmp_path / name))
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
  np.savez(tmp_path / "c.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  assert not fid.has_stats(str(tmp_path / "c.npz"))
  with pytest.raises(KeyError, match="mu"):
    fid.load_stats(str(tmp_path / "c.npz"))


# ---------------------------------------------------------------- npz export


def test_npz_writer_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)
  labels = np.arange(10) % 4
  path = str(tmp_path / "samples.npz")
  with npz_export.NpzWriter(path, 10, (5, 5, 3)) as writer:
    writer.write(images[:6], labels[:6])
    writer.write(images[6:], labels[6:])
  with np.load(path) as data:  # what ADM's evaluator opens
    assert data.files == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(data["arr_1"], labels)
  streamed = list(npz_export.iterate_npz(path, 4))
  assert [len(b) for b in streamed] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(streamed), images)
  assert npz_export.num_images(path) == 10
  # Floats in [-1, 1] are quantised to nearest: -1 -> 0, 1 -> 255, 0 -> 128.
  np.testing.assert_array_equal(
      npz_export.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
  # A short write leaves no file behind.
  bad = str(tmp_path / "short.npz")
  writer = npz_export.NpzWriter(bad, 3, (5, 5, 3), with_labels=False)
  writer.write(images[:2])
  with pytest.raises(ValueError, match="2 of 3"):
    writer.close()
  assert not os.path.exists(bad) and not os.path.exists(bad + ".tmp")


# -------------------------------------------------------------- the driver


def test_score_params_end_to_end(tmp_path):
  """Digits DiT -> samples -> features -> FID/IS JSON, npz and statistics.

  Inception runs at 75x75 with random weights and the DiT has zero weights
  (its samples are then the quantised noise) to keep the test fast; the
  checks are about the plumbing: balanced labels, the exported images are
  those that were scored, and the reported FID is that of those images.
  """
  from configs import digits  # pylint: disable=g-import-not-at-top
  from mf_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.model.update(hidden_size=32, depth=1, num_heads=2)
  config.eval.batch_size = 16  # a multiple of the 8 test devices
  exp = trainer.Experiment(config, str(tmp_path / "run"))
  dit_params = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding),
      exp.abstract_state.params)

  size, module = 75, inception.FIDInceptionV3()
  params = inception.random_params(module, size)
  weights = inception.save_weights(params, str(tmp_path / "inception.npz"))
  ref_images = np.random.default_rng(3).integers(0, 256, (24, 8, 8, 1),
                                                 dtype=np.uint8)
  ref_npz = str(tmp_path / "ref.npz")
  npz_export.save_npz(ref_npz, ref_images)  # images only: stats computed

  record = fid_eval.score_params(
      config, exp.u_fn, exp.mesh, exp.input_shape, dit_params, 3,
      workdir=str(tmp_path / "run"), inception_path=weights,
      ref_stats_path=ref_npz,
      num_samples=20, nfe=1, batch_size=16, npz_out=str(tmp_path / "s.npz"),
      stats_out=str(tmp_path / "s_stats.npz"), inception_size=size,
      num_splits=2)

  with open(tmp_path / "run" / "eval" / "fid_3_nfe1.json") as f:
    assert json.load(f) == record
  assert record["step"] == 3 and record["num_samples"] == 20
  assert record["ref_stats"] == os.path.abspath(ref_npz)
  assert record["vae"] is None and record["inception_sha256"]
  with np.load(tmp_path / "s.npz") as data:
    samples, labels = data["arr_0"], data["arr_1"]
  assert samples.shape == (20, 8, 8, 1) and samples.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(20) % 10)

  # Features of the exported files, through the (cached) compiled network.
  feature_fn = fid_eval.make_feature_fn(module, size)
  mesh_params = jax.device_put(params, jax.sharding.NamedSharding(
      exp.mesh, jax.sharding.PartitionSpec()))
  sample_stats, _ = fid_eval.stats_from_batches(
      feature_fn, mesh_params, npz_export.iterate_npz(
          str(tmp_path / "s.npz"), 16), exp.mesh, 16)
  ref_stats, _ = fid_eval.stats_from_batches(
      feature_fn, mesh_params, npz_export.iterate_npz(ref_npz, 16), exp.mesh,
      16)
  mu, sigma = fid.load_stats(str(tmp_path / "s_stats.npz"))
  np.testing.assert_allclose(mu, sample_stats.mean, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, sample_stats.cov, rtol=1e-6, atol=1e-9)
  # The same program on the same batches: the reference is bit-identical.
  # (A second 2048-d Fréchet distance here would cost more than the rest.)
  assert record["ref_mu_sha256"] == hashlib.sha256(
      ref_stats.mean.tobytes()).hexdigest()[:16]
  assert np.trace(sigma) > 1e-3 * (mu @ mu)  # features differ per image
  assert record["fid"] > 0 and record["inception_score"] >= 1.0


def test_evaluate_fid_needs_a_checkpoint(tmp_path):
  from configs import digits  # pylint: disable=g-import-not-at-top
  from mf_jax.tools import fid as fid_tool  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.eval.batch_size = 16  # a multiple of the 8 test devices
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    fid_tool.evaluate_fid(config, str(tmp_path), inception_path="unused",
                          ref_stats_path="unused")


def test_latent_configs_need_the_vae():
  """A latent config without VAE weights fails before any work."""
  from configs import imagenet256_b4  # pylint: disable=g-import-not-at-top
  from mf_jax.tools import fid as fid_tool  # pylint: disable=g-import-not-at-top
  config = imagenet256_b4.get_config()
  assert fid_eval.is_latent(config)
  with pytest.raises(ValueError, match="--vae"):
    fid_tool.evaluate_fid(config, "/nonexistent", inception_path="x",
                          ref_stats_path="y")


def test_tfds_reference_and_fid_in_training_evals(tmp_path, monkeypatch):
  """Reference statistics from a TFDS train split (a stand-in list of
  records here) equal those of the same images in an npz; a run whose
  config names Inception weights and those statistics gets FID and IS in
  its eval JSON; an incomplete FID config fails before compiling."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from mf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mf_jax.training import trainer  # pylint: disable=g-import-not-at-top
  size, module = 75, inception.FIDInceptionV3()
  weights = inception.save_weights(inception.random_params(module, size),
                                   str(tmp_path / "inception.npz"))
  images = np.random.default_rng(4).integers(0, 256, (20, 8, 8, 1),
                                              dtype=np.uint8)
  monkeypatch.setattr(pipeline, "tfds_source", lambda name, split, data_dir:
                      [{"image": image, "label": 0} for image in images])
  ref, ref_npz = str(tmp_path / "ref.npz"), str(tmp_path / "ref_npz.npz")
  out = fid_eval.reference_stats("tfds:cifar10", weights, ref, batch_size=16,
                                 inception_size=size)
  assert out["num_images"] == 20
  npz_export.save_npz(str(tmp_path / "images.npz"), images)
  fid_eval.reference_stats(str(tmp_path / "images.npz"), weights, ref_npz,
                           batch_size=16, inception_size=size)
  for a, b in zip(fid.load_stats(ref), fid.load_stats(ref_npz)):
    np.testing.assert_array_equal(a, b)

  monkeypatch.setattr(fid_eval, "score_params", functools.partial(
      fid_eval.score_params, inception_size=size))
  config = digits.get_config()
  config.model.update(hidden_size=32, depth=1, num_heads=2)
  config.training.update(num_steps=2, batch_size=16)
  config.checkpoint.update(every_steps=2, async_save=False)
  config.eval.update(every_steps=2, nfe=(1,), num_samples=16, batch_size=16,
                     inception=weights, ref_stats=ref)
  config.sample.every_steps = 0
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))
  with open(workdir / "eval" / "2.json") as f:
    results = json.load(f)
  with open(workdir / "eval" / "fid_2_nfe1.json") as f:
    record = json.load(f)
  assert results["nfe1/fid"] == record["fid"] > 0
  assert results["nfe1/inception_score"] == record["inception_score"]
  assert "nfe1/fd_digits" in results and record["num_samples"] == 16
  assert record["ref_stats"] == os.path.abspath(ref)

  config.eval.ref_stats = ""
  with pytest.raises(ValueError, match="eval.ref_stats"):
    trainer.Experiment(config, str(tmp_path / "bad"))
  config.eval.ref_stats = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="eval.ref_stats"):
    trainer.Experiment(config, str(tmp_path / "bad"))
