r"""MF-XL/2 on ImageNet 256 latents: the paper's headline model (676M).

The official ImageNet setting (`config_lib.imagenet256_config`) with
training-time CFG omega = 0.2, kappa = 0.92 on t in [0, 0.75] (effective
scale 2.5), 240 epochs (1,200,960 steps at batch 256): 1-NFE FID 3.43 and
2-NFE 2.93 in the paper. `epochs=1000` is the paper's XL/2+ run.

Memory: the fp32 train state (params, two Adam moments, one EMA copy) is
about 10.8 GB before activations, so small-HBM chips need FSDP; see the
README's "Which TPU slice fits XL/2" and `python -m mf_jax.tools.plan`.

Flips: data.random_flip=True (our default) reads the mirrored crop's
latents half the time; the official runs never flip, so add
--config.data.random_flip=False to reproduce the paper's training data.

  python -m mf_jax.main --config=configs/imagenet256_xl.py --workdir=DIR \
      --config.data.latents_dir=LATENTS [--config.mesh.data=1 --config.mesh.fsdp=-1]

Argument keys: epochs (default 240).
"""

from mf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, epochs=240)
  return config_lib.imagenet256_config("XL/2", omega=0.2, kappa=0.92,
                                       t_start=0.0, t_end=0.75,
                                       epochs=arg.epochs)
