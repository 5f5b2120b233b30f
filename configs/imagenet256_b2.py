r"""MF-B/2 on ImageNet 256 latents (131M parameters, 256 tokens).

The official ImageNet setting (`config_lib.imagenet256_config`) with
training-time CFG omega = 1.0, kappa = 0.5 on [0, 1] (effective scale 2),
240 epochs: 1-NFE FID 6.17 in the paper.

Flips: data.random_flip=True (our default) reads the mirrored crop's
latents half the time; the official runs never flip, so add
--config.data.random_flip=False to reproduce the paper's training data.

  python -m mf_jax.main --config=configs/imagenet256_b2.py --workdir=DIR \
      --config.data.latents_dir=LATENTS
"""

from mf_jax import config_lib


def get_config(arg=None):
  del arg
  return config_lib.imagenet256_config("B/2", omega=1.0, kappa=0.5,
                                       t_start=0.0, t_end=1.0)
