r"""A small ImageNet 256 latent trial that runs end to end on one CPU host.

The official latent path (configs/imagenet256_*.py) shrunk to minutes: a
few thousand images, a small DiT (S/4 by default, 33M parameters), batch 32,
a few hundred steps. It checks the whole chain (crop, VAE encode, latent
shards, MeanFlow with training-time CFG, sampling, VAE decode, FID) before
a pod is rented; its FID is of course far from the paper's.

  # 1. 5,000 evenly spaced images -> SD-VAE latent shards (local weights)
  python -m mf_jax.tools.prepare_latents --vae=sd-vae-ft-mse/ \
      --source=/data/imagenet/train --output=/tmp/in_trial --limit=5000 --batch=32
  # 2. train (--config.data.vae decodes the sample grids)
  python -m mf_jax.main --config=configs/imagenet256_trial.py --workdir=/tmp/trial \
      --config.data.latents_dir=/tmp/in_trial --config.data.vae=sd-vae-ft-mse/
  # 3. FID and IS on a few hundred samples against ADM's reference statistics
  python -m mf_jax.tools.fid --config=configs/imagenet256_trial.py --workdir=/tmp/trial \
      --inception=pt_inception-2015-12-05-6726825d.pth \
      --ref_stats=VIRTUAL_imagenet256_labeled.npz --vae=sd-vae-ft-mse/ \
      --num_samples=512 --batch_size=64

Argument keys: variant (a DiT size, e.g. S/4 or B/4), num_steps.
"""

from mf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/4", num_steps=400)
  # B/4's training-time CFG; everything else is the official setting, but
  # for the batch, the step count and a faster EMA.
  c = config_lib.imagenet256_config(arg.variant, omega=1.0, kappa=0.5,
                                    t_start=0.0, t_end=1.0)
  c.training.update(num_steps=arg.num_steps, batch_size=32,
                    log_every_steps=20, ema_decays=(0.99,))
  c.checkpoint.every_steps = 100
  c.eval.update(every_steps=0, num_samples=512, batch_size=64)
  c.sample.update(every_steps=200, grid_size=4)
  return c
