"""The ImageNet paper configs build the paper's models and carry its settings,
the plan tool compiles a train step for a TPU slice this host lacks, and
values out of range fail up front in one line."""

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from mf_jax import config_lib
from mf_jax import models
from mf_jax import preflight
from mf_jax.tools import plan
from mf_jax.training import state as state_lib
from mf_jax.training import trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import digits  # pylint: disable=g-import-not-at-top,wrong-import-position

# Sources, abbreviated below (line numbers: ../shared/research/
# official_meanflow.md, which read these files):
#   default.py  official MeanFlow JAX configs/default.py
#   run_b4.yml  official MeanFlow JAX configs/run_b4.yml
#   train.py    official MeanFlow JAX train.py
#   README      official MeanFlow JAX README ("Performance")
#   alphaflow   snap-research/alphaflow's MeanFlow configs (third party)
#   T1a..T1f    the paper's ablation tables (Table 1), T2 its ImageNet table
#   count       jax.eval_shape of the official MeanFlow module (models_dit.py)

# config file -> variant, exact parameter count (count), training-time CFG
# (omega, kappa, t_start, t_end) and the paper's 1-NFE FID (T2, 240 epochs).
# B/4: CFG default.py:61-67 (README: Table 5); the paper's table has no
# 240-epoch B/4 row (the released checkpoint's 11.35 is README's). B/2, L/2,
# XL/2: CFG alphaflow. M/2: no source gives its CFG (None: not checked).
PAPER = {
    "imagenet256_b4": ("B/4", 131_165_248, (1.0, 0.5, 0.0, 1.0), None),
    "imagenet256_b2": ("B/2", 131_091_472, (1.0, 0.5, 0.0, 1.0), 6.17),
    "imagenet256_m2": ("M/2", 308_019_216, None, 5.01),
    "imagenet256_l2": ("L/2", 459_137_040, (0.2, 0.92, 0.0, 0.8), 3.84),
    "imagenet256_xl": ("XL/2", 676_440_592, (0.2, 0.92, 0.0, 0.75), 3.43),
}

# The setting every ImageNet run shares: config field -> (value, source).
OFFICIAL = {
    "model.input_size": (32, "default.py: 32x32x4 SD-VAE latents"),
    "model.in_channels": (4, "default.py: 32x32x4 SD-VAE latents"),
    "model.num_classes": (1000, "ImageNet; null class 1000, models_dit.py:84"),
    "model.time_inputs": ("t,h", "meanflow.py:163-165, T1c (t, t-r) best"),
    "model.dtype": ("float32", "fp32 everywhere, half_precision unused"),
    "data.name": ("imagenet256_latents", "trains on VAE latents made by "
                                         "prepare_dataset.py"),
    "training.batch_size": (256, "default.py:33, run_b4.yml"),
    "training.num_steps": (1_200_960, "run_b4.yml:11 240 epochs x 5004; "
                                      "released checkpoint_1200960"),
    "training.ema_decays": ((0.9999,), "ema_util.py, train.py:69-70"),
    "optimizer.name": ("adamw", "train.py:72-76"),
    "optimizer.lr": (1e-4, "default.py:32"),
    "optimizer.b1": (0.9, "train.py:72-76, optax default"),
    "optimizer.b2": (0.95, "train.py:72-76"),
    "optimizer.eps": (1e-8, "train.py:72-76, optax default"),
    "optimizer.weight_decay": (0.0, "train.py:72-76"),
    "optimizer.schedule": ("constant", "train.py:237, no warmup"),
    "optimizer.warmup_steps": (0, "train.py:237, no warmup"),
    "optimizer.grad_clip_norm": (0.0, "train.py: no clipping"),
    "objective.name": ("meanflow", "meanflow.py"),
    "objective.time_sampler": ("logit_normal", "default.py:52-54, T1d"),
    "objective.time_mean": (-0.4, "default.py:52-54, T1d lognorm(-0.4, 1.0)"),
    "objective.time_std": (1.0, "default.py:52-54, T1d lognorm(-0.4, 1.0)"),
    "objective.fraction_r_neq_t": (0.25, "default.py data_proportion 0.75, "
                                         "T1a 25 %"),
    "objective.jvp_tangent": ("v,0,1", "T1b (v, 0, 1); meanflow.py:231"),
    "objective.adaptive_p": (1.0, "default.py:70-71, T1e p = 1.0"),
    "objective.adaptive_eps": (0.01, "default.py:70-71"),
    "objective.class_dropout": (0.1, "default.py:58"),
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
  c = _paper_config(name)
  wrong = {}
  for field, (value, source) in OFFICIAL.items():
    section, key = field.split(".")
    got = c[section][key]
    if (tuple(got) if isinstance(got, (list, tuple)) else got) != value:
      wrong[field] = (got, value, source)
  assert not wrong, f"{name}: field: (config, official, source) {wrong}"
  _, _, cfg, fid = PAPER[name]
  obj = c.objective
  if cfg is not None:
    assert (obj.guidance_omega, obj.guidance_kappa, obj.guidance_t_start,
            obj.guidance_t_end) == cfg
    # README: the effective scale omega / (1 - kappa) is 2 for B, 2.5 for
    # the larger models.
    assert obj.guidance_omega / (1 - obj.guidance_kappa) == pytest.approx(
        2.0 if name.startswith("imagenet256_b") else 2.5)
  doc = importlib.import_module(f"configs.{name}").__doc__
  if fid is not None:  # what the docstring quotes is the paper's figure
    assert f"1-NFE FID {fid}" in doc
  # The official runs never flip (vae_util.py:116-119 ignores use_flip):
  # a config that flips must say how to reproduce them.
  if c.data.random_flip:
    assert "--config.data.random_flip=False" in doc


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


CONFIG_FILES = sorted(name[:-3] for name in os.listdir(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 "configs")) if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_configs_pass_validation(name):
  preflight.validate_config(_paper_config(name))


# field, a value out of range, what the message says is valid.
OUT_OF_RANGE = [
    ("training.batch_size", 0, ">= 1"),
    ("training.num_steps", 0, ">= 1"),
    ("training.log_every_steps", -1, ">= 0"),
    ("training.on_nonfinite", "ignore", "one of ('stop', 'skip')"),
    ("objective.guidance_passes", "fused", "one of ('separate', 'batched')"),
    ("training.ema_decays", (0.999, 1.0), "decays in [0, 1)"),
    ("training.ema_decays", (-0.5,), "decays in [0, 1)"),
    ("eval.every_steps", -5, ">= 0"),
    ("eval.num_samples", 0, ">= 1 when eval.every_steps > 0"),
    ("eval.batch_size", 0, ">= 1"),
    ("eval.ema_decay", 0.5, "one of training.ema_decays=(0.999,)"),
    ("sample.every_steps", -1, ">= 0"),
    ("sample.grid_size", 0, ">= 1"),
    ("checkpoint.max_to_keep", 0, ">= 1"),
    ("checkpoint.every_steps", -1, ">= 0"),
    ("checkpoint.every_secs", -60.0, ">= 0"),
    ("checkpoint.first_step", -1, ">= 0"),
    ("profile.start_step", -1, ">= 0"),
    ("profile.num_steps", -2, ">= 0"),
]


@pytest.mark.parametrize("field,value,valid", OUT_OF_RANGE)
def test_out_of_range_field_is_one_line_naming_it(field, value, valid):
  config = digits.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError) as error:
    preflight.validate_config(config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"Invalid config: {field}={value!r} (must be ")
  assert valid in message


def test_every_problem_is_listed_and_conditions_hold():
  config = digits.get_config()
  config.training.batch_size = 0
  config.checkpoint.max_to_keep = 0
  with pytest.raises(ValueError, match=r"training\.batch_size=0 .*; "
                     r"checkpoint\.max_to_keep=0 "):
    preflight.validate_config(config)
  # No evaluation and no FID: eval.num_samples is not used, so 0 is fine;
  # FID configured makes it needed again.
  config = digits.get_config()
  config.eval.update(every_steps=0, num_samples=0)
  preflight.validate_config(config)
  config.eval.inception = "pt_inception.pth"
  with pytest.raises(ValueError, match="eval.num_samples=0"):
    preflight.validate_config(config)
  # eval.ema_decay: 0 (online) and < 0 (the first EMA) need no match; the
  # first EMA needs one to exist.
  config = digits.get_config()
  for decay in (0.0, -1.0, 0.999):
    config.eval.ema_decay = decay
    preflight.validate_config(config)
  config.eval.ema_decay = -1.0
  config.training.ema_decays = ()
  with pytest.raises(ValueError, match="training.ema_decays is empty"):
    preflight.validate_config(config)


class _OneVectorModel:
  def init(self, rng, z, t, h, y):
    del rng, z, t, h, y
    return {"params": {"w": jnp.zeros((3,))}}


def test_ema_keys_never_collide_and_existing_keys_stay():
  """'%g' mapped 0.9999995 (and 0.99999951) to '1': two EMAs shared a key,
  one replaced the other in the state, and eval.ema_decay found the wrong
  one. The keys of existing checkpoints (the common decays) stay."""
  for decay, key in ((0.9999, "0.9999"), (0.99995, "0.99995"),
                     (0.9996, "0.9996"), (0.999, "0.999"), (0.99, "0.99"),
                     (0.0, "0"), (1e-5, "1e-05")):
    assert state_lib.ema_key(decay) == key
  decays = (0.9999995, 0.99999951, 0.999999, 0.123456789, 0.1234567891)
  keys = [state_lib.ema_key(d) for d in decays]
  assert [float(k) for k in keys] == list(decays)  # exact, hence distinct
  state = state_lib.init_state(jax.random.key(0), _OneVectorModel(),
                               optax.sgd(0.1), (2,), decays)
  assert sorted(state.ema_params) == sorted(keys)
  config = digits.get_config()
  config.training.ema_decays = (0.999, 0.99999951)
  config.eval.ema_decay = 0.9999995
  with pytest.raises(ValueError, match="eval.ema_decay=0.9999995"):
    preflight.validate_config(config)
  config.training.ema_decays = (0.999, 0.9999995)
  preflight.validate_config(config)


def test_a_saved_config_without_newer_fields_still_validates():
  """A run's config.json from before a field existed (the export tool
  rebuilds runs from it) is not rejected for what it lacks."""
  config = config_lib.base_config().to_dict()
  del config["profile"]
  del config["training"]["on_nonfinite"]
  del config["checkpoint"]["every_secs"]
  preflight.validate_config(ml_collections.ConfigDict(config))


def test_batch_size_zero_fails_in_the_experiment_before_the_mesh():
  """It used to pass the divisibility check (0 % 8 == 0) and die in a
  reshape of the first batch."""
  config = digits.get_config()
  config.training.batch_size = 0
  with pytest.raises(ValueError, match=r"training\.batch_size=0 \(must be "
                     r">= 1\)"):
    trainer.Experiment(config, "/nonexistent/workdir")
