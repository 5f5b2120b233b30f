r"""Unconditional MeanFlow on CIFAR-10 with EDM's U-Net: the paper's recipe.

The official PyTorch setting (py-meanflow `cifar10_v0.sh`, the paper's
1-NFE FID 2.92): DDPM++ "SongUNet" (55,932,419 parameters: 128 channels,
multipliers [2, 2, 2], 4 blocks per resolution, attention at 16x16,
dropout 0.2, 6 augmentation labels), EDM augmentation at p = 0.12 plus
random horizontal flips, (t, r) both logit-normal(-2, 2) with t = max,
r = min and 75 % of samples with r != t, adaptive weight p = 0.75 with
eps = 1e-3, Adam (0.9, 0.999) at lr 6e-4 after a linear warmup of 200
epochs, batch 1024, 16,000 epochs.

Epochs in steps: the official loader drops the last partial batch of each
of its 8 ranks (6,250 images each at 128 per rank), so an epoch is 48 steps:
warmup 200 x 48 = 9,600 steps and 16,000 x 48 = 768,000 steps in all.

EMA: the official code keeps decays 0.9999, 0.99995 and 0.9996, updated
every 16 steps with decay^16; here each is updated every step with the
decay itself, the same average. Its released checkpoint is the 0.99995 EMA,
which evaluation uses here.

Data and evaluation: CIFAR-10 is read from TFDS (`tfds build cifar10
--data_dir=DIR --file_format=array_record` once). FID-50K follows the
official protocol, 50,000 1-NFE samples against the statistics of the
50,000 training images, computed once with the Inception weights (a local
file: pytorch-fid's or torch-fidelity's) and py-meanflow's protocol
(eval.fid_protocol='torchmetrics': torchmetrics' FID as py-meanflow calls
it):

  python -m mf_jax.tools.fid --compute_ref_from=tfds:cifar10 --tfds_data_dir=DIR \
      --inception=INCEPTION --ref_stats=cifar10_train_stats.npz \
      --fid_protocol=torchmetrics
  python -m mf_jax.main --config=configs/cifar10_unet.py --workdir=RUN \
      --config.data.tfds_data_dir=DIR --config.eval.inception=INCEPTION \
      --config.eval.ref_stats=cifar10_train_stats.npz

Every eval then writes nfe1/fid, nfe2/fid and Inception Scores into
RUN/eval/<step>.json (without the two files, evals are empty and the
sample grids show progress; `mf_jax.tools.fid` scores any checkpoint later).

Not here: the official `v1` time sampler (t ~ LN(-0.6, 1.6) and r ~
LN(-4, 1.6) drawn separately), which needs a second time distribution.
"""

from mf_jax import config_lib

STEPS_PER_EPOCH = 48  # 50,000 images, 8 ranks x 128, last batch dropped


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.update(config_lib.cifar10_unet_model(dropout=0.2, augment_dim=6))
  c.objective.update(
      name="meanflow", time_sampler="logit_normal", time_mean=-2.0,
      time_std=2.0, fraction_r_neq_t=0.75, adaptive_p=0.75,
      adaptive_eps=1e-3, class_dropout=0.0)
  c.optimizer.update(name="adam", lr=6e-4, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=0.0, schedule="constant",
                     warmup_steps=200 * STEPS_PER_EPOCH)
  c.training.update(num_steps=16_000 * STEPS_PER_EPOCH, batch_size=1024,
                    log_every_steps=100, ema_decays=(0.9999, 0.99995, 0.9996))
  c.data.update(name="cifar10", augment_p=0.12)
  c.checkpoint.every_steps = 50 * STEPS_PER_EPOCH
  c.eval.update(every_steps=500 * STEPS_PER_EPOCH, nfe=(1, 2),
                num_samples=50_000, batch_size=1024, ema_decay=0.99995,
                labels="random", fid_protocol="torchmetrics")
  c.sample.update(every_steps=50 * STEPS_PER_EPOCH, grid_size=10, nfe=1)
  return c
