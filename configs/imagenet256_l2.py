r"""MF-L/2 on ImageNet 256 latents (459M parameters: depth 24, width 1024).

The official ImageNet setting (`config_lib.imagenet256_config`) with
training-time CFG omega = 0.2, kappa = 0.92 on t in [0, 0.8] (effective
scale omega / (1 - kappa) = 2.5), 240 epochs: 1-NFE FID 3.84 in the paper.

Flips: data.random_flip=True (our default) reads the mirrored crop's
latents half the time; the official runs never flip, so add
--config.data.random_flip=False to reproduce the paper's training data.

  python -m mf_jax.main --config=configs/imagenet256_l2.py --workdir=DIR \
      --config.data.latents_dir=LATENTS
"""

from mf_jax import config_lib


def get_config(arg=None):
  del arg
  return config_lib.imagenet256_config("L/2", omega=0.2, kappa=0.92,
                                       t_start=0.0, t_end=0.8)
