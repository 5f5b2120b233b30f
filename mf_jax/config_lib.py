"""Shared pieces of the ml_collections configs in `configs/`.

Every config file calls `base_config()` and then sets what its experiment
changes, so the field names (the command-line interface) are defined once.
`parse_arg` turns the `--config=FILE:key=value,...` suffix into a dict.
"""

import ml_collections

from mf_jax import objectives
from mf_jax import samplers


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
      guidance_passes="separate",  # kappa > 0: v_u, v_c in 2 passes or 1
      # Distillation: a frozen exported network (mf_jax.export safetensors)
      # and the CFG scale it is queried with (1: unguided).
      teacher="",
      teacher_cfg_scale=1.0,
  ))
  # The other methods' own knobs (shortcut_*, alpha_*, ...), declared with
  # the paper's or official code's defaults by each objective's module.
  for fields in objectives.method_defaults():
    c.objective.update(fields)

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      warmup_steps=0, schedule="constant", grad_clip_norm=0.0))

  # on_nonfinite: "stop" (raise at the next log step or before the state is
  # saved, sampled or evaluated, naming the first step whose loss or checked
  # parameters are not finite, and the quantity) or "skip" (check every
  # step, ~2 % slower; drop a bad step's update and count it in the metrics
  # as `skipped_steps`). donate_state: "auto"
  # (accelerators reuse the state's memory in place; not on CPU, where it
  # costs time), "always" or "never".
  c.training = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=256, seed=0, log_every_steps=100,
      ema_decays=(0.9999,), on_nonfinite="stop", donate_state="auto"))

  # augment_p: EDM augmentation probability (data/augment.py); > 0 needs a
  # model with augment_dim = 6 (the U-Net), which is told the parameters.
  # vae: the diffusers SD-VAE weights (a local file) the latents were made
  # with; latent runs need it to decode samples for grids and FID.
  # random_flip (ImageNet latents): read a random one of the plain and the
  # mirrored crop's latents; False reads the plain one only, as the official
  # MeanFlow runs (no flips). TFDS images are always flipped, digits never.
  # pairs_dir: a teacher's (noise, sample) pairs (tools/make_pairs.py) to
  # train on instead of data.name's examples (reflow); data.name still
  # names what evaluation compares samples with.
  c.data = ml_collections.ConfigDict(dict(
      name="digits", tfds_data_dir="", latents_dir="", vae="",
      shuffle_seed=0, augment_p=0.0, random_flip=True, pairs_dir=""))

  # Mesh axis sizes; -1 takes the remaining devices. Parameters (and their
  # optimizer moments and EMA copies) with at least fsdp_min_size elements
  # are split over 'fsdp'; num_devices > 0 uses only the first devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=-1,
                                          fsdp_min_size=2**18))

  # Saves every `every_steps` steps and also once `every_secs` seconds have
  # passed since the last save (0: off); `first_step` > 0 saves once early,
  # so a set-up that cannot write checkpoints fails in minutes, not hours.
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, every_secs=0.0, first_step=0, max_to_keep=3,
      async_save=True))

  # ema_decay < 0: the first EMA. inception (pytorch-fid's weights) and
  # ref_stats (an npz of mu/sigma, or of images) add FID and Inception Score
  # of eval.num_samples samples at each eval.nfe to image runs' evaluations;
  # fid_protocol is how images reach the Inception network (adm, pytorch_fid,
  # torchmetrics or torchmetrics_antialias: see evaluation/inception.py),
  # labels how samples are labelled ('balanced' or 'random').
  # errors_fatal=False: a failing grid or evaluation is logged with its
  # traceback and training goes on (its checkpoint is already saved).
  # nfe entries: step counts and explicit times run the objective's sampler;
  # 'eulerN', 'heunN' and 'ode' integrate the instantaneous velocity (h = 0),
  # 'ode' adaptively (Dopri5) to ode_rtol/ode_atol, adding 'ode/nfe_used'.
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=1000, nfe=(1, 2), num_samples=1000, batch_size=500,
      ema_decay=-1.0, labels="balanced", inception="", ref_stats="",
      fid_protocol="pytorch_fid", errors_fatal=False,
      ode_rtol=samplers.ODE_RTOL, ode_atol=samplers.ODE_ATOL))

  # timesteps: an explicit schedule for the grids, e.g. "1,0.6,0" (2 steps);
  # eval.nfe entries may be such strings too (samplers.parse_schedule).
  c.sample = ml_collections.ConfigDict(dict(
      every_steps=1000, grid_size=10, nfe=1, timesteps=""))

  # A profiler trace of steps [start_step, start_step + num_steps) in
  # WORKDIR/profile (process 0; num_steps = 0: off).
  c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
  return c


# ImageNet 256 (1,281,167 images) at batch 256 with the last partial batch
# dropped: the official runs' epoch, e.g. 240 epochs = 1,200,960 steps.
IMAGENET256_STEPS_PER_EPOCH = 5004


def imagenet256_config(variant: str, omega: float, kappa: float,
                       t_start: float, t_end: float,
                       epochs: int = 240) -> ml_collections.ConfigDict:
  """The official MeanFlow ImageNet 256 setting for one DiT size.

  Everything but the model size and the training-time CFG is shared by the
  paper's B/4 ... XL/2 runs (base_config's defaults are those values):
  SD-VAE latents 32x32x4, batch 256, AdamW lr 1e-4 constant with b2 0.95,
  EMA 0.9999, fp32. The configs/imagenet256_*.py files differ only in the
  arguments here, so a change to the shared setting lands in all of them.
  """
  c = base_config()
  c.model.update(name="dit", variant=variant, input_size=32, in_channels=4,
                 num_classes=1000)
  c.objective.update(name="meanflow", guidance_omega=omega,
                     guidance_kappa=kappa, guidance_t_start=t_start,
                     guidance_t_end=t_end)
  c.data.name = "imagenet256_latents"
  steps = IMAGENET256_STEPS_PER_EPOCH
  c.training.update(num_steps=epochs * steps, batch_size=256,
                    log_every_steps=100)
  c.checkpoint.update(every_steps=steps, every_secs=3600.0, first_step=100)
  c.eval.update(every_steps=10 * steps, nfe=(1, 2), num_samples=50_000,
                batch_size=256, labels="balanced", fid_protocol="adm")
  c.sample.update(every_steps=steps, grid_size=8, nfe=1)
  return c


def cifar10_unet_model(dropout: float, augment_dim: int = 0) -> dict:
  """model fields of the ~56M-parameter DDPM++ U-Net that every CIFAR-10 config
  trains (MeanFlow's, iCT's, sCT's: py-meanflow's and EDM's layout); the
  papers differ only in dropout and EDM augmentation."""
  return dict(
      name="unet", variant="", input_size=32, in_channels=3, num_classes=0,
      model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
      channel_mult_noise=2, num_blocks=4, attn_resolutions=(16,),
      resample_filter=(1, 3, 3, 1), dropout=dropout, augment_dim=augment_dim)


def cifar10_consistency_schedule(c, two_step: str, ema_decay: float):
  """Data, checkpoints, FID evaluation and grids of the consistency
  models' CIFAR-10 configs (iCT, sCT): 1 NFE and their 2-step schedule."""
  c.data.update(name="cifar10", augment_p=0.0)
  c.checkpoint.update(every_steps=2_500, every_secs=3600.0, first_step=100)
  c.eval.update(every_steps=25_000, nfe=(1, two_step), num_samples=50_000,
                batch_size=1024, ema_decay=ema_decay, labels="random",
                fid_protocol="pytorch_fid")
  c.sample.update(every_steps=2_500, grid_size=10, nfe=1)


def digits_config(objective: str, fraction_r_neq_t: float
                  ) -> ml_collections.ConfigDict:
  """Class-conditional 8x8 digits in about 10 minutes on a 2-core CPU: the
  schedule configs/digits.py (DiT) and digits_unet.py (U-Net) share; the
  caller adds the backbone's fields."""
  c = base_config()
  c.model.update(input_size=8, in_channels=1, num_classes=10)
  c.objective.update(name=objective, fraction_r_neq_t=fraction_r_neq_t)
  if objective == "flow_matching":
    c.objective.adaptive_p = 0.0
  c.data.name = "digits"
  c.optimizer.update(lr=1e-3, b2=0.99, warmup_steps=200)
  c.training.update(num_steps=6000, batch_size=128, log_every_steps=200,
                    ema_decays=(0.999,))
  c.checkpoint.every_steps = 1000
  c.eval.update(every_steps=2000, nfe=(1, 2), num_samples=1000,
                batch_size=500)
  c.sample.update(every_steps=2000, nfe=1)
  return c
