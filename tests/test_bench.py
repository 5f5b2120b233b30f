"""bench --against=official-structure and the reference step it times.

The reference (tools/reference_step.py) is only a fair yardstick if it
computes what the project computes, and what the official code computes:
its loss and gradients must equal the official fixture's (the official
code's own numbers) and the project's objectives' on the same weights and
draws, for flow matching and MeanFlow with and without guidance.
"""

import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from mf_jax import config_lib
from mf_jax import models
from mf_jax import objectives
from mf_jax.tools import bench
from mf_jax.tools import reference_step
from mf_jax.training import state as state_lib

LOSS_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "fixtures", "official_meanflow_loss")
BATCH = 4
NUM_CLASSES = 10


def _tiny_config():
  """DiT depth 1, width 32 on 8x8x4 latents; guidance gated at t <= 0.7 and
  half the rows with r != t, so every branch of the loss is exercised."""
  c = config_lib.base_config()
  c.model.update(variant="", input_size=8, in_channels=4, patch_size=2,
                 hidden_size=32, depth=1, num_heads=2,
                 num_classes=NUM_CLASSES)
  c.objective.update(fraction_r_neq_t=0.5, guidance_t_end=0.7)
  c.training.batch_size = BATCH
  c.mesh.num_devices = 1
  return c


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _max_rel(a, ref):
  a, ref = np.asarray(a), np.asarray(ref)
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _random_weights(shapes, key, scale=0.1):
  """N(0, scale^2) in every leaf: no zero-initialised adaLN gates, so
  every gradient is nonzero and the comparison has teeth."""
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def weights_and_batch():
  """Reference-layout weights, a batch and noise every variant shares (the
  network is the same; only the objective settings differ)."""
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((BATCH, 8, 8, 4)).astype(np.float32),
           "y": np.array([3, 1, 4, 1], np.int32)}
  shapes = jax.eval_shape(reference_step.ReferenceStep(
      _tiny_config()).init_params, jax.random.key(0))
  params, e = jax.jit(lambda key: (  # one program: eager ops are slow
      _random_weights(shapes, key),
      jax.random.normal(jax.random.fold_in(key, 1), batch["x"].shape)))(
          jax.random.key(0))
  return params, batch, e


# Both losses and both guidance forms (plain MeanFlow is meanflow_cfg0's
# computation without its guidance pass).
@pytest.mark.parametrize("variant", ["flow_matching", "meanflow_cfg0",
                                     "meanflow_cfg"])
def test_reference_loss_and_gradients_equal_the_projects(variant,
                                                         weights_and_batch):
  config = bench.variants(_tiny_config())[variant]
  ref = reference_step.ReferenceStep(config)
  params, batch, e = weights_and_batch
  # Fixed draws: row 0 dropped, rows 2 and 3 with r < t, rows 0 and 2
  # outside the guidance interval [0, 0.7].
  t = jnp.array([0.9, 0.5, 0.8, 0.3])
  r = jnp.array([0.9, 0.5, 0.4, 0.1])
  draws = {"t": t.reshape(-1, 1, 1, 1), "r": r.reshape(-1, 1, 1, 1), "e": e,
           "num_drop": jnp.int32(1)}
  project_draws = {"t": t, "r": r, "e": e,
                   "dropped": jnp.arange(BATCH) < draws["num_drop"],
                   "dropout": jax.random.key(3)}
  u_fn = state_lib.make_u_fn(models.build_model(config.model))
  objective = objectives.get(config.objective.name)

  def project_loss(p):
    return objective.loss(u_fn, p, batch, project_draws, config.objective,
                          NUM_CLASSES)

  (ref_loss, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(
      lambda p: ref.loss_fn(p, batch, draws), has_aux=True))(params)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      project_loss, has_aux=True))(reference_step.to_project_params(params))

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # p = 1 makes the loss ~1 whatever the error: the squared error of u
  # against v checks the prediction itself.
  np.testing.assert_allclose(metrics["v_mse"],
                             np.mean(ref_metrics["v_loss"]), rtol=1e-5)
  flat = _flat(grads)
  flat_ref = _flat(reference_step.to_project_params(ref_grads))
  assert flat.keys() == flat_ref.keys()
  assert all(np.max(np.abs(g)) > 0 for g in flat_ref.values())
  worst = max((_max_rel(flat[k], flat_ref[k]), k) for k in flat)
  assert worst[0] < 1e-5, worst


def test_reference_reproduces_the_official_loss_fixture(case=3):
  """The official code's loss and gradients (tests/fixtures/
  official_meanflow_loss: a tiny DiT, width 64, depth 2), from parameters
  in the official layout loaded into the reference DiT unchanged. Case 3:
  kappa > 0 (two guidance passes) gated at t <= 0.75, two dropped rows."""
  params = flax.traverse_util.unflatten_dict(safetensors.numpy.load_file(
      os.path.join(LOSS_FIXTURE, "params.safetensors")), sep="/")["net"]
  data = np.load(os.path.join(LOSS_FIXTURE, "cases.npz"))
  c = {k.split("/", 1)[1]: data[k] for k in data if
       k.startswith(f"case{case}/")}
  settings = ml_collections.ConfigDict(dict(
      guidance_omega=float(c["omega"]), guidance_kappa=float(c["kappa"]),
      guidance_t_start=float(c["t_start"]), guidance_t_end=float(c["t_end"]),
      adaptive_p=1.0, adaptive_eps=0.01))
  net = reference_step.ReferenceDiT(patch_size=2, in_channels=4,
                                    hidden_size=64, depth=2, num_heads=4,
                                    num_classes=NUM_CLASSES)
  draws = {"t": c["t"].reshape(-1, 1, 1, 1), "r": c["r"].reshape(-1, 1, 1, 1),
           "e": c["e"], "num_drop": c["num_drop"]}

  def loss(p):
    u_fn = lambda z, t, h, y: net.apply({"params": p}, z, t.reshape(-1),
                                        h.reshape(-1), y)
    return reference_step.meanflow_loss(u_fn, c["x"], c["y"], draws,
                                        settings, NUM_CLASSES)

  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params)
  np.testing.assert_allclose(value, c["loss"], rtol=1e-6)
  assert _max_rel(metrics["v_loss"], c["v_loss"]) < 1e-5
  official_grads = _flat(flax.traverse_util.unflatten_dict(
      safetensors.numpy.load_file(
          os.path.join(LOSS_FIXTURE, f"grads_case{case}.safetensors")),
      sep="/")["net"])
  flat = _flat(grads)
  assert flat.keys() == official_grads.keys()
  worst = max((_max_rel(flat[k], official_grads[k]), k) for k in flat)
  assert worst[0] < 1e-5, worst


def test_against_official_structure_reports_medians_ratios_and_costs():
  results = bench.compare(_tiny_config(), batch_size=BATCH, rounds=2,
                          steps_per_round=1, names=["flow_matching"])
  entry = results["flow_matching"]
  for key in ("project_seconds", "reference_seconds", "ratio_median",
              "ratio_q25", "ratio_q75", "project_flops", "reference_flops",
              "flops_ratio", "peak_ratio"):
    assert np.isfinite(entry[key]) and entry[key] > 0, (key, entry[key])
  assert entry["ratio_q25"] <= entry["ratio_median"] <= entry["ratio_q75"]
  # Same function, same FLOPs up to the step's bookkeeping.
  assert 0.8 < entry["flops_ratio"] < 1.25, entry["flops_ratio"]
  for side in ("project", "reference"):
    assert entry[f"{side}_memory"]["peak_bytes"] > 0
  table = bench.markdown_table(results)
  assert table.count("\n") == 2 and "| flow_matching |" in table


def test_against_rejects_what_the_reference_cannot_mirror():
  config = _tiny_config()
  config.objective.jvp_tangent = "v,0,0"
  with pytest.raises(ValueError, match="jvp_tangent"):
    bench.compare(config, batch_size=BATCH, rounds=1)
