"""FID Inception parity with pytorch-fid, FID/IS identities, npz, driver."""

import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
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


@pytest.fixture(scope="module")
def reference_inception(tmp_path_factory):
  """pytorch-fid's network with random, calibrated weights, saved as the
  .pth every reference reads (pytorch-fid's, torch-fidelity's and
  torchmetrics' Inceptions share its layout), and the same weights as Flax
  params read from that file."""
  torch = pytest.importorskip("torch")
  pfi = pytest.importorskip("pytorch_fid.inception")
  net = _random_torch_fid_inception(torch)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3),
                                             dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  wrapper = _calibrate(torch, _pytorch_fid_wrapper(pfi, net), x)
  folder = tmp_path_factory.mktemp("inception")
  pth = str(folder / "random_fid_inception.pth")
  torch.save(net.state_dict(), pth)
  module, params = inception.load_inception(pth)
  return types.SimpleNamespace(
      net=net, pytorch_fid=wrapper, pth=pth, dir=folder, module=module,
      params=params, calibration_images=images)


def test_resize_matches_each_reference():
  """Each protocol's input against its reference's on the same uint8
  images (upsampling like CIFAR-10 and ImageNet, and a downsampling):
  pytorch-fid's F.interpolate then 2x - 1; torch-fidelity's TF 1.x resize
  (ADM's graph, torchmetrics < 1.8) and the TorchScript Inception's
  affine_grid resize (the official MeanFlow JAX evaluator) then
  (x - 128) / 128; torchmetrics >= 1.8's antialiased F.interpolate."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  tfi = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
  rng = np.random.default_rng(0)
  for shape in ((32, 32), (256, 256), (400, 333)):
    images = rng.integers(0, 256, (1, *shape, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    size = (299, 299)
    pytorch_fid = 2 * F.interpolate(x / 255, size, mode="bilinear",
                                    align_corners=False) - 1
    tf1 = tfi.interpolate_bilinear_2d_like_tensorflow1x(
        x, size=size, align_corners=False)
    antialias = F.interpolate(x, size, mode="bilinear", align_corners=False,
                              antialias=True)
    # The TorchScript Inception's resize (stylegan2-ada-pytorch metrics):
    # identity theta shifted so that output j samples input j * in / out.
    theta = torch.eye(2, 3)[None]
    theta[0, 0, 2] += 1 / shape[1] - 1 / 299
    theta[0, 1, 2] += 1 / shape[0] - 1 / 299
    grid = F.affine_grid(theta, [1, 3, *size], align_corners=False)
    torchscript = F.grid_sample(x, grid, mode="bilinear",
                                padding_mode="border", align_corners=False)
    want = {"pytorch_fid": pytorch_fid, "adm": (tf1 - 128) / 128,
            "torchmetrics": (tf1 - 128) / 128,
            "torchmetrics_antialias": (antialias - 128) / 128}
    for name, value in want.items():
      got = np.asarray(inception.preprocess(images, name))
      np.testing.assert_allclose(got, value.permute(0, 2, 3, 1).numpy(),
                                 atol=1e-5, err_msg=f"{name} {shape}")
    # grid_sample finds the same source pixels from coordinates in [-1, 1]
    # (float32 rounding of ~1e-5 pixel), where the other resizes differ.
    got = np.asarray(inception.preprocess(images, "adm"))
    np.testing.assert_allclose(
        got, ((torchscript - 128) / 128).permute(0, 2, 3, 1).numpy(),
        atol=2e-4)
    assert np.abs(got - np.asarray(
        inception.preprocess(images, "pytorch_fid"))).max() > 0.05


def test_inception_matches_pytorch_fid(reference_inception):
  """Same weights, same 2 images: pytorch-fid's network vs the Flax one.

  In float64 both compute the same function, so they agree to rounding:
  any difference in structure, padding, pooling, resize or weight layout
  would show. (The float32 path the evaluator uses is held to each
  protocol's reference in test_protocols_match_their_references.)
  """
  torch = pytest.importorskip("torch")
  ref = reference_inception
  images = ref.calibration_images
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
  with torch.no_grad():
    want_pool = ref.pytorch_fid.double()(x)[0][:, :, 0, 0].numpy()
    want_logits = want_pool @ ref.net.fc.weight.numpy().T  # unbiased (IS)
    ref.pytorch_fid.float()

  npz = inception.convert_weights(ref.pth, str(ref.dir / "converted.npz"))
  module, params = inception.load_inception(npz)
  jax.tree.map(np.testing.assert_array_equal, params, ref.params)

  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    pool64, logits64 = jax.jit(
        lambda p, x: inception.features_and_logits(module, p, x))(
            params64, jnp.asarray(images, jnp.float64))
    pool64, logits64 = np.asarray(pool64), np.asarray(logits64)

  diff = want_pool[0] - want_pool[1]  # the image-dependent part
  assert np.abs(diff).max() > 0.1 * np.abs(want_pool).max()
  assert pool64.shape == (2, 2048) and logits64.shape == (2, 1008)
  assert pool64.dtype == np.float64
  assert _rel_err(pool64, want_pool) < 1e-9
  assert _rel_err(pool64[0] - pool64[1], diff) < 1e-9
  assert _rel_err(logits64, want_logits) < 1e-9


def _rel_err(got, want):
  return np.abs(np.asarray(got) - want).max() / np.abs(want).max()


def _span(*feature_sets):
  """Orthonormal basis (d, k) of the rows of all `feature_sets`.

  FID is invariant under an isometry of feature space, and every mean and
  covariance of these features lies in this span: the references' FID
  formulas run on the projected statistics give their FID of the 2048-d
  features, in k dimensions (scipy's sqrtm or torch's eigvals of a 2048^2
  matrix take minutes on 2 cores).
  """
  basis, _ = np.linalg.qr(np.concatenate(feature_sets).astype(np.float64).T)
  return basis


def _project(basis, mu, sigma):
  return mu @ basis, basis.T @ sigma @ basis


def _our_fid(real, fake):
  """FID through the evaluator's statistics and Fréchet distance, of the
  features projected onto their span (see `_span`)."""
  basis = _span(real, fake)
  stats = []
  for features in (real, fake):
    running = fid.RunningStats(basis.shape[1])
    running.update(np.asarray(features, np.float64) @ basis)
    stats += [running.mean, running.cov]
  return fid.frechet_distance(*stats)


def test_protocols_match_their_references(reference_inception):
  """Every protocol, float32 as the evaluator runs it, against its
  reference implementation on the same images and the same random weights:
  features (pool3 and IS logits) to ~1e-4, and the FID of 2 'real' against
  2 'fake' images by the reference's own formula and statistics.

  - pytorch_fid: pytorch-fid's InceptionV3 on pixels / 255; np.mean,
    np.cov and the scipy sqrtm formula of its calculate_frechet_distance
    (`_sqrtm_fd`; pytorch-fid's own function passes scipy's `disp`, which
    scipy 1.18 removes).
  - adm: torch-fidelity's feature extractor (the TF graph's resize and
    scaling, which ADM's evaluator feeds uint8 pixels to); ADM's
    evaluator.py computes FID with the same sqrtm formula.
  - torchmetrics(_antialias): FrechetInceptionDistance(normalize=True) as
    py-meanflow calls it: real images as torchvision's ToDtype(scale=True)
    floats, samples as floor(255 clip(x / 2 + 1/2)) / 255; its float64
    running sums, then its own compute() (eigvals, float32 result).
  """
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchmetrics")
  fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
  from torchmetrics.image import fid as tm_fid  # pylint: disable=g-import-not-at-top
  ref = reference_inception
  rng = np.random.default_rng(5)
  real = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  samples = np.tanh(rng.normal(size=(2, 32, 32, 3)) * 1.5)  # in (-1, 1)
  samples[0, 0, :4, 0] = [-1.0, 1.0, 0.0, 0.999]  # edges of the quantisers

  def nchw(x):
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)

  def torch_features(fn, x):
    with torch.no_grad():
      pool = fn(x)
    return pool.double().numpy().reshape(len(x), -1)

  fc = ref.net.fc.weight.detach().double().numpy().T
  want, fids = {}, {}
  for name in inception.PROTOCOLS:
    fake = np.asarray(fid_eval.to_uint8(samples, name))
    pair = np.concatenate([real, fake])
    if name == "pytorch_fid":
      pool = torch_features(lambda x: ref.pytorch_fid(x)[0],
                            nchw(pair).float() / 255)
      mu_sigma = [(f.mean(0), np.cov(f, rowvar=False))
                  for f in (pool[:2], pool[2:])]
      basis = _span(pool)
      fids[name] = _sqrtm_fd(*_project(basis, *mu_sigma[0]),
                             *_project(basis, *mu_sigma[1]))
    elif name == "adm":
      extractor = fidelity.FeatureExtractorInceptionV3(
          "inception-v3-compat", ["2048"],
          feature_extractor_weights_path=ref.pth)
      pool = torch_features(lambda x: extractor(x)[0], nchw(pair))
      mu_sigma = [(f.mean(0), np.cov(f, rowvar=False))
                  for f in (pool[:2], pool[2:])]
      basis = _span(pool)
      fids[name] = _sqrtm_fd(*_project(basis, *mu_sigma[0]),
                             *_project(basis, *mu_sigma[1]))
    else:
      from torchvision import tv_tensors  # pylint: disable=g-import-not-at-top
      from torchvision.transforms import v2  # pylint: disable=g-import-not-at-top
      metric = tm_fid.FrechetInceptionDistance(
          feature=2048, normalize=True, feature_extractor_weights_path=ref.pth,
          antialias=name == "torchmetrics_antialias")
      to_float = v2.ToDtype(torch.float32, scale=True)
      x = torch.from_numpy(samples).float().permute(0, 3, 1, 2)
      x = torch.floor(torch.clamp(x * 0.5 + 0.5, 0.0, 1.0) * 255) / 255.0
      seen = []  # the features update() computes, in order
      metric.inception.register_forward_hook(
          lambda module, inputs, out: seen.append(out.double().numpy()))
      with torch.no_grad():
        metric.update(to_float(tv_tensors.Image(nchw(real))), real=True)
        metric.update(x, real=False)
      pool = np.concatenate(seen)
      basis = torch.from_numpy(_span(pool))
      for kind in ("real", "fake"):
        total = getattr(metric, f"{kind}_features_sum")
        outer = getattr(metric, f"{kind}_features_cov_sum")
        setattr(metric, f"{kind}_features_sum", total @ basis)
        setattr(metric, f"{kind}_features_cov_sum", basis.T @ outer @ basis)
      fids[name] = float(metric.compute())
    want[name] = (pool, pool @ fc)

  # One compiled float32 network for all protocols' inputs.
  inputs = [inception.preprocess(np.concatenate(
      [real, fid_eval.to_uint8(samples, name)]), name)
            for name in inception.PROTOCOLS]
  pool, logits = jax.jit(lambda p, x: ref.module.apply({"params": p}, x))(
      ref.params, jnp.concatenate(inputs))
  pool, logits = np.asarray(pool), np.asarray(logits)
  for i, name in enumerate(inception.PROTOCOLS):
    got_pool, got_logits = pool[4 * i:4 * i + 4], logits[4 * i:4 * i + 4]
    want_pool, want_logits = want[name]
    err = _rel_err(got_pool, want_pool)
    assert err < 1e-4, (name, err)
    assert _rel_err(got_logits, want_logits) < 1e-4, name
    ours = _our_fid(got_pool[:2], got_pool[2:])
    print(f"{name}: features {err:.1e}, FID {ours:.6g} vs {fids[name]:.6g}")
    assert ours == pytest.approx(fids[name], rel=1e-4), name
  # The protocols differ by far more than the tolerance: each comparison
  # above would fail for a wrong resize, scaling or quantisation.
  names = list(inception.PROTOCOLS)
  for ours, other in (("adm", "pytorch_fid"), ("pytorch_fid", "adm"),
                      ("torchmetrics", "adm"),
                      ("torchmetrics_antialias", "torchmetrics")):
    i = names.index(ours)
    assert _rel_err(pool[4 * i:4 * i + 4], want[other][0]) > 1e-3


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


def _features(feature_fn, params, images, mesh, batch: int = 16):
  """pool3 features of uint8 images through `feature_fn`, `batch` at a time
  (padded as the evaluator pads, so its compiled program is reused)."""
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    padded = np.resize(chunk, (batch, *chunk.shape[1:]))
    global_batch = fid_eval._global_batch(padded, mesh)  # pylint: disable=protected-access
    pool, _ = feature_fn(params, global_batch)
    out.append(np.asarray(pool)[:len(chunk)])
  return np.concatenate(out).astype(np.float64)


def _independent_fid(a, b):
  """FID of two small feature sets (n x 2048) by ADM's formula, scipy's
  sqrtm, computed without a 2048^2 square root (minutes on 2 cores): with
  centred features A and B, the nonzero eigenvalues of S_a S_b are those
  of the n_b x n_b matrix (B A^T)(A B^T) / ((n_a - 1)(n_b - 1)), so the
  traces of their square roots agree."""
  centred_a, centred_b = a - a.mean(0), b - b.mean(0)
  scale_a, scale_b = len(a) - 1, len(b) - 1
  cross = centred_b @ centred_a.T
  covmean = linalg.sqrtm(cross @ cross.T / (scale_a * scale_b))
  diff = a.mean(0) - b.mean(0)
  return (diff @ diff + np.sum(centred_a ** 2) / scale_a
          + np.sum(centred_b ** 2) / scale_b - 2 * np.trace(covmean).real)


def test_score_params_end_to_end(tmp_path):
  """Digits DiT -> samples -> features -> FID/IS JSON, npz and statistics.

  Inception runs at 75x75 with random weights and the DiT has zero weights
  (its samples are then the quantised noise) to keep the test fast; the
  checks are about the plumbing: the protocol and the balanced labels the
  config names are those used, the exported images are those that were
  scored, and the reported FID is that of those images' features against
  the reference images' by an independent computation.
  """
  from configs import digits  # pylint: disable=g-import-not-at-top
  from mf_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.model.update(hidden_size=32, depth=1, num_heads=2)
  config.eval.update(batch_size=16,  # a multiple of the 8 test devices
                     fid_protocol="adm", labels="balanced")
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
  assert record["fid_protocol"] == "adm" and record["resize"] == "tf1"
  assert record["labels"] == "balanced" and record["num_classes"] == 10
  assert record["ref_stats"] == os.path.abspath(ref_npz)
  assert record["vae"] is None and record["inception_sha256"]
  with np.load(tmp_path / "s.npz") as data:
    samples, labels = data["arr_0"], data["arr_1"]
  assert samples.shape == (20, 8, 8, 1) and samples.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(20) % 10)

  # Features of the exported files, through the (cached) compiled network.
  feature_fn = fid_eval.make_feature_fn(module, size, "adm")
  mesh_params = jax.device_put(params, jax.sharding.NamedSharding(
      exp.mesh, jax.sharding.PartitionSpec()))
  sample_features = _features(feature_fn, mesh_params, samples, exp.mesh)
  ref_features = _features(feature_fn, mesh_params, ref_images, exp.mesh)
  assert np.trace(np.cov(sample_features, rowvar=False)) > 1e-3 * np.sum(
      sample_features.mean(0) ** 2)  # features differ per image
  want = _independent_fid(sample_features, ref_features)
  assert record["fid"] == pytest.approx(want, rel=1e-6)
  mu, sigma = fid.load_stats(str(tmp_path / "s_stats.npz"))
  np.testing.assert_allclose(mu, sample_features.mean(0), rtol=1e-6,
                             atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(sample_features, rowvar=False),
                             rtol=1e-6, atol=1e-9)
  assert fid.stats_protocol(str(tmp_path / "s_stats.npz")) == "adm"
  assert record["inception_score"] >= 1.0


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
  records here) equal those of the same images in an npz and name their
  protocol; a run whose config names Inception weights, those statistics,
  a protocol and random labels gets FID and IS in its eval JSON, computed
  with that protocol and those labels: the FID equals an independent
  computation on the images it scored. An incomplete FID config, or
  statistics of another protocol, fail before compiling."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from mf_jax import sharding  # pylint: disable=g-import-not-at-top
  from mf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mf_jax.training import trainer  # pylint: disable=g-import-not-at-top
  size, module = 75, inception.FIDInceptionV3()
  params = inception.random_params(module, size)
  weights = inception.save_weights(params, str(tmp_path / "inception.npz"))
  images = np.random.default_rng(4).integers(0, 256, (20, 8, 8, 1),
                                              dtype=np.uint8)
  monkeypatch.setattr(pipeline, "tfds_source", lambda name, split, data_dir:
                      [{"image": image, "label": 0} for image in images])
  ref, ref_npz = str(tmp_path / "ref.npz"), str(tmp_path / "ref_npz.npz")
  out = fid_eval.reference_stats("tfds:cifar10", weights, ref, batch_size=16,
                                 inception_size=size, protocol="torchmetrics")
  assert out["num_images"] == 20 and out["fid_protocol"] == "torchmetrics"
  npz_export.save_npz(str(tmp_path / "images.npz"), images)
  fid_eval.reference_stats(str(tmp_path / "images.npz"), weights, ref_npz,
                           batch_size=16, inception_size=size,
                           protocol="torchmetrics")
  for a, b in zip(fid.load_stats(ref), fid.load_stats(ref_npz)):
    np.testing.assert_array_equal(a, b)
  assert fid.stats_protocol(ref) == "torchmetrics"

  scored = []  # (uint8 images, labels) as the evaluation scored them
  score_batches = fid_eval._score_batches  # pylint: disable=protected-access

  def recording(batches, *args):
    def record():
      for batch_images, batch_labels, count in batches:
        scored.append((np.asarray(batch_images)[:count],
                       np.asarray(batch_labels)[:count]))
        yield batch_images, batch_labels, count
    return score_batches(record(), *args)

  monkeypatch.setattr(fid_eval, "_score_batches", recording)
  monkeypatch.setattr(fid_eval, "score_params", functools.partial(
      fid_eval.score_params, inception_size=size))
  config = digits.get_config()
  config.model.update(hidden_size=32, depth=1, num_heads=2)
  config.training.update(num_steps=2, batch_size=16)
  config.checkpoint.update(every_steps=2, async_save=False)
  config.eval.update(every_steps=2, nfe=(1,), num_samples=16, batch_size=16,
                     inception=weights, ref_stats=ref, labels="random",
                     fid_protocol="torchmetrics")
  config.sample.every_steps = 0
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))
  with open(workdir / "eval" / "2.json") as f:
    results = json.load(f)
  with open(workdir / "eval" / "fid_2_nfe1.json") as f:
    record = json.load(f)
  assert results["nfe1/fid"] == record["fid"]
  assert results["nfe1/inception_score"] == record["inception_score"]
  assert "nfe1/fd_digits" in results and record["num_samples"] == 16
  assert record["ref_stats"] == os.path.abspath(ref)
  assert record["fid_protocol"] == "torchmetrics"
  assert record["labels"] == "random"
  samples = np.concatenate([batch for batch, _ in scored])
  labels = np.concatenate([batch for _, batch in scored])
  assert samples.shape == (16, 8, 8, 1) and labels.shape == (16,)
  assert labels.min() >= 0 and labels.max() < 10
  assert not np.array_equal(labels, np.arange(16) % 10)  # not balanced

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1,
                                                       "fsdp": 1}))
  feature_fn = fid_eval.make_feature_fn(module, size, "torchmetrics")
  mesh_params = jax.device_put(params, sharding.replicated(mesh))
  want = _independent_fid(_features(feature_fn, mesh_params, samples, mesh),
                          _features(feature_fn, mesh_params, images, mesh))
  assert record["fid"] == pytest.approx(want, rel=1e-6)

  config.eval.fid_protocol = "adm"
  with pytest.raises(ValueError, match="protocol 'torchmetrics', not 'adm'"):
    trainer.Experiment(config, str(tmp_path / "bad"))
  config.eval.fid_protocol = "torchmetrics"
  config.eval.ref_stats = ""
  with pytest.raises(ValueError, match="eval.ref_stats"):
    trainer.Experiment(config, str(tmp_path / "bad"))
  config.eval.ref_stats = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="eval.ref_stats"):
    trainer.Experiment(config, str(tmp_path / "bad"))


def test_protocol_and_labels_are_validated():
  from configs import digits  # pylint: disable=g-import-not-at-top
  from mf_jax import preflight  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.eval.update(fid_protocol="tensorflow", labels="uniform")
  with pytest.raises(ValueError) as error:
    preflight.validate_config(config)
  assert "eval.labels='uniform' (must be one of ('random', 'balanced'))" in (
      str(error.value))
  assert "eval.fid_protocol='tensorflow' (must be one of ('adm', " in (
      str(error.value))
