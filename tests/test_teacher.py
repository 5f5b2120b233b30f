"""The frozen teacher: loaded from an export, guided, an argument of the
compiled step (not a constant), and seen by objectives as context.teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import export
from mf_jax import models
from mf_jax import objectives
from mf_jax.objectives import common
from mf_jax.training import teacher as teacher_lib
from mf_jax.training import trainer


def _toy_config(**objective):
  c = config_lib.base_config()
  c.model.update(name="mlp", in_channels=2, hidden_size=16, depth=2,
                 num_classes=3)
  for key in ("variant", "input_size", "mlp_ratio", "remat", "dtype"):
    del c.model[key]
  c.data.name = "moons"
  c.objective.update(**objective)
  c.training.update(batch_size=8, num_steps=2)
  return c


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  config = _toy_config()
  model = models.build_model(config.model)
  shapes = models.abstract_params(model, (2,))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32), shapes)
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
  export.save(path, params, config.model, source="test", step=0)
  return path


def _inputs():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((8, 2)).astype(np.float32)
  t = rng.uniform(0.2, 1.0, 8).astype(np.float32)
  return z, t, 0.5 * t, (np.arange(8) % 3).astype(np.int32)


def test_teacher_is_the_export_and_guidance_mixes_it(teacher_file):
  z, t, h, y = _inputs()
  u_export, _ = export.load(teacher_file)
  expect_y = u_export(z, t, t - h, y)
  expect_null = u_export(z, t, t - h, None)
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  for scale in (1.0, 2.5):
    config = _toy_config(teacher=teacher_file, teacher_cfg_scale=scale)
    apply, frozen = teacher_lib.load(config, mesh)
    got = apply(frozen["teacher"], z, t, h, y)
    np.testing.assert_allclose(
        got, expect_null + scale * (expect_y - expect_null), rtol=1e-5,
        atol=1e-6)


def test_teacher_reaches_the_objective_through_the_compiled_step(
    teacher_file, monkeypatch, tmp_path):
  """A loss reading context.teacher trains towards it; its parameters are
  an argument of the compiled step, so changing them changes the loss."""
  def loss(u_fn, params, batch, draws, config, num_classes, context):
    t = draws["t"]
    u = u_fn(params, batch["x"], t, t, batch["y"], True)
    target = context.teacher(batch["x"], t, t, batch["y"])
    value = jnp.mean(common.per_sample_sq_error(u, target))
    return value, {"loss": value}

  fake = type("Distill", (), {
      "SAMPLER": "flow_map", "draw": staticmethod(
          objectives.get("flow_matching").draw),
      "loss": staticmethod(loss)})
  monkeypatch.setitem(objectives.OBJECTIVES, "distill", fake)
  config = _toy_config(name="distill", teacher=teacher_file)
  exp = trainer.Experiment(config, str(tmp_path))
  step, compiled = exp.compile_train_step()
  arguments = jax.tree.leaves(compiled.args_info)
  teacher_leaves = jax.tree.leaves(exp.teacher[1])
  assert len(arguments) >= len(teacher_leaves) > 0
  state = exp.new_state()
  batch = {"x": jnp.ones((8, 2)), "y": jnp.zeros(8, jnp.int32)}
  rng = jax.random.key(0)
  _, metrics = step(state, batch, rng)
  doubled = jax.tree.map(lambda a: 2 * a, exp.teacher[1])
  _, metrics2 = compiled(exp.new_state(), batch, rng, doubled)
  assert float(metrics["loss"]) != float(metrics2["loss"])


def test_missing_or_misfit_teacher_fails_before_compiling(teacher_file,
                                                          tmp_path):
  with pytest.raises(FileNotFoundError, match="objective.teacher"):
    teacher_lib.check(_toy_config(teacher=str(tmp_path / "none.safetensors")))
  config = _toy_config(teacher=teacher_file)
  config.model.in_channels = 3
  with pytest.raises(ValueError, match="in_channels=2"):
    teacher_lib.check(config)
