"""Shared pieces of the ml_collections configs in `configs/`.

Every config file calls `base_config()` and then sets what its experiment
changes, so the field names (the command-line interface) are defined once.
`parse_arg` turns the `--config=FILE:key=value,...` suffix into a dict.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' into a ConfigDict typed like `defaults`.

  Unknown keys are an error, so a typo in the config argument fails at once.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Config argument {item!r} is not key=value.")
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    elif default is not None:
      parsed[key] = type(default)(value)
    else:
      parsed[key] = value
  return ml_collections.ConfigDict(parsed)


def base_config() -> ml_collections.ConfigDict:
  """All fields every training config has, with the MeanFlow paper defaults."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      name="dit", variant="B/4", input_size=32, in_channels=4,
      num_classes=1000, time_inputs="t,h", mlp_ratio=4.0, remat=False,
      dtype="float32"))

  # The objective: MeanFlow defaults follow the paper and official code.
  c.objective = ml_collections.ConfigDict(dict(
      name="meanflow",
      time_sampler="logit_normal",  # or "uniform"
      time_mean=-0.4,
      time_std=1.0,
      fraction_r_neq_t=0.25,  # share of samples with r != t (random mask)
      jvp_tangent="v,0,1",  # tangents of (z, r, t); the paper's ablation
      adaptive_p=1.0,  # loss weight 1 / sg(||delta||^2 + eps)^p
      adaptive_eps=0.01,
      class_dropout=0.1,  # labels replaced by the null class
      guidance_omega=1.0,  # training-time CFG: v_g = w v + (1-w-k) v_u + k v_c
      guidance_kappa=0.0,
      guidance_t_start=0.0,
      guidance_t_end=1.0,
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      warmup_steps=0, schedule="constant", grad_clip_norm=0.0))

  c.training = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=256, seed=0, log_every_steps=100,
      ema_decays=(0.9999,)))

  c.data = ml_collections.ConfigDict(dict(
      name="digits", tfds_data_dir="", shuffle_seed=0))

  # Mesh axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, async_save=True))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=1000, nfe=(1, 2), num_samples=1000, batch_size=500,
      ema_decay=-1.0, labels="balanced"))  # ema_decay < 0: first EMA

  c.sample = ml_collections.ConfigDict(dict(
      every_steps=1000, grid_size=10, nfe=1))
  return c
