"""The solvers of the instantaneous velocity: adaptive Dopri5, Heun, Euler.

On Gaussian data the marginal velocity is closed-form and its flow maps
noise e to MU + S e exactly (tests/gaussian_flow.py), so each solver's
error is measured against the exact answer; NFE figures are checked
against evaluations counted on the host while the compiled solve runs.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import io_callback

from mf_jax import config_lib
from mf_jax import samplers
from mf_jax import sharding
from mf_jax.evaluation import evaluator as evaluator_lib
from tests.gaussian_flow import marginal_velocity, MU, S

NUM = 256


def velocity_model(params, z, t, h, y, train):
  """The exact marginal velocity, as a network queried at h = 0."""
  del params, h, y, train
  return marginal_velocity(z, t)


def counting(u_fn, times: list):
  """u_fn that appends each evaluation's time to `times`, on the host, as
  the compiled program runs it (ordered: never dropped or merged)."""

  def counted(params, z, t, h, y, train):
    zero = io_callback(lambda t: times.append(float(t)) or np.float32(0),
                       jax.ShapeDtypeStruct((), jnp.float32), t[0],
                       ordered=True)
    return u_fn(params, z, t, h, y, train) + zero
  return counted


def _noise(seed=0, num=NUM):
  return (jax.random.normal(jax.random.key(seed), (num, 2)),
          jnp.zeros(num, jnp.int32))


def _max_error(x, noise):
  return float(jnp.max(jnp.abs(x - (MU + S * noise))))


def test_dopri5_reaches_the_exact_map_and_counts_its_evaluations():
  noise, labels = _noise()
  times = []
  solve = jax.jit(lambda noise, labels, tol: samplers.ode_sample(
      counting(velocity_model, times), None, noise, labels, tol, tol))
  nfes = {}
  for tol in (1e-3, 1e-5):
    times.clear()
    x, stats = solve(noise, labels, tol)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert bool(stats["finished"])
    assert int(stats["nfe"]) == len(times) > 0
    # Integrated from noise (t = 1) down to data (t = 0).
    assert times[0] == 1.0 and times[-1] == 0.0
    assert all(0.0 <= t <= 1.0 for t in times)
    nfes[tol] = len(times)
    if tol == 1e-5:
      assert _max_error(x, noise) < 1e-4
    else:
      assert _max_error(x, noise) > 1e-3  # a loose tolerance shows
  assert nfes[1e-5] > nfes[1e-3]


def test_dopri5_stops_with_a_flag_when_steps_run_out():
  noise, labels = _noise()
  _, stats = samplers.ode_sample(velocity_model, None, noise, labels,
                                 rtol=1e-7, atol=1e-7, max_steps=2)
  assert not bool(stats["finished"])


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
  """Doubling the steps divides the error by 2 (Euler) or 4 (Heun)."""
  noise, labels = _noise(1)
  errors = []
  for steps in (16, 32, 64):
    x, stats = samplers.sample(velocity_model, None, noise, labels,
                               f"{method}{steps}", sampler="flow_map")
    assert int(stats["nfe"]) == steps * order
    errors.append(_max_error(x, noise))
  for coarse, fine in zip(errors, errors[1:]):
    assert 0.85 * 2**order < coarse / fine < 1.1 * 2**order, errors


def test_heun_by_hand_and_its_evaluations():
  """dz/dt = z from t = 1 to 0: each Heun step of length d multiplies z by
  1 - d + d^2 / 2, two evaluations a step (the last one too)."""
  times = []
  u_fn = counting(lambda params, z, t, h, y, train: z, times)
  noise = jnp.ones((4, 2))
  x = samplers.heun_sample(u_fn, None, noise, jnp.zeros(4, jnp.int32),
                           samplers.timesteps("1,0.5,0"))
  jax.effects_barrier()
  np.testing.assert_allclose(x, (1 - 0.5 + 0.125) ** 2, rtol=1e-6)
  assert times == [1.0, 0.5, 0.5, 0.0]


def test_solver_entries_ask_for_the_instantaneous_velocity():
  """'euler8' on a flow-map objective queries h = 0 whatever the objective's
  sampler; a plain 8 keeps the flow-map sampler (h = the step, 1/8)."""

  def model(params, z, t, h, y, train):  # u = t + 1000 h: h shows
    return jnp.zeros_like(z) + (t + 1000 * h)[:, None]

  noise, labels = _noise(2, 8)
  x, _ = samplers.sample(model, None, noise, labels, "euler8",
                         sampler="flow_map")
  # Euler: steps of 1/8 at t = 1, 7/8, ..., 1/8 move z by sum(t) / 8.
  np.testing.assert_allclose(x, noise - 4.5 / 8, rtol=1e-6)
  x, _ = samplers.sample(model, None, noise, labels, 8, sampler="flow_map")
  # The flow map adds 1000 * h = 125 over each step of 1/8: 125 in all.
  np.testing.assert_allclose(x, noise - 4.5 / 8 - 125, rtol=1e-6)


def test_schedule_entries_parse_name_and_count():
  assert samplers.parse_schedule("ode") == samplers.Solver("ode")
  assert samplers.parse_schedule("heun8") == samplers.Solver("heun", 8)
  assert samplers.parse_schedule(" euler16") == samplers.Solver("euler", 16)
  names = {spec: samplers.schedule_name(spec)
           for spec in (4, "1,0.6,0", "heun8", "euler16", "ode")}
  assert names == {4: "nfe4", "1,0.6,0": "nfe2[1,0.6,0]", "heun8": "heun8",
                   "euler16": "euler16", "ode": "ode"}
  assert [samplers.fixed_nfe(s) for s in (4, "1,0.6,0", "heun8", "euler16",
                                          "ode")] == [4, 2, 16, 16, None]
  for bad in ("rk4", "ode2", "heun", "euler-2", "", "16"):
    with pytest.raises(ValueError, match="eulerN"):
      samplers.parse_schedule(bad)
  with pytest.raises(ValueError, match="at least 1 step"):
    samplers.parse_schedule("heun0")
  with pytest.raises(ValueError, match="names its own solver"):
    samplers.timesteps("heun8")


def _toy_config(**eval_fields):
  c = config_lib.base_config()
  c.data.name = "checkerboard"
  c.model.num_classes = 0
  c.objective.name = "flow_matching"
  c.eval.update(num_samples=96, batch_size=64, **eval_fields)
  return c


def test_evaluator_keys_and_the_ode_samples_under_a_mesh():
  """Every kind of eval.nfe entry under the evaluator's jit on 8 devices:
  its keys, the adaptive solve's NFE record, and its samples on the exact
  data distribution N(MU, S^2)."""
  c = _toy_config(nfe=(1, "1,0.5,0", "heun2", "euler3", "ode"))
  evaluator = evaluator_lib.Evaluator(c, velocity_model,
                                      sharding.make_mesh(c.mesh), (2,))
  results = evaluator(None, jax.random.key(0))
  assert set(results) == {
      "nfe1/energy_distance", "nfe2[1,0.5,0]/energy_distance",
      "heun2/energy_distance", "euler3/energy_distance",
      "ode/energy_distance", "ode/nfe_used"}
  nfe_used = results["ode/nfe_used"]
  # Two batches of 64 rows; each solve takes 1 + 6 evaluations a step.
  assert nfe_used >= 7 and (nfe_used - 1) % 6 == 0
  samples, _, nfe = evaluator.generate_with_nfe(None, jax.random.key(1), 512,
                                                "ode", "random")
  assert samples.shape == (512, 2) and nfe >= 7
  np.testing.assert_allclose(samples.mean(0), MU, atol=0.08)
  np.testing.assert_allclose(samples.std(0), S, rtol=0.1)


@pytest.mark.parametrize("fields,message", [
    (dict(ode_rtol=0.0), "eval.ode_rtol=0.0 must be a number > 0"),
    (dict(ode_atol=-1e-3), "eval.ode_atol=-0.001 must be a number > 0"),
    (dict(nfe=(1, "ode"), inception="/weights.pth"),
     r"\['ode'\] name a solver"),
])
def test_evaluator_refuses_bad_ode_settings(fields, message):
  c = _toy_config()
  with c.unlocked():
    c.eval.update(fields)
  with pytest.raises(ValueError, match=message):
    evaluator_lib.Evaluator(c, velocity_model, sharding.make_mesh(c.mesh),
                            (2,))


def test_tolerances_are_config_fields():
  fields = config_lib.base_config().eval
  assert isinstance(fields, ml_collections.ConfigDict)
  assert fields.ode_rtol == fields.ode_atol == 1e-5
