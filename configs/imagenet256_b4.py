r"""MF-B/4 on ImageNet 256 latents: the official MeanFlow B/4 setting.

Latents 32x32x4 (SD-VAE-ft-MSE, x0.18215), batch 256, AdamW lr 1e-4
constant (b2 0.95), EMA 0.9999, (t, r) logit-normal(-0.4, 1.0), 25 % of
samples with r != t, adaptive weight p = 1 with eps = 0.01, class dropout
0.1, training-time CFG omega = 1.0, kappa = 0.5 on [0, 1] (effective scale 2).
240 epochs at 5004 steps each gave 1-NFE FID 11.4 in the paper.

  python -m mf_jax.main --config=configs/imagenet256_b4.py --workdir=DIR
"""

from mf_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.update(name="dit", variant="B/4", input_size=32, in_channels=4,
                 num_classes=1000)
  c.objective.update(name="meanflow", guidance_omega=1.0, guidance_kappa=0.5,
                     guidance_t_start=0.0, guidance_t_end=1.0)
  c.data.name = "imagenet256_latents"
  c.training.update(num_steps=240 * 5004, batch_size=256, log_every_steps=100)
  c.checkpoint.every_steps = 5004
  c.eval.update(every_steps=50_040, nfe=(1, 2), num_samples=50_000,
                batch_size=256, labels="balanced")
  c.sample.update(every_steps=5004, grid_size=8, nfe=1)
  return c
