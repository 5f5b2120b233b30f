"""plan and bench: the compiled step's cost, MeanFlow's overhead bounded."""

import os
import sys

import jax

from mf_jax import models
from mf_jax.tools import bench
from mf_jax.tools import plan
from mf_jax.training import throughput
from mf_jax.training import trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import digits  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_meanflow_costs_one_jvp_and_one_forward_per_guidance_velocity():
  """FLOPs of the compiled step relative to flow matching on the same DiT.

  Forward + JVP + backward is ~4 forward passes against flow matching's 3;
  guidance adds one forward pass (kappa = 0) or two in one batched call
  (kappa > 0), and nothing else. On one device: on eight, each device's
  count holds 1/8 of the network's FLOPs but all of the replicated
  per-parameter work (optimizer, EMA, finite checks), which dilutes the
  ratio of a network this small.
  """
  config = digits.get_config()
  config.mesh.num_devices = 1
  config.model.depth = 2  # compiles in half the time; the ratios hold
  flops = {}
  for name, c in bench.variants(config).items():  # compiled, not timed
    exp = trainer.Experiment(c, workdir="")
    flops[name] = throughput.compiled_flops(
        exp.lower_train_step(batch_size=16).compile())
  ratio = {name: flops[name] / flops["flow_matching"]
           for name in ("meanflow", "meanflow_cfg0", "meanflow_cfg")}
  assert 1.2 < ratio["meanflow"] <= 1.35, ratio
  assert ratio["meanflow"] < ratio["meanflow_cfg0"] <= 1.68, ratio
  assert ratio["meanflow_cfg0"] < ratio["meanflow_cfg"] <= 2.02, ratio


def test_plan_reports_params_flops_and_memory():
  config = digits.get_config()
  report = plan.plan(config)
  model = models.build_model(config.model)
  expected = models.param_count(models.abstract_params(model, (8, 8, 1)))
  # The train state holds params, Adam moments and one EMA copy.
  assert report["params"] == expected
  assert report["train_step_flops"] > 0
  assert report["train_step_temp_bytes"] > 0
  assert report["devices"] == jax.device_count()
