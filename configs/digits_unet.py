r"""Class-conditional MeanFlow on the 8x8 digits with a small EDM U-Net.

The CIFAR-10 network (configs/cifar10_unet.py) scaled down to run on a
2-core CPU: 32 channels, multipliers [1, 2] (8x8 and 4x4), one block per
resolution, attention at 4x4, embedding 128. Evaluation is the digits one
of configs/digits.py: WORKDIR/eval/<step>.json holds the Fréchet distance in
the digits classifier's features (nfe1/fd_digits) and its agreement with
the conditioning labels.

  python -m mf_jax.main --config=configs/digits_unet.py --workdir=/tmp/du

Argument keys: objective (meanflow | flow_matching), fraction_r_neq_t,
dropout, augment_p (> 0 turns on EDM augmentation and its 6 labels; flips
change digits, but the model is told about them).
"""

from mf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="meanflow", fraction_r_neq_t=0.25,
                             dropout=0.0, augment_p=0.0)
  c = config_lib.digits_config(arg.objective, arg.fraction_r_neq_t)
  c.model.update(
      name="unet", variant="", model_channels=32, channel_mult=(1, 2),
      channel_mult_emb=4, channel_mult_noise=2, num_blocks=1,
      attn_resolutions=(4,), resample_filter=(1, 3, 3, 1),
      dropout=arg.dropout, augment_dim=6 if arg.augment_p > 0 else 0)
  c.data.augment_p = arg.augment_p
  return c
