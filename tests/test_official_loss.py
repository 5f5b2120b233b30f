"""The MeanFlow loss against the official code's, draw for draw.

The fixture (tests/fixtures/official_meanflow_loss, see its README) holds
the official JAX loss on a tiny DiT for four guidance settings, with the
random draws it made (t, r, e, dropped rows) written out, its intermediates,
its loss and the gradient of every parameter. Fed the same draws, our loss
must reproduce all of them. With the adaptive weight at p = 1 the loss is
~1 whatever the error, so the per-sample squared error is the figure that
tells a wrong target apart.
"""

import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from mf_jax import models
from mf_jax.models import official
from mf_jax.objectives import meanflow

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fixtures")
LOSS = os.path.join(FIXTURES, "official_meanflow_loss")
NUM_CLASSES = 10


def _official_tree(path):
  """An official-path safetensors file as our DiT's parameter tree."""
  flat = safetensors.numpy.load_file(path)
  tree = flax.traverse_util.unflatten_dict(flat, sep="/")
  return official.official_to_mf_jax(tree["net"])


def _u_fn():
  with open(os.path.join(FIXTURES, "official_meanflow_tiny", "meta.json")) as f:
    model = models.build_model(official.dit_config_from_official(json.load(f)))

  def u_fn(params, z, t, h, y, train):
    return model.apply({"params": params}, z, t, h, y, train=train)
  return u_fn


def _settings(case):
  """The official MeanFlow(...) arguments of the fixture, as our config."""
  return ml_collections.ConfigDict(dict(
      guidance_omega=float(case["omega"]), guidance_kappa=float(case["kappa"]),
      guidance_t_start=float(case["t_start"]),
      guidance_t_end=float(case["t_end"]), class_dropout=0.1,
      adaptive_p=1.0, adaptive_eps=0.01, jvp_tangent="v,0,1"))


def _max_rel(a, ref):
  return float(np.max(np.abs(np.asarray(a) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def reference():
  return {"params": _official_tree(os.path.join(LOSS, "params.safetensors")),
          "cases": np.load(os.path.join(LOSS, "cases.npz")),
          "u_fn": _u_fn()}


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_loss_intermediates_and_gradients_match_official(reference, k):
  case = {name.split("/", 1)[1]: reference["cases"][name]
          for name in reference["cases"] if name.startswith(f"case{k}/")}
  settings, u_fn = _settings(case), reference["u_fn"]
  batch = {"x": case["x"], "y": case["y"]}
  draws = {"t": case["t"], "r": case["r"], "e": case["e"],
           "dropped": case["drop_mask"]}
  assert np.array_equal(case["drop_mask"],
                        np.arange(8) < case["num_drop"])

  def loss_and_terms(params):
    value, _ = meanflow.loss(u_fn, params, batch, draws, settings,
                             NUM_CLASSES)
    return value, meanflow.terms(u_fn, params, batch, draws, settings,
                                 NUM_CLASSES)

  (value, terms), grads = jax.jit(
      jax.value_and_grad(loss_and_terms, has_aux=True))(reference["params"])

  np.testing.assert_array_equal(terms["y"], case["y_inp"])
  for ours, theirs in (("z", "z_t"), ("v_g", "v_g"), ("u", "u"),
                       ("dudt", "du_dt"), ("u_target", "u_tgt"),
                       ("sq_error", "sq_err")):
    assert _max_rel(terms[ours], case[theirs]) < 1e-5, (ours,
        _max_rel(terms[ours], case[theirs]))
  np.testing.assert_allclose(value, case["loss"], rtol=1e-5)
  weight = (terms["sq_error"] + settings.adaptive_eps) ** settings.adaptive_p
  assert _max_rel(weight, case["adp_wt"]) < 1e-5

  reference_grads = _official_tree(
      os.path.join(LOSS, f"grads_case{k}.safetensors"))
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  flat_ref = flax.traverse_util.flatten_dict(reference_grads, sep="/")
  assert flat.keys() == flat_ref.keys()
  worst = max((_max_rel(flat[name], flat_ref[name]), name) for name in flat)
  assert worst[0] < 1e-4, worst
