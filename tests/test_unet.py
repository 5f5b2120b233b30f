"""The EDM U-Net, EDM augmentation and the CIFAR-10 / digits U-Net configs."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mf_jax import models
from mf_jax.data import augment
from mf_jax.data import pipeline
from mf_jax.models import unet
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import cifar10_unet  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import digits_unet  # pylint: disable=g-import-not-at-top,wrong-import-position

# The official network's count (a replica of SongUNet's constructor; the
# paper's "55M"), with and without the 6 -> 512 augmentation projection.
PAPER_PARAMS = 55_932_419
PAPER_PARAMS_NO_AUGMENT = 55_929_347


def _tiny_config(**overrides):
  fields = dict(name="unet", input_size=8, in_channels=2, model_channels=16,
                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                dropout=0.0, augment_dim=6, num_classes=3)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _inputs(batch=2, size=8, channels=2, num_classes=3):
  rng = np.random.default_rng(0)
  z = rng.standard_normal((batch, size, size, channels), np.float32)
  t = rng.uniform(0.1, 1.0, batch).astype(np.float32)
  h = t * rng.uniform(0.0, 1.0, batch).astype(np.float32)
  y = rng.integers(0, num_classes + 1, batch).astype(np.int32)
  a = rng.standard_normal((batch, augment.AUGMENT_DIM), np.float32)
  return z, t, h, y, a


def _random_params(model, z, t, h, y, scale=0.2):
  """N(0, scale^2) parameters: the real init's 1e-5 output layers make u ~ 0
  and its derivatives nearly trivial."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, t, h, y)
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda p: scale * rng.standard_normal(p.shape, np.float32),
      shapes["params"])


def test_paper_setting_has_the_official_parameter_count():
  config = cifar10_unet.get_config()
  model = models.build_model(config.model)
  params = models.abstract_params(model, (32, 32, 3))
  assert models.param_count(params) == PAPER_PARAMS
  config.model.augment_dim = 0
  params = models.abstract_params(models.build_model(config.model),
                                  (32, 32, 3))
  assert models.param_count(params) == PAPER_PARAMS_NO_AUGMENT
  assert "map_augment" not in params


def test_signature_dropout_and_conditioning():
  config = _tiny_config(dropout=0.5)
  model = models.build_model(config)
  z, t, h, y, a = _inputs()
  params = _random_params(model, z, t, h, y)
  assert params["map_label"]["embedding"].shape == (4, 64)  # + null class
  assert params["map_augment"]["kernel"].shape == (6, 64)
  apply = jax.jit(lambda p, y, a, train, key: model.apply(
      {"params": p}, z, t, h, y, train=train, rngs={"dropout": key},
      augment_labels=a), static_argnums=3)
  key0, key1 = jax.random.key(0), jax.random.key(1)
  u = apply(params, y, a, False, key0)
  assert u.shape == z.shape and u.dtype == z.dtype
  # Inference ignores the dropout rng; training draws masks from it.
  np.testing.assert_array_equal(u, apply(params, y, a, False, key1))
  assert not np.allclose(apply(params, y, a, True, key0),
                         apply(params, y, a, True, key1))
  # Labels and augmentation labels condition the output; None means zeros.
  assert not np.allclose(u, apply(params, (y + 1) % 4, a, False, key0))
  zeros = np.zeros_like(a)
  apply_plain = jax.jit(lambda p: model.apply({"params": p}, z, t, h, y))
  np.testing.assert_allclose(apply_plain(params),
                             apply(params, y, zeros, False, key0),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(u, apply(params, y, zeros, False, key0))
  # The real init: (nearly) zero output, as EDM's init_zero final conv.
  variables = jax.jit(model.init)(jax.random.key(0), z, t, h, y)
  assert np.abs(apply(variables["params"], y, a, False, key0)).max() < 1e-3


def test_positional_embedding_is_edms():
  """endpoint=True spans frequencies 1 .. 1e-4; [sin, cos] order."""
  x = np.array([0.0, 0.5, 1.0], np.float32)
  emb = np.asarray(unet.positional_embedding(jnp.asarray(x), 8))
  freqs = 1e-4 ** (np.arange(4) / 3)
  args = x[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.sin(args),
                                                  np.cos(args)], 1),
                             rtol=1e-6, atol=1e-7)


def test_resampling_matches_torch():
  """EDM's up/down-sampling: torch's (transposed) depthwise convolutions."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(
      np.float32)
  f = np.array([1, 3, 3, 1], np.float32)
  kernel = torch.as_tensor(np.outer(f, f) / f.sum() ** 2)[None, None]
  kernel = kernel.tile([3, 1, 1, 1])
  xt = torch.as_tensor(x)
  down = torch.nn.functional.conv2d(xt, kernel, groups=3, stride=2, padding=1)
  up = torch.nn.functional.conv_transpose2d(xt, kernel * 4, groups=3,
                                            stride=2, padding=1)
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  for ours, theirs in ((unet.downsample(nhwc, (1, 3, 3, 1)), down),
                       (unet.upsample(nhwc, (1, 3, 3, 1)), up)):
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2),
                               theirs.numpy(), rtol=1e-5, atol=1e-6)


def test_jvp_matches_finite_difference():
  """Forward-mode derivatives w.r.t. (z, t, h) through the whole network.

  XLA's attention takes its softmax in float32 even in float64, hence eps
  and the tolerance (as for the DiT).
  """
  model = models.build_model(_tiny_config(model_channels=8))
  eps, rtol = 1e-3, 2e-3
  with jax.enable_x64(True):
    z, t, h, y, a = _inputs()
    z, t, h = (x.astype(np.float64) for x in (z, t, h))
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          _random_params(model, z, t, h, y))
    f = jax.jit(lambda params, z, t, h: model.apply(
        {"params": params}, z, t, h, y, augment_labels=a))
    tangents = (np.random.default_rng(5).standard_normal(z.shape),
                np.ones_like(t), np.ones_like(h))
    _, jvp = jax.jvp(lambda *x: f(params, *x), (z, t, h), tangents)
    plus = f(params, *(x + eps * dx for x, dx in zip((z, t, h), tangents)))
    minus = f(params, *(x - eps * dx for x, dx in zip((z, t, h), tangents)))
    np.testing.assert_allclose(jvp, (plus - minus) / (2 * eps), rtol=rtol,
                               atol=1e-3 * rtol * np.abs(jvp).max())
    assert np.abs(jvp).max() > 1e-2  # non-trivial
  # The gradient of this JVP is the train step, compiled by the digits run.


def test_augmentation_transforms_and_rates():
  image = np.random.default_rng(0).standard_normal((8, 8, 3)).astype(
      np.float32)
  # A whole-pixel translation moves the interior exactly.
  shifted = augment.warp(image, augment._translate(-2.0, 0.0))  # pylint: disable=protected-access
  np.testing.assert_allclose(shifted[:, 2:], image[:, :-2], atol=1e-6)
  np.testing.assert_allclose(augment.warp(image, np.eye(3)), image, atol=1e-6)
  # EDM's rates: flips half the time at any p > 0, the rest at p.
  rng = np.random.default_rng(1)
  labels = np.stack([augment.sample_transform(rng, 0.12, 32, 32)[2]
                     for _ in range(4000)])
  active = labels != 0
  assert abs(active[:, 0].mean() - 0.5) < 0.03
  for column in (1, 2, 4):  # scale, aniso, translate
    assert abs(active[:, column].mean() - 0.12) < 0.02
  plain, labels0 = augment.augment(image, np.random.default_rng(3), 0.0)
  np.testing.assert_array_equal(plain, image)
  np.testing.assert_array_equal(labels0, 0.0)


def _digits_config(augment_p, augment_dim=6, seed=0):
  c = digits_unet.get_config()
  c.model.augment_dim = augment_dim
  c.data.update(augment_p=augment_p, shuffle_seed=seed)
  c.training.batch_size = 32
  return c


def test_augmented_pipeline_is_deterministic_and_p0_is_identity():
  first = [next(pipeline.make_train_iterator(_digits_config(0.5)))
           for _ in range(2)]
  assert first[0]["augment_labels"].shape == (32, 6)
  assert first[0]["augment_labels"].dtype == np.float32
  for key in ("x", "y", "augment_labels"):
    np.testing.assert_array_equal(first[0][key], first[1][key])
  other = next(pipeline.make_train_iterator(_digits_config(0.5, seed=1)))
  assert not np.array_equal(other["augment_labels"], first[0]["augment_labels"])
  plain = next(pipeline.make_train_iterator(_digits_config(0.0, 0)))
  assert "augment_labels" not in plain
  off = next(pipeline.make_train_iterator(_digits_config(0.0)))
  np.testing.assert_array_equal(off["x"], plain["x"])
  np.testing.assert_array_equal(off["augment_labels"], 0.0)
  assert not np.array_equal(first[0]["x"], plain["x"])
  with pytest.raises(ValueError, match="augment_dim"):
    pipeline.make_train_iterator(_digits_config(0.5, augment_dim=0))


def test_cifar10_train_step_lowers_from_abstract_shapes(tmp_path):
  """The full paper setting (55.9M U-Net, augmentation labels, dropout)."""
  exp = trainer.Experiment(cifar10_unet.get_config(), str(tmp_path))
  lowered = exp.lower_train_step(batch_size=8)
  batch_arg = lowered.args_info[0][1]
  assert batch_arg["augment_labels"].shape == (8, 6)
  assert models.param_count(exp.abstract_state.params) == PAPER_PARAMS
  assert set(exp.abstract_state.ema_params) == {"0.9999", "0.99995", "0.9996"}


def test_digits_unet_learns(tmp_path):
  """A short run on one device: the 1-NFE Fréchet distance falls.

  Scored with the raw parameters (an EMA of 0.999 would still be mostly the
  initial, zero-output network after 90 steps).
  """
  c = digits_unet.get_config("dropout=0.1")
  c.model.model_channels = 16
  c.mesh.num_devices = 1
  c.optimizer.update(lr=2e-3, warmup_steps=0)
  c.training.update(num_steps=90, batch_size=64, log_every_steps=30)
  c.checkpoint.update(every_steps=90, async_save=False)
  c.eval.update(every_steps=30, nfe=(1,), num_samples=512, batch_size=256,
                ema_decay=0.0)
  c.sample.every_steps = 0
  trainer.train_and_evaluate(c, str(tmp_path))
  results = {}
  for step in (30, 90):
    with open(tmp_path / "eval" / f"{step}.json", encoding="utf-8") as f:
      results[step] = json.load(f)
  fd = {step: r["nfe1/fd_digits"] for step, r in results.items()}
  assert fd[90] < 0.6 * fd[30], fd
  assert results[90]["nfe1/class_accuracy"] > 0.7, results
