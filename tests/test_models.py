"""Backbones: the official MeanFlow DiT exactly, the interface, derivatives."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mf_jax import models
from mf_jax.models import official

# Written by the official MeanFlow code at its pinned versions (see its
# README.md): the released checkpoint's layout and the official outputs.
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "fixtures", "official_meanflow_tiny")


def _dit_config(**overrides):
  fields = dict(name="dit", variant="", input_size=8, in_channels=1,
                patch_size=2, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, time_inputs="t,h")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _mlp_config(**overrides):
  fields = dict(name="mlp", hidden_size=32, depth=2, num_classes=3,
                time_inputs="t,h")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


# Test data comes from numpy: jax.random ops would each compile (seconds).
def _inputs(shape, num_classes):
  """z, t, h = t - r and y (null class included), float32 / int32."""
  rng = np.random.default_rng(0)
  b = shape[0]
  z = rng.standard_normal(shape, np.float32)
  t = rng.uniform(0.1, 1.0, b).astype(np.float32)
  r = t * rng.uniform(0.0, 1.0, b).astype(np.float32)
  y = rng.integers(0, num_classes + 1, b).astype(np.int32)
  return z, t, t - r, y


def _random_params(model, z, t, h, y, scale=0.1):
  """N(0, scale^2) parameters of the model's shapes, without compiling its
  init; the real init's zero gates would make u = 0 and derivatives trivial."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, t, h, y)
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda p: scale * rng.standard_normal(p.shape, np.float32),
      shapes["params"])


@pytest.mark.parametrize("variant,expected", [
    ("S/2", 33_105_424), ("B/4", 131_165_248), ("B/2", 131_091_472),
    ("M/2", 308_019_216), ("L/2", 459_137_040), ("XL/2", 676_440_592)])
def test_dit_param_counts_match_official(variant, expected):
  config = ml_collections.ConfigDict(dict(
      name="dit", variant=variant, input_size=32, in_channels=4,
      num_classes=1000))
  params = models.abstract_params(models.build_model(config), (32, 32, 4))
  assert models.param_count(params) == expected


def test_official_checkpoint_reproduces_official_outputs():
  with open(os.path.join(FIXTURE, "meta.json")) as f:
    model = models.build_model(official.dit_config_from_official(json.load(f)))
  ckpt = official.load_official_checkpoint(
      os.path.join(FIXTURE, "checkpoint", "checkpoint_3"))
  io = np.load(os.path.join(FIXTURE, "io.npz"))
  z, t, r, y = io["z"], io["t"], io["r"], io["y"]
  apply = jax.jit(model.apply)
  for params_key, out_key in (("params", "u_params"), ("ema_params", "u_ema")):
    u = apply({"params": ckpt[params_key]}, z, t, t - r, y)
    np.testing.assert_allclose(u, io[out_key], atol=1e-5, rtol=1e-5)
  ones = np.ones_like(t)
  one_step = z - apply({"params": ckpt["ema_params"]}, z, ones, ones, y)
  np.testing.assert_allclose(one_step, io["one_step_ema"], atol=1e-5,
                             rtol=1e-5)


def test_official_mapping_rejects_unknown_keys():
  with pytest.raises(ValueError, match="pos_embed"):
    official.official_to_mf_jax({"pos_embed": np.zeros(3)})


@pytest.mark.parametrize("config", [
    _dit_config(), _dit_config(num_classes=0), _mlp_config(),
    _mlp_config(num_classes=0)], ids=["dit", "dit_uncond", "mlp", "mlp_uncond"])
def test_output_has_input_shape_and_dtype(config):
  model = models.build_model(config)
  shape = (3, 8, 8, 1) if config.name == "dit" else (3, 5)
  z, t, h, y = _inputs(shape, config.num_classes)
  variables = jax.jit(model.init)(jax.random.key(0), z, t, h, y)
  u = jax.jit(functools.partial(model.apply, train=True))(variables, z, t, h, y)
  assert u.shape == z.shape and u.dtype == z.dtype
  np.testing.assert_array_equal(u, 0.0)  # zero-initialised output layers
  assert ("y_embedder" in variables["params"]) == bool(config.num_classes)


# XLA's attention takes its softmax in float32 even for float64 inputs, so
# the DiT's check needs a larger step (eps) and tolerance than the MLP's.
@pytest.mark.parametrize("config,shape,eps,rtol", [
    (_dit_config(hidden_size=16, num_heads=2, depth=1), (2, 4, 4, 1), 1e-3,
     2e-3),
    (_mlp_config(), (4, 2), 1e-5, 1e-6)], ids=["dit", "mlp"])
def test_jvp_matches_finite_difference(config, shape, eps, rtol):
  """Forward-mode derivatives w.r.t. (z, t, h), and grad through them."""
  model = models.build_model(config)
  with jax.enable_x64(True):
    z, t, h, y = _inputs(shape, config.num_classes)
    z, t, h = (a.astype(jnp.float64) for a in (z, t, h))
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          _random_params(model, z, t, h, y))
    f = jax.jit(
        lambda params, z, t, h: model.apply({"params": params}, z, t, h, y))
    tangents = (np.random.default_rng(5).standard_normal(z.shape),
                jnp.ones_like(t), -0.5 * jnp.ones_like(h))
    _, jvp = jax.jvp(lambda *a: f(params, *a), (z, t, h), tangents)
    plus = f(params, *(a + eps * da for a, da in zip((z, t, h), tangents)))
    minus = f(params, *(a - eps * da for a, da in zip((z, t, h), tangents)))
    np.testing.assert_allclose(jvp, (plus - minus) / (2 * eps), rtol=rtol,
                               atol=1e-3 * rtol)
    assert np.abs(jvp).max() > 1e-3  # non-trivial

    def loss(params):
      return jnp.sum(jax.jvp(lambda *a: f(params, *a), (z, t, h), tangents)[1]
                     ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("time_inputs,embedders", [
    ("t,h", {"t", "h"}), ("t,r", {"t", "r"}), ("t,r,h", {"t", "r", "h"}),
    ("h", {"h"}), (" t , h ", {"t", "h"})])
def test_time_inputs_choose_embedders(time_inputs, embedders):
  for config, shape in ((_dit_config(time_inputs=time_inputs), (8, 8, 1)),
                        (_mlp_config(time_inputs=time_inputs), (2,))):
    params = models.abstract_params(models.build_model(config), shape)
    names = {k for k in params if k in ("t_embedder", "r_embedder",
                                        "h_embedder")}
    assert names == {f"{name}_embedder" for name in embedders}


def test_time_input_r_is_t_minus_h():
  """An 'r'-only network is unchanged when t and h shift together."""
  model = models.build_model(_mlp_config(time_inputs="r"))
  z, t, h, y = _inputs((4, 2), 3)
  params = _random_params(model, z, t, h, y)
  apply = jax.jit(model.apply)
  u = apply({"params": params}, z, t, h, y)
  u_shift = apply({"params": params}, z, t + 0.1, h + 0.1, y)
  np.testing.assert_allclose(u, u_shift, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["", "t,t", "s", "t;h"])
def test_invalid_time_inputs_raise(bad):
  for config in (_dit_config(time_inputs=bad), _mlp_config(time_inputs=bad)):
    with pytest.raises(ValueError, match="time_inputs"):
      models.build_model(config)


@pytest.mark.parametrize("config,match", [
    (ml_collections.ConfigDict(dict(name="resnet")), "valid"),
    (_dit_config(variant="B/3"), "variant"),
    (_dit_config(input_size=9), "divisible"),
    (ml_collections.ConfigDict(dict(name="dit", variant="")), "variant"),
])
def test_bad_configs_raise(config, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(config)


def test_variant_fields_can_be_overridden():
  model = models.build_model(_dit_config(
      variant="S/2", patch_size=4, depth=None, hidden_size=None,
      num_heads=None))
  assert (model.depth, model.hidden_size, model.patch_size) == (12, 384, 4)


def test_remat_and_bfloat16_match_float32():
  z, t, h, y = _inputs((2, 8, 8, 1), 10)
  base = models.build_model(_dit_config())
  params = _random_params(base, z, t, h, y)

  def u_and_grad(model):
    def sq_norm(p):
      u = model.apply({"params": p}, z, t, h, y)
      return jnp.sum(u ** 2), u
    grads, u = jax.jit(jax.grad(sq_norm, has_aux=True))(params)
    return u, grads

  u, grads = u_and_grad(base)
  u_remat, grads_remat = u_and_grad(
      models.build_model(_dit_config(remat=True)))
  np.testing.assert_allclose(u_remat, u, rtol=1e-6, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-5), grads_remat, grads)

  bf16 = models.build_model(_dit_config(dtype="bfloat16"))
  assert {p.dtype for p in jax.tree.leaves(
      models.abstract_params(bf16, z.shape[1:]))} == {np.dtype("float32")}
  u_bf16 = jax.jit(bf16.apply)({"params": params}, z, t, h, y)
  assert u_bf16.dtype == jnp.float32
  np.testing.assert_allclose(u_bf16, u, atol=0.05 * np.abs(u).max())
