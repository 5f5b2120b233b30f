"""The ImageNet paper configs build the paper's models and carry its settings,
and the plan tool compiles a train step for a TPU slice this host lacks."""

import importlib
import os
import sys

import jax
import pytest

from mf_jax import config_lib
from mf_jax import models
from mf_jax.tools import plan

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import digits  # pylint: disable=g-import-not-at-top,wrong-import-position

# config file -> (variant, exact parameter count of the official
# architecture, training-time CFG omega, kappa, t_start, t_end).
PAPER = {
    "imagenet256_b4": ("B/4", 131_165_248, 1.0, 0.5, 0.0, 1.0),
    "imagenet256_b2": ("B/2", 131_091_472, 1.0, 0.5, 0.0, 1.0),
    "imagenet256_m2": ("M/2", 308_019_216, 0.2, 0.92, 0.0, 0.8),
    "imagenet256_l2": ("L/2", 459_137_040, 0.2, 0.92, 0.0, 0.8),
    "imagenet256_xl": ("XL/2", 676_440_592, 0.2, 0.92, 0.0, 0.75),
}


def _paper_config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_builds_the_papers_model(name):
  variant, params, *_ = PAPER[name]
  config = _paper_config(name)
  assert config.model.variant == variant
  model = models.build_model(config.model)
  shapes = models.abstract_params(model, (32, 32, 4))  # eval_shape only
  assert models.param_count(shapes) == params


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_has_the_official_settings(name):
  _, _, omega, kappa, t_start, t_end = PAPER[name]
  c = _paper_config(name)
  assert (c.model.input_size, c.model.in_channels, c.model.num_classes) == (
      32, 4, 1000)
  assert c.model.dtype == "float32"
  assert c.data.name == "imagenet256_latents"
  assert "latents_dir" in c.data
  assert c.training.batch_size == 256
  assert c.training.num_steps == 240 * 5004 == 1_200_960
  assert tuple(c.training.ema_decays) == (0.9999,)
  o = c.optimizer
  assert (o.name, o.lr, o.b1, o.b2, o.weight_decay) == (
      "adamw", 1e-4, 0.9, 0.95, 0.0)
  assert (o.schedule, o.warmup_steps, o.grad_clip_norm) == ("constant", 0, 0)
  obj = c.objective
  assert obj.name == "meanflow"
  assert (obj.time_sampler, obj.time_mean, obj.time_std) == (
      "logit_normal", -0.4, 1.0)
  assert obj.fraction_r_neq_t == 0.25
  assert (obj.adaptive_p, obj.adaptive_eps) == (1.0, 0.01)
  assert obj.class_dropout == 0.1
  assert (obj.guidance_omega, obj.guidance_kappa, obj.guidance_t_start,
          obj.guidance_t_end) == (omega, kappa, t_start, t_end)
  # omega' = omega / (1 - kappa): 2 for B, 2.5 for the larger models.
  assert obj.guidance_omega / (1 - obj.guidance_kappa) == pytest.approx(
      2.0 if variant_is_base(c) else 2.5)


def variant_is_base(config):
  return config.model.variant.startswith("B/")


def test_xl_epochs_argument_gives_the_xl_plus_run():
  xl = importlib.import_module("configs.imagenet256_xl")
  assert xl.get_config("epochs=1000").training.num_steps == 1000 * 5004
  assert (config_lib.imagenet256_config("B/4", 1.0, 0.5, 0.0, 1.0)
          == _paper_config("imagenet256_b4"))


def _small_fsdp_config():
  """A DiT on 8x8 digits wide enough (512) that FSDP shards its matrices."""
  config = digits.get_config()
  config.model.update(hidden_size=512, depth=1, num_heads=4)
  config.training.batch_size = 16
  return config


def test_plan_on_a_tpu_topology_shards_the_state_with_fsdp():
  pytest.importorskip("libtpu")
  config = _small_fsdp_config()
  data_parallel = plan.plan_topology(config, "v5e:2x2")
  config.mesh.update(data=1, fsdp=-1)
  fsdp = plan.plan_topology(config, "v5e:2x2")
  for report in (data_parallel, fsdp):
    assert report["device_kind"] == "TPU v5 lite"
    assert report["devices"] == 4
    assert report["hbm_bytes"] == 16 * 2**30
    assert report["fits"]
    assert report["train_step_flops"] > 0
    assert report["train_step_total_bytes"] == (
        report["train_step_argument_bytes"] + report["train_step_output_bytes"]
        - report["train_step_alias_bytes"] + report["train_step_temp_bytes"])
  assert fsdp["mesh"] == {"data": 1, "fsdp": 4}
  # The state (params, 2 Adam moments, EMA: 4 x 4 bytes per parameter) is
  # replicated under data parallelism and mostly split 4 ways under FSDP.
  state_bytes = 16 * data_parallel["params"]
  assert data_parallel["train_step_argument_bytes"] > state_bytes
  assert fsdp["train_step_argument_bytes"] < 0.4 * state_bytes


def test_device_hbm_is_the_chips_share_per_jax_device():
  pytest.importorskip("libtpu")
  v4 = plan.tpu_devices("v4:2x2x2")  # megacore: one device per chip
  assert len(v4) == 8
  assert plan.device_hbm_bytes("v4:2x2x2", v4) == 32 * 2**30
  v5p = plan.tpu_devices("v5p:2x2x2")
  assert len(v5p) == 8
  assert plan.device_hbm_bytes("v5p:2x2x2", v5p) == 95 * 2**30


def test_plan_cpu_path_reports_fit_against_a_given_hbm():
  """The same report on this host's (fake CPU) devices, without libtpu."""
  config = _small_fsdp_config()
  config.mesh.update(data=1, fsdp=-1)
  report = plan.plan(config, devices=jax.devices()[:4], hbm_bytes=2**32)
  assert report["mesh"] == {"data": 1, "fsdp": 4}
  assert report["devices"] == 4
  assert report["fits"]
  assert report["hbm_fraction"] == round(
      report["train_step_total_bytes"] / 2**32, 3) > 0
  assert report["train_step_argument_bytes"] < 0.4 * 16 * report["params"]
