"""Reflow and MeanFlow distillation: targets by hand, the exact Gaussian
teacher's pairs and fixed points, the start from an export, bad input."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import export
from mf_jax import models
from mf_jax import objectives
from mf_jax import sharding
from mf_jax.data import pairs
from mf_jax.data import pipeline
from mf_jax.objectives import common
from mf_jax.objectives import meanflow
from mf_jax.objectives import reflow
from mf_jax.tools import make_pairs
from mf_jax.training import init_from
from mf_jax.training import state as state_lib
from mf_jax.training import teacher as teacher_lib
from tests.gaussian_flow import exact_u, marginal_velocity, MU, S

DIM = 2


def _teacher_u(params, z, t, h, y, train):
  """The exact Gaussian data's velocity field, as a frozen teacher."""
  del params, h, y, train
  return marginal_velocity(z, t)


def _straight_u(params, z, t, h, y, train):
  """The optimum of reflow on the exact teacher's pairs x = MU + S e: the
  straight line z_t = (1 - t) MU + ((1 - t) S + t) e, velocity e - x."""
  del params, h, y, train
  t_ = common.broadcast_to(t, z)
  e = (z - (1 - t_) * MU) / ((1 - t_) * S + t_)
  return (1 - S) * e - MU


@pytest.fixture(scope="module")
def gaussian_pairs(tmp_path_factory):
  """Pairs of the exact Gaussian teacher, adaptive ODE to 1e-7, 8 devices."""
  output = str(tmp_path_factory.mktemp("gaussian_pairs"))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  make_pairs.make_pairs(_teacher_u, {}, output, 256, (DIM,), 0, mesh,
                        batch=64, shard_size=100, rtol=1e-7, atol=1e-7)
  return output


def test_pairs_of_the_exact_teacher_are_its_flow_map(gaussian_pairs):
  """The Gaussian flow keeps the standardised coordinate: e at t = 1 goes
  to x = MU + S e at t = 0."""
  data = pairs.read_all(gaussian_pairs)
  assert data["x"].shape == data["e"].shape == (256, DIM)
  np.testing.assert_allclose(data["x"], MU + S * data["e"], atol=1e-5)
  assert pairs.read_manifest(gaussian_pairs)["num_shards"] == 3


def _config(**objective):
  c = config_lib.base_config()
  c.model.update(name="mlp", in_channels=DIM, hidden_size=16, depth=1,
                 num_classes=3)
  for key in ("variant", "input_size", "mlp_ratio", "remat", "dtype"):
    del c.model[key]
  c.data.name = "moons"
  c.objective.update(**{"name": "reflow", "adaptive_p": 0.0, **objective})
  return c


def _net(params, z, t, h, y, train):
  """A small nonlinear field of (z, t, h, y) with parameters (a, b)."""
  del train
  t_, h_ = common.broadcast_to(t, z), common.broadcast_to(h, z)
  y_ = common.broadcast_to(y.astype(z.dtype), z)
  return params["a"] * jnp.tanh(z) * (1 + t_) + params["b"] * h_ + 0.1 * y_


def _batch(n=8):
  rng = np.random.default_rng(0)
  return {"x": rng.standard_normal((n, DIM), np.float32),
          "e": rng.standard_normal((n, DIM), np.float32),
          "y": (np.arange(n) % 3).astype(np.int32)}


@pytest.mark.parametrize("one_step", [False, True])
def test_reflow_target_by_hand(one_step):
  """u(z_t, t, h = 0, y) against e - x of the pair, z_t = (1 - t) x + t e;
  the one-step variant at t = 1 (z = e). Labels are never dropped."""
  settings = _config(reflow_one_step=one_step, class_dropout=0.5).objective
  params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.4)}
  batch = _batch()
  draws = reflow.draw(jax.random.key(1), batch, settings, 3)
  t = np.asarray(draws["t"])
  if one_step:
    assert np.all(t == 1.0)
  else:
    assert len(np.unique(t)) == len(t) and np.all((t > 0) & (t < 1))
  x, e, y = batch["x"], batch["e"], batch["y"]
  z = (1 - t[:, None]) * x + t[:, None] * e
  u = 0.7 * np.tanh(z) * (1 + t[:, None]) + 0.1 * y[:, None]
  expect = np.mean(np.sum((u - (e - x)) ** 2, axis=-1))
  value, metrics = reflow.loss(_net, params, batch, draws, settings, 3)
  np.testing.assert_allclose(value, expect, rtol=1e-5)
  np.testing.assert_allclose(metrics["mse"], expect, rtol=1e-5)


def _reflow_loss(field, data, one_step=False):
  settings = _config(reflow_one_step=one_step, time_sampler="uniform")
  batch = {**data, "y": np.zeros(len(data["x"]), np.int32)}
  draws = reflow.draw(jax.random.key(2), batch, settings.objective, 0)
  return float(reflow.loss(field, {}, batch, draws, settings.objective,
                           0)[0])


@pytest.mark.parametrize("one_step", [False, True])
def test_reflow_on_the_exact_teachers_pairs_is_solved_by_the_straight_flow(
    gaussian_pairs, one_step):
  """On the pairs of the exact Gaussian teacher, the straight field
  (constant speed along e -> MU + S e) has zero loss up to the ODE's
  tolerance, while the teacher's own, curved field does not: reflow
  straightens the flow. At t = 1 (one step) the straight field is the map
  e -> e - x itself."""
  data = pairs.read_all(gaussian_pairs)
  straight = _reflow_loss(_straight_u, data, one_step)
  curved = _reflow_loss(_teacher_u, data, one_step)
  assert straight < 1e-7 and curved > 1e-2, (straight, curved)


def _mf_settings(**objective):
  c = config_lib.base_config()
  c.objective.update(**{"adaptive_p": 0.0, "class_dropout": 0.0,
                        **objective})
  return c.objective


def _mf_batch_and_draws(n, rng):
  t = rng.uniform(0.2, 1.0, n).astype(np.float32)
  r = t * rng.uniform(0, 0.8, n)  # r < t: exact_u divides by h = t - r
  batch = {"x": (MU + S * rng.standard_normal((n, 1))).astype(np.float32),
           "y": np.zeros(n, np.int32)}
  draws = {"t": t, "r": r.astype(np.float32),
           "e": rng.standard_normal((n, 1)).astype(np.float32),
           "dropped": np.zeros(n, bool)}
  return batch, draws


def _teacher_fn(z, t, h, y):
  return _teacher_u(None, z, t, h, y, False)


def test_meanflow_distillation_targets_are_the_exact_average_velocity():
  """With the exact teacher, MeanFlow's target v - (t - r) du/dt of the
  exact average velocity is that velocity at every sample (zero error per
  row), where the conditional v = e - x leaves an error of O(1) that only
  averages out: the lower-variance targets of distillation."""
  batch, draws = _mf_batch_and_draws(512, np.random.default_rng(0))
  settings = _mf_settings()
  teacher = objectives.Context(step=jnp.int32(0), teacher=_teacher_fn)
  with_teacher = meanflow.terms(exact_u, {}, batch, draws, settings, 0,
                                teacher)
  without = meanflow.terms(exact_u, {}, batch, draws, settings, 0)
  np.testing.assert_allclose(with_teacher["v"], marginal_velocity(
      with_teacher["z"], draws["t"]), rtol=1e-6)
  assert float(jnp.max(with_teacher["sq_error"])) < 1e-8
  assert float(jnp.mean(without["sq_error"])) > 0.1


def test_meanflow_distillation_expected_gradient_vanishes():
  """The exact average velocity is the fixed point of the distillation
  loss: its gradient vanishes there, not a step away."""
  def u_model(params, z, t, h, y, train):
    return exact_u(None, z, t, h, y, train) * (1 + params["a"]) + params["b"]

  batch, draws = _mf_batch_and_draws(4096, np.random.default_rng(1))
  settings = _mf_settings()
  context = objectives.Context(step=jnp.int32(0), teacher=_teacher_fn)
  grad = jax.jit(jax.grad(lambda p: meanflow.loss(
      u_model, p, batch, draws, settings, 0, context)[0]))

  def norm(a, b):
    g = grad({"a": jnp.float32(a), "b": jnp.float32(b)})
    return float(jnp.hypot(g["a"], g["b"]))
  assert norm(0.0, 0.0) < 1e-3 * norm(0.1, 0.1)


def test_meanflow_distillation_asks_dropped_rows_with_the_null_label():
  """Label-dropped rows learn the unconditional field: the teacher is asked
  with the null class there (its guided answer is then unguided)."""
  calls = []

  def teacher(z, t, h, y):
    calls.append(np.asarray(y))
    np.testing.assert_array_equal(h, 0.0)
    return 0.1 * common.broadcast_to(y.astype(z.dtype), z)

  batch, draws = _mf_batch_and_draws(8, np.random.default_rng(2))
  batch["y"] = (np.arange(8) % 3).astype(np.int32)
  draws["dropped"] = np.arange(8) % 2 == 1
  context = objectives.Context(step=jnp.int32(0), teacher=teacher)
  out = meanflow.terms(_net, {"a": 0.5, "b": 0.2}, batch, draws,
                       _mf_settings(class_dropout=0.5), 3, context)
  labels = np.where(draws["dropped"], 3, batch["y"])
  np.testing.assert_array_equal(calls[0], labels)
  np.testing.assert_allclose(out["v"][:, 0], 0.1 * labels, rtol=1e-6)


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
  config = _config()
  shapes = models.abstract_params(models.build_model(config.model), (DIM,))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32), shapes)
  path = str(tmp_path_factory.mktemp("export") / "teacher.safetensors")
  export.save(path, params, config.model, source="test", step=0)
  return path, params


def _pairs_dir(tmp_path, teacher, shape=(DIM,), num_classes=3):
  """A manifest alone: what validation and the start read."""
  record = {"teacher": teacher, "shape": list(shape),
            "num_classes": num_classes, "num_shards": 0}
  (tmp_path / pairs.MANIFEST).write_text(json.dumps(record))
  return str(tmp_path)


def test_student_starts_as_the_pairs_teacher(mlp_export, tmp_path):
  """reflow's default start is the export named by the pairs' manifest
  (objective.teacher overrides, objective.init_from overrides both): its
  parameters, on the state's shardings, and the EMA copies equal to them."""
  path, params = mlp_export
  config = _config()
  config.data.pairs_dir = _pairs_dir(tmp_path, path)
  objectives.validate(config)
  assert init_from.path_of(config) == path
  config.objective.teacher = "/elsewhere/teacher.safetensors"
  assert init_from.path_of(config) == config.objective.teacher
  config.objective.init_from = "/elsewhere/init.safetensors"
  assert init_from.path_of(config) == config.objective.init_from
  config.objective.update(init_from="", teacher="",
                          reflow_init_from_teacher=False)
  assert init_from.path_of(config) == ""

  config.objective.reflow_init_from_teacher = True
  model = models.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = state_lib.make_optimizer(config.optimizer, 10)
  init, _, shardings = state_lib.abstract_state(model, tx, config, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  started = init_from.initial_state(state, config)
  for copy in (started.params, *started.ema_params.values()):
    jax.tree.map(np.testing.assert_array_equal, copy, params)
  assert jax.tree.map(lambda a: a.sharding, started.params) == \
      jax.tree.map(lambda a: a.sharding, state.params)
  # Every leaf its own buffers: the train step donates the whole state.
  leaves = jax.tree.leaves((started.params, started.ema_params))
  buffers = [shard.data.unsafe_buffer_pointer() for leaf in leaves
             for shard in leaf.addressable_shards]
  assert len(set(buffers)) == len(buffers)


def test_bad_input_is_one_line(mlp_export, tmp_path):
  path, _ = mlp_export
  config = _config()
  with pytest.raises(ValueError, match="set data.pairs_dir"):
    objectives.validate(config)
  config.data.pairs_dir = str(tmp_path / "nothing")
  objectives.validate(config)  # evaluation and export need no pairs
  with pytest.raises(FileNotFoundError, match="make_pairs"):
    init_from.path_of(config)  # a fresh run starts from their teacher
  with pytest.raises(FileNotFoundError, match="make_pairs"):
    pipeline.make_train_iterator(config)
  config.data.pairs_dir = _pairs_dir(tmp_path, path, shape=(8, 8, 1))
  with pytest.raises(ValueError, match=r"shape \(8, 8, 1\).*in_channels=2"):
    objectives.validate(config)
  # A start or a teacher that does not exist.
  config.data.pairs_dir = _pairs_dir(tmp_path, str(tmp_path / "gone"))
  abstract = models.abstract_params(models.build_model(config.model), (DIM,))
  with pytest.raises(FileNotFoundError, match="gone does not exist"):
    init_from.load_init_params(config, abstract)
  meanflow_config = _config(name="meanflow",
                            teacher=str(tmp_path / "gone.safetensors"))
  with pytest.raises(FileNotFoundError, match="objective.teacher="):
    teacher_lib.check(meanflow_config)
  # An export of another model.
  config.data.pairs_dir = _pairs_dir(tmp_path, path)
  config.model.hidden_size = 32
  abstract = models.abstract_params(models.build_model(config.model), (DIM,))
  with pytest.raises(ValueError, match="does not fit this run's model"):
    init_from.load_init_params(config, abstract)
