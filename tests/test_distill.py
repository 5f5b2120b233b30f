"""Distillation from a frozen teacher (CD, sCD, CTM, Align Your Flow): each target
by hand on a tiny network, the fixed points on Gaussian data with the exact
teacher and the exact flow map, autoguidance through the compiled step, and
the one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax import export
from mf_jax import models
from mf_jax import objectives
from mf_jax.objectives import ayf
from mf_jax.objectives import cd
from mf_jax.objectives import common
from mf_jax.objectives import ctm
from mf_jax.objectives import scd
from mf_jax.objectives import sct
from mf_jax.training import teacher as teacher_lib
from mf_jax.training import trainer
from tests.gaussian_flow import exact_u, marginal_velocity, MU, S


def _config(name, **objective):
  c = config_lib.base_config()
  c.objective.update(name=name, teacher="teacher.safetensors",
                     class_dropout=0.0, **objective)
  c.model.adaptive_weight_dim = 16  # sCD's learned weight head
  c.training.num_steps = 20_000  # above the tangent warm-ups' 10k
  return c


def _net(params, z, t, h, y, train):
  """A small nonlinear student of (z, t, h, y) with parameters (a, b)."""
  del train
  bt = lambda v: common.broadcast_to(v, z)
  return (params["a"] * jnp.tanh(z) * (1 + bt(t)) + params["b"] * bt(h) * z
          + 0.1 * bt(y.astype(z.dtype)))


def _net_np(params, z, t, h, y):
  return (params["a"] * np.tanh(z) * (1 + t[:, None])
          + params["b"] * h[:, None] * z + 0.1 * y[:, None])


def _teacher(z, t, h, y):
  """A nonlinear 'teacher' velocity (h is ignored: a flow-matching one)."""
  del h
  bt = lambda v: common.broadcast_to(v, z)
  return jnp.sin(z) * (0.5 + bt(t)) - 0.3 * z + 0.05 * bt(y.astype(z.dtype))


def _teacher_np(z, t, y):
  return (np.sin(z) * (0.5 + t[:, None]) - 0.3 * z + 0.05 * y[:, None])


def _karras_np(i, n, lo=0.002, hi=80.0, rho=7.0):
  return (lo ** (1 / rho) + i / (n - 1) * (hi ** (1 / rho) - lo ** (1 / rho))
          ) ** rho


def _heun_np(z, t, r, y, teacher=_teacher_np):
  """One Heun step of EDM's ODE dz_sigma/dsigma = E[e | z], by hand."""
  sig, sig_r = t / (1 - t), r / (1 - r)
  zs = z / (1 - t)[:, None]
  d1 = z + (1 - t)[:, None] * teacher(z, t, y)
  mid = zs + (sig_r - sig)[:, None] * d1
  z_mid = (1 - r)[:, None] * mid
  d2 = z_mid + (1 - r)[:, None] * teacher(z_mid, r, y)
  return (1 - r)[:, None] * (zs + (sig_r - sig)[:, None] * 0.5 * (d1 + d2))


PARAMS = {"a": np.float32(0.7), "b": np.float32(-0.4)}
TARGET = {"a": np.float32(0.5), "b": np.float32(0.3)}


def _batch(n=8, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.standard_normal((n, dim)).astype(np.float32),
          "y": (np.arange(n) % 3).astype(np.int32)}, rng


# ----------------------------------------------------------------------------
# The teacher's step.


def test_teacher_heun_step_is_edms_by_hand_and_second_order():
  batch, rng = _batch()
  z = batch["x"]
  t = rng.uniform(0.3, 0.95, 8).astype(np.float32)
  r = (t * 0.6).astype(np.float32)
  got = cd.teacher_step(_teacher, "heun", z, t, r, batch["y"])
  np.testing.assert_allclose(got, _heun_np(z, t, r, batch["y"]), rtol=1e-5,
                             atol=1e-5)
  # On Gaussian data with the exact velocity, the step approaches the exact
  # flow map at second order: the error of one step is O(gap^3), so halving
  # the step divides it by ~8.
  exact_v = lambda z, t, h, y: marginal_velocity(z, t)
  t1 = np.full(4096, 0.6, np.float32)
  z1 = jnp.asarray(np.random.default_rng(1).normal(0.5, 0.7, (4096, 1)),
                   jnp.float32)
  errors = []
  for gap in (0.2, 0.1):
    r1 = t1 - gap
    step = cd.teacher_step(exact_v, "heun", z1, t1, r1, None)
    exact = z1 - gap * exact_u(None, z1, t1, t1 - r1, None, False)
    errors.append(float(jnp.max(jnp.abs(step - exact))))
  assert 6 < errors[0] / errors[1] < 11, errors
  # 'flow_map' asks for the average velocity over the step: exact.
  flow = cd.teacher_step(lambda z, t, h, y: exact_u(None, z, t, h, y, False),
                         "flow_map", z1, t1, t1 - 0.2, None)
  exact = z1 - 0.2 * exact_u(None, z1, t1, np.full(4096, 0.2), None, False)
  np.testing.assert_allclose(flow, exact, rtol=1e-6)


# ----------------------------------------------------------------------------
# CD.


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
def test_cd_loss_by_hand(metric):
  """f(z_t, t) = z_t - t u(z_t, t, t) of the online parameters against
  f(z_r, r) of the target's, z_r one Heun step of the teacher."""
  settings = _config("cd", cd_metric=metric, cd_huber_c=0.1).objective
  batch, rng = _batch()
  i = rng.integers(0, 17, 8)
  draws = {"sigma": _karras_np(i + 1, 18).astype(np.float32),
           "sigma_next": _karras_np(i, 18).astype(np.float32),
           "e": rng.standard_normal((8, 3)).astype(np.float32),
           "dropped": np.zeros(8, bool)}
  context = objectives.Context(step=jnp.int32(0), target_params=TARGET,
                               teacher=_teacher)
  value, metrics = cd.loss(_net, PARAMS, batch, draws, settings, 3, context)
  x, e, y = batch["x"], draws["e"], batch["y"]
  t = draws["sigma"] / (1 + draws["sigma"])
  r = draws["sigma_next"] / (1 + draws["sigma_next"])
  z_t = (1 - t[:, None]) * x + t[:, None] * e
  z_r = _heun_np(z_t, t, r, y)
  student = z_t - t[:, None] * _net_np(PARAMS, z_t, t, t, y)
  target = z_r - r[:, None] * _net_np(TARGET, z_r, r, r, y)
  sq = np.sum((student - target) ** 2, axis=-1)
  expect = sq if metric == "l2" else np.sqrt(sq + 0.01) - 0.1
  np.testing.assert_allclose(value, np.mean(expect), rtol=1e-4)
  np.testing.assert_allclose(metrics["mse"], np.mean(sq), rtol=1e-4)
  assert float(cd.target_decay(0, settings, 1000)) == 0.0
  assert objectives.has_target(_config("cd"))


# ----------------------------------------------------------------------------
# sCD.


def _net_lv(params, z, t, h, y, train, with_logvar=False):
  u = _net(params, z, t, h, y, train)
  return (u, 0.3 * t) if with_logvar else u


def test_scd_tangent_is_df_ds_along_the_teachers_trajectory():
  """sCT run on sCD's implied pair (x', e') sits at the same x_s, and its
  tangent g (before normalisation, warm-up done) is cos s df/ds with x_s
  moving along the teacher's dx_s/ds: a central difference in float64."""
  settings = _config("scd", scd_warmup_steps=10, scd_tangent_c=0.1).objective
  batch, rng = _batch()
  draws = {"t": rng.uniform(0.1, 0.9, 8).astype(np.float32),
           "e": rng.standard_normal((8, 3)).astype(np.float32),
           "dropped": np.zeros(8, bool)}

  @jax.jit
  def terms():
    batch_hat, draws_hat = scd.implied_pair(_teacher, batch, draws, settings,
                                            3)
    return sct.terms(_net_lv, PARAMS, batch_hat, draws_hat,
                     scd.as_sct(settings), 3, 20)
  out = terms()
  g = np.asarray(out["g"]) * (np.asarray(out["g_norm"])[:, None] + 0.1)

  sigma_d, y = 0.5, batch["y"]
  x, e, t = (np.float64(a) for a in (batch["x"], draws["e"], draws["t"]))
  s = np.arctan2(t, sigma_d * (1 - t))
  x_s = np.cos(s)[:, None] * x + np.sin(s)[:, None] * sigma_d * e
  np.testing.assert_allclose(out["x_s"], x_s, rtol=1e-5, atol=1e-5)

  def point(x_s, s):  # z_t and t of the TrigFlow state
    k = np.cos(s) + sigma_d * np.sin(s)
    return x_s / k[:, None], sigma_d * np.sin(s) / k

  def f(x_s, s):
    z, tt = point(x_s, s)
    return z - tt[:, None] * _net_np(PARAMS, z, tt, tt, y)

  z, tt = point(x_s, s)
  k = np.cos(s) + sigma_d * np.sin(s)
  dxds = ((sigma_d * np.cos(s) - np.sin(s))[:, None] * z
          + (sigma_d / k)[:, None] * _teacher_np(z, tt, y))
  df_ds = _fd(lambda d: f(x_s + d * dxds, s + d), eps=1e-4)
  np.testing.assert_allclose(g, np.cos(s)[:, None] * df_ds, rtol=2e-3,
                             atol=2e-4)
  # The conditional velocity as 'teacher' gives sCT's tangent back.
  conditional = lambda z, t, h, y: jnp.asarray(e - x, jnp.float32)
  _, draws_ct = scd.implied_pair(conditional, batch, draws, settings, 3)
  np.testing.assert_allclose(draws_ct["e"], draws["e"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# CTM.


@pytest.mark.parametrize("inner", ["target", "student"])
def test_ctm_loss_by_hand(inner):
  """estimate = f_tgt(G(z_t, t, s), s), target = f_tgt(G_inner(z_u, u, s),
  s) with z_u k Heun steps of the teacher along the grid, plus flow
  matching at h = 0; the gradient flows through the outer jump's input."""
  settings = _config("ctm", ctm_num_scales=6, ctm_heun_steps=3,
                     ctm_target_inner=inner, ctm_dsm_weight=0.7).objective
  batch, rng = _batch()
  k = 2
  level_t = rng.integers(k, 6, 8)
  level_s = np.array([rng.integers(0, a - k + 1) for a in level_t])
  draws = {"k": np.int32(k), "level_t": level_t.astype(np.int32),
           "level_s": level_s.astype(np.int32),
           "e": rng.standard_normal((8, 3)).astype(np.float32),
           "dsm_t": rng.uniform(0.1, 0.9, 8).astype(np.float32),
           "dsm_e": rng.standard_normal((8, 3)).astype(np.float32),
           "dropped": np.zeros(8, bool)}
  context = objectives.Context(step=jnp.int32(0), target_params=TARGET,
                               teacher=_teacher)
  value, metrics = ctm.loss(_net, PARAMS, batch, draws, settings, 3, context)

  x, e, y = batch["x"], draws["e"], batch["y"]
  time = lambda lvl: _karras_np(lvl, 6) / (1 + _karras_np(lvl, 6))
  t, u, s = time(level_t), time(level_t - k), time(level_s)
  z_t = (1 - t[:, None]) * x + t[:, None] * e
  z_u = z_t
  for j in range(k):
    z_u = _heun_np(z_u, time(level_t - j), time(level_t - j - 1), y)

  def jump(p, z, a, b):
    return z - (a - b)[:, None] * _net_np(p, z, a, a - b, y)

  to_data = lambda z: z - s[:, None] * _net_np(TARGET, z, s, s, y)
  estimate = to_data(jump(PARAMS, z_t, t, s))
  target = to_data(jump(TARGET if inner == "target" else PARAMS, z_u, u, s))
  ctm_sq = np.sum((estimate - target) ** 2, axis=-1)
  td = draws["dsm_t"][:, None]
  z_d = (1 - td) * x + td * draws["dsm_e"]
  dsm = np.sum((_net_np(PARAMS, z_d, draws["dsm_t"], 0 * draws["dsm_t"], y)
                - (draws["dsm_e"] - x)) ** 2, axis=-1)
  np.testing.assert_allclose(metrics["ctm"], np.mean(ctm_sq), rtol=1e-4)
  np.testing.assert_allclose(metrics["dsm"], np.mean(dsm), rtol=1e-4)
  np.testing.assert_allclose(value, np.mean(ctm_sq) + 0.7 * np.mean(dsm),
                             rtol=1e-4)

  # The gradient of the CTM term: through G_theta and then through the
  # target network's jump to data (its parameters fixed), nothing else.
  settings_no_dsm = _config("ctm", ctm_num_scales=6, ctm_heun_steps=3,
                            ctm_target_inner=inner,
                            ctm_dsm_weight=0.0).objective
  grad = jax.grad(lambda p: ctm.loss(_net, p, batch, draws, settings_no_dsm,
                                     3, context)[0])(PARAMS)

  def by_hand(p):
    bt = lambda v: jnp.asarray(v)[:, None]
    g = z_t - bt(t - s) * _net(p, z_t, t, t - s, y, True)
    f = g - bt(s) * _net(TARGET, g, s, s, y, True)
    return jnp.mean(jnp.sum((f - target) ** 2, axis=-1))
  expect = jax.grad(by_hand)(PARAMS)
  for key in PARAMS:
    np.testing.assert_allclose(grad[key], expect[key], rtol=1e-4)


def test_ctm_draws_stay_on_the_grid_in_order():
  """u = t - k levels, s at or below u, every level reachable; p(k)
  proportional to k (ctm_heun_multiplier = 1)."""
  settings = _config("ctm", ctm_num_scales=10, ctm_heun_steps=9).objective
  batch = {"x": np.zeros((512, 2), np.float32), "y": np.zeros(512, np.int32)}
  draw = jax.jit(lambda key: ctm.draw(key, batch, settings, 0))
  for seed in range(10):
    d = draw(jax.random.key(seed))
    k, a, b = int(d["k"]), np.asarray(d["level_t"]), np.asarray(d["level_s"])
    assert np.all((a >= k) & (a <= 9) & (b >= 0) & (b <= a - k))
    assert set(np.unique(a)) == set(range(k, 10)) and b.min() == 0
  np.testing.assert_allclose(ctm.heun_step_probs(settings),
                             np.arange(1, 10) / 45, rtol=1e-6)


# ----------------------------------------------------------------------------
# Align Your Flow.


def _ayf_draws(n=8, dim=3, seed=0):
  batch, rng = _batch(n, dim, seed)
  t = rng.uniform(0.3, 0.95, n).astype(np.float32)
  s = np.where(np.arange(n) % 4 == 0, t, t * rng.uniform(0, 0.9, n))
  return batch, {"t": t, "s": s.astype(np.float32),
                 "e": rng.standard_normal((n, dim)).astype(np.float32),
                 "dropped": np.zeros(n, bool),
                 "guidance": rng.uniform(1, 3, n).astype(np.float32)}


def _fd(fn, eps=1e-3):
  """Central difference of fn(eps') at 0, in float64."""
  return (fn(eps) - fn(-eps)) / (2 * eps)


@pytest.mark.parametrize("kind", ["emd", "lmd"])
@pytest.mark.parametrize("weak", [False, True])
def test_ayf_residual_and_gradient_by_hand(kind, weak):
  """EMD: g = u - v(z_t, t) + r (t - s) du/dt along (v, 1); LMD: g = u -
  v(f, s) - r (t - s) du/ds; du/d. by central differences; v autoguided
  when a weak teacher is given. The gradient is that of
  2 mean g_n . u, g_n = g / (||g|| + c)."""
  settings = _config("ayf", ayf_loss=kind, ayf_warmup_steps=10,
                     ayf_tangent_c=0.1).objective
  batch, draws = _ayf_draws()
  weak_fn = lambda z, t, h, y: 0.5 * _teacher(z, t, h, y) + 0.1 * z
  context = objectives.Context(step=jnp.int32(4), teacher=_teacher,
                               teacher_weak=weak_fn if weak else None)
  out = ayf.residual(_net, PARAMS, batch, draws, settings, 3, context)
  r = 0.4  # warm-up at step 4 of 10

  x, e, y = (np.float64(batch["x"]), np.float64(draws["e"]), batch["y"])
  t, s = np.float64(draws["t"]), np.float64(draws["s"])
  lam = draws["guidance"][:, None]

  def v_of(z, tt):
    v = _teacher_np(z, tt, y)
    if weak:
      v_weak = 0.5 * v + 0.1 * z
      v = lam * v + (1 - lam) * v_weak
    return v

  z = (1 - t[:, None]) * x + t[:, None] * e
  u = _net_np(PARAMS, z, t, t - s, y)
  if kind == "emd":
    v = v_of(z, t)
    dudt = _fd(lambda d: _net_np(PARAMS, z + d * v, t + d, t + d - s, y))
    g = u - v + r * (t - s)[:, None] * dudt
  else:
    f = z - (t - s)[:, None] * u
    duds = _fd(lambda d: _net_np(PARAMS, z, t, t - s - d, y))
    g = u - v_of(f, s) - r * (t - s)[:, None] * duds
  np.testing.assert_allclose(out["g"], g, rtol=2e-4, atol=2e-5)

  g_n = g / (np.linalg.norm(g, axis=-1, keepdims=True) + 0.1)
  grad = jax.grad(lambda p: ayf.loss(_net, p, batch, draws, settings, 3,
                                     context)[0])(PARAMS)
  # d u / d a and d u / d b of the tiny net, by hand.
  du_da = np.tanh(z) * (1 + t[:, None])
  du_db = (t - s)[:, None] * z
  for key, du in (("a", du_da), ("b", du_db)):
    expect = 2 * np.mean(np.sum(g_n * du, axis=-1))
    np.testing.assert_allclose(grad[key], expect, rtol=2e-4, atol=1e-6)


def test_ayf_draws_guidance_range_and_s_below_t():
  settings = _config("ayf", ayf_fraction_s_neq_t=0.5, ayf_guidance_min=1.5,
                     ayf_guidance_max=2.5).objective
  batch = {"x": np.zeros((20000, 2), np.float32),
           "y": np.zeros(20000, np.int32)}
  d = jax.jit(lambda key: ayf.draw(key, batch, settings, 0))(
      jax.random.key(0))
  t, s, lam = (np.asarray(d[k]) for k in ("t", "s", "guidance"))
  assert np.all(s <= t) and abs(np.mean(s < t) - 0.5) < 0.02
  assert lam.min() >= 1.5 and lam.max() <= 2.5
  assert abs(lam.mean() - 2.0) < 0.02


# ----------------------------------------------------------------------------
# Fixed points on Gaussian data: the exact teacher and the exact flow map.


def _exact_field(z, t, h):
  """The exact average velocity (h > 0) and the velocity at h = 0."""
  bt = lambda v: common.broadcast_to(v, z)
  positive = h > 1e-6
  average = exact_u(None, z, t, jnp.where(positive, h, 1.0), None, False)
  return jnp.where(bt(positive), average, marginal_velocity(z, t))


def _student(params, z, t, h, y, train, with_logvar=False):
  """The exact flow map, scaled by (1 + a) and shifted by b."""
  del y, train
  u = _exact_field(z, t, h) * (1 + params["a"]) + params["b"]
  return (u, jnp.zeros(z.shape[:1])) if with_logvar else u


def _exact_teacher(z, t, h, y):
  del y
  return _exact_field(z, t, h)


def _mean_gradient(name, params, n, **objective):
  """The loss gradient over n Gaussian samples (1-D), draws from the
  objective's own draw, with the target network at the same parameters."""
  settings = _config(name, **objective)
  objectives.validate(settings)
  settings = settings.objective
  rng = np.random.default_rng(1)
  batch = {"x": (MU + S * rng.standard_normal((n, 1))).astype(np.float32),
           "y": np.zeros(n, np.int32)}
  context = objectives.Context(step=jnp.int32(999), target_params=params,
                               teacher=_exact_teacher, num_steps=1000)
  module = objectives.get(name)

  @jax.jit
  def grad(params):
    draws = module.draw(jax.random.key(2), batch, settings, 0, context)
    loss = lambda p: module.loss(_student, p, batch, draws, settings, 0,
                                 context.replace(target_params=params))[0]
    return jax.grad(loss)(params)
  grads = grad(params)
  return np.array([grads["a"], grads["b"]])


@pytest.mark.parametrize("name, n, objective", [
    ("cd", 4096, dict(cd_solver="flow_map")),
    ("scd", 4096, dict(scd_warmup_steps=10)),
    ("ctm", 200_000, dict(ctm_solver="flow_map")),
    ("ayf", 4096, dict(ayf_loss="emd", ayf_warmup_steps=10)),
    ("ayf", 4096, dict(ayf_loss="lmd", ayf_warmup_steps=10)),
])
def test_expected_gradient_vanishes_at_the_exact_flow_map(name, n, objective):
  """At the exact map the (expected) gradient vanishes; off it, it does
  not, and it points back: a descent step shrinks the perturbation."""
  zero = {"a": jnp.float32(0.0), "b": jnp.float32(0.0)}
  off = {"a": jnp.float32(0.1), "b": jnp.float32(0.1)}
  at_fixed_point = _mean_gradient(name, zero, n, **objective)
  perturbed = _mean_gradient(name, off, n, **objective)
  assert np.linalg.norm(at_fixed_point) < 0.03 * np.linalg.norm(perturbed), (
      at_fixed_point, perturbed)
  assert perturbed @ np.array([0.1, 0.1]) > 0, perturbed


# ----------------------------------------------------------------------------
# The weak teacher through the compiled step.


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


def _export(path, seed, hidden_size=16):
  config = _toy_config()
  config.model.hidden_size = hidden_size
  model = models.build_model(config.model)
  shapes = models.abstract_params(model, (2,))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), shapes)
  export.save(str(path), params, config.model, source="test", step=0)
  return str(path)


def test_weak_teacher_loads_and_reaches_ayf_through_the_compiled_step(
    tmp_path):
  strong = _export(tmp_path / "strong.safetensors", 0)
  weak = _export(tmp_path / "weak.safetensors", 1, hidden_size=8)
  config = _toy_config(name="ayf", teacher=strong, teacher_weak=weak,
                       ayf_warmup_steps=0)
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  apply, frozen = teacher_lib.load(config, mesh)
  rng = np.random.default_rng(2)
  z = rng.standard_normal((8, 2)).astype(np.float32)
  t = rng.uniform(0.2, 1, 8).astype(np.float32)
  y = (np.arange(8) % 3).astype(np.int32)
  u_weak, _ = export.load(weak)
  np.testing.assert_allclose(apply.weak(frozen["teacher_weak"], z, t, 0 * t,
                                        y), u_weak(z, t, t, y), rtol=1e-5,
                             atol=1e-6)

  exp = trainer.Experiment(config, str(tmp_path / "run"))
  step, compiled = exp.compile_train_step()
  batch = {"x": jnp.asarray(z), "y": jnp.asarray(y)}
  _, metrics = step(exp.new_state(), batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  # The weak teacher's parameters are an argument: changing them changes
  # the (autoguided) target.
  changed = dict(exp.teacher[1], teacher_weak=jax.tree.map(
      lambda a: 2 * a, exp.teacher[1]["teacher_weak"]))
  _, metrics2 = compiled(exp.new_state(), batch, jax.random.key(0), changed)
  assert float(metrics["mse"]) != float(metrics2["mse"])


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("name", ["cd", "scd", "ctm", "ayf"])
def test_distillation_without_a_teacher_is_one_line(name):
  config = _config(name)
  config.objective.teacher = ""
  with pytest.raises(ValueError, match="distils a teacher.*objective.teacher"):
    objectives.validate(config)


@pytest.mark.parametrize("name, field, value, match", [
    ("ayf", "ayf_loss", "huber", "Unknown objective.ayf_loss 'huber'"),
    ("ayf", "ayf_guidance_min", 4.0, "ayf_guidance_min"),
    ("ayf", "ayf_warmup_steps", 30_000, "ayf_warmup_steps"),
    ("cd", "cd_solver", "rk4", "Unknown objective.cd_solver"),
    ("scd", "scd_tangent_c", -1.0, "scd_tangent_c"),
    ("cd", "cd_mu", 1.0, "cd_mu"),
    ("ctm", "ctm_heun_steps", 18, "ctm_heun_steps=18"),
    ("ctm", "ctm_target_inner", "ema", "Unknown objective.ctm_target_inner"),
])
def test_bad_settings_fail_in_one_line(name, field, value, match):
  config = _config(name, **{field: value})
  with pytest.raises(ValueError, match=match) as info:
    objectives.validate(config)
  assert "\n" not in str(info.value)


def test_weak_teacher_without_teacher_or_file_is_one_line(tmp_path):
  config = _toy_config(name="ayf", teacher_weak=str(tmp_path / "w"))
  with pytest.raises(ValueError, match="teacher_weak is set without"):
    teacher_lib.check(config)
  strong = _export(tmp_path / "strong.safetensors", 0)
  config = _toy_config(name="ayf", teacher=strong,
                       teacher_weak=str(tmp_path / "none.safetensors"))
  with pytest.raises(FileNotFoundError, match="objective.teacher_weak="):
    teacher_lib.check(config)
