"""EDM's DDPM++ U-Net ("SongUNet") as MeanFlow's CIFAR-10 code uses it.

A Flax Linen port of the network in the official PyTorch MeanFlow code
(py-meanflow `models/unet.py`, itself EDM's `SongUNet`), with the setting of
its CIFAR-10 runs: 128 channels, multipliers [2, 2, 2], 4 residual blocks per
resolution, one-head attention at 16x16, resample filter [1, 3, 3, 1],
standard encoder and decoder, dropout 0.2, and a 6-d augmentation label.

Time conditioning follows the official code: t and h = t - r each go
through EDM's PositionalEmbedding (256 channels, endpoint=True) unscaled in
[0, 1], with its [cos, sin] halves swapped to [sin, cos]; the two are
concatenated (512), the augmentation-label projection is added, and a
two-layer SiLU MLP makes the 512-d embedding every block adds to its
features. The paper setting has 55,932,419 parameters (55,929,347 without the
augmentation projection), the count of the official network.

Departures, none of which change that count:
- Class conditioning (`num_classes` > 0, absent from the official CIFAR
  code, whose label path raises NotImplementedError) is a (num_classes + 1)
  row table added to the time embedding; row `num_classes` is the null class.
- NHWC layout; parameter names mirror the official module keys
  (`enc_16x16_block0`, `dec_8x8_in0`, ...), kernels are HWIO.
- Attention uses the official one (q, k, v are consecutive channel thirds of
  one 1x1 convolution), computed by XLA so that jax.jvp and jax.grad of
  jax.jvp run through it.

Dropout acts only when `train=True` and then needs an rng named 'dropout'.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mf_jax.models import adaptive_weight

# EDM's initialisations: xavier_uniform, scaled by 1e-5 for the layers that
# end a residual branch ("init_zero") and by sqrt(0.2) for the qkv projection.
# variance_scaling takes the square of the weight multiplier.
_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_init_zero = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
_init_attn = nn.initializers.variance_scaling(0.2, "fan_avg", "uniform")
_zeros = nn.initializers.zeros

GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4


def positional_embedding(x_b, num_channels: int, max_positions: int = 10_000,
                         endpoint: bool = True):
  """EDM's PositionalEmbedding with the official [sin, cos] order, (B, C).

  Frequencies (1/max_positions)^(i / (C/2 - 1)) for i < C/2 with
  endpoint=True, so they span exactly 1 .. 1/max_positions. Float32 at
  least (float64 when x is).
  """
  dtype = jnp.promote_types(x_b.dtype, jnp.float32)
  half = num_channels // 2
  freqs = np.arange(half) / (half - (1 if endpoint else 0))
  freqs = jnp.asarray((1.0 / max_positions) ** freqs, dtype)
  args = x_b.astype(dtype)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _resample_kernel(filt: Sequence[int], channels: int, dtype, gain=1.0):
  """The separable low-pass f f^T / sum(f)^2 as a depthwise HWIO kernel."""
  f = np.asarray(filt, np.float64)
  k = np.outer(f, f) / np.square(f.sum()) * gain
  k = np.tile(k[:, :, None, None], (1, 1, 1, channels))
  return jnp.asarray(k, dtype)


def downsample(x, filt: Sequence[int]):
  """Filter then stride 2 (EDM's depthwise conv2d with the filter)."""
  pad = (len(filt) - 1) // 2
  return jax.lax.conv_general_dilated(
      x, _resample_kernel(filt, x.shape[-1], x.dtype), (2, 2),
      [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def upsample(x, filt: Sequence[int]):
  """Zero-stuff by 2 then filter with gain 4 (EDM's conv_transpose2d).

  A transposed convolution with padding p is a convolution of the dilated
  input with padding k - 1 - p and the flipped (here symmetric) kernel.
  """
  pad = len(filt) - 1 - (len(filt) - 1) // 2
  kernel = _resample_kernel(filt[::-1], x.shape[-1], x.dtype, gain=4.0)
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), [(pad, pad), (pad, pad)], lhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def _conv(features, kernel, dtype, name, init=_init):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=[(pad, pad)] * 2,
                 kernel_init=init, bias_init=_zeros, dtype=dtype, name=name)


def _group_norm(channels, eps, name):
  groups = min(GROUPS, channels // MIN_CHANNELS_PER_GROUP)
  return nn.GroupNorm(num_groups=groups, epsilon=eps, name=name)


class UNetBlock(nn.Module):
  """DDPM++ residual block: GN-SiLU-conv, + emb, GN-SiLU-dropout-conv, skip;
  optional up/down-sampling and a self-attention layer after it.

  Residual sums are scaled by sqrt(0.5) as in EDM (skip_scale).
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  resample_filter: Sequence[int] = (1, 1)
  eps: float = 1e-6
  dtype: Any = None

  def _resample(self, x):
    if self.up:
      return upsample(x, self.resample_filter)
    if self.down:
      return downsample(x, self.resample_filter)
    return x

  @nn.compact
  def __call__(self, x, emb, train: bool):
    c_in, c_out = x.shape[-1], self.out_channels
    skip_scale = np.sqrt(0.5)
    h = nn.silu(_group_norm(c_in, self.eps, "norm0")(x))
    h = _conv(c_out, 3, self.dtype, "conv0")(self._resample(h))
    h = h + nn.Dense(c_out, kernel_init=_init, bias_init=_zeros,
                     dtype=self.dtype, name="affine")(emb)[:, None, None]
    h = nn.silu(_group_norm(c_out, self.eps, "norm1")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(c_out, 3, self.dtype, "conv1", _init_zero)(h)
    if c_out != c_in or self.up or self.down:
      # resample_proj=True: the skip always has a 1x1 projection.
      x = _conv(c_out, 1, self.dtype, "skip")(self._resample(x))
    x = (h + x) * skip_scale
    if not self.attention:
      return x
    b, height, width, _ = x.shape
    qkv = _conv(3 * c_out, 1, self.dtype, "qkv", _init_attn)(
        _group_norm(c_out, self.eps, "norm2")(x))
    q, k, v = (a.reshape(b, height * width, self.num_heads,
                         c_out // self.num_heads)
               for a in jnp.split(qkv, 3, axis=-1))
    a = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    a = a.reshape(b, height, width, c_out)
    return (_conv(c_out, 1, self.dtype, "proj", _init_zero)(a) + x) * skip_scale


class SongUNet(nn.Module):
  """u = SongUNet(z, t, h, y): NHWC in, same shape and dtype out.

  `augment_labels` (B, augment_dim) are EDM's augmentation parameters of
  each training image; None means "not augmented" (zeros), as at sampling.
  `adaptive_weight_dim` > 0 adds sCT's learned loss weight
  (models/adaptive_weight.py).
  """
  img_resolution: int = 32
  out_channels: int = 3
  model_channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  channel_mult_emb: int = 4
  channel_mult_noise: int = 2
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resample_filter: Sequence[int] = (1, 3, 3, 1)
  augment_dim: int = 0
  num_classes: int = 0
  dtype: Any = "float32"  # compute dtype of Dense/Conv; params stay float32
  adaptive_weight_dim: int = 0  # > 0: a learned loss weight w(t) (sCT)

  def _embedding(self, t, h, y, augment_labels):
    noise_channels = self.model_channels * self.channel_mult_noise
    emb_channels = self.model_channels * self.channel_mult_emb
    emb = jnp.concatenate([positional_embedding(t, noise_channels),
                           positional_embedding(h, noise_channels)], axis=-1)
    if self.augment_dim:
      if augment_labels is None:
        augment_labels = jnp.zeros((t.shape[0], self.augment_dim), emb.dtype)
      emb = emb + nn.Dense(2 * noise_channels, use_bias=False,
                           kernel_init=_init, name="map_augment")(
                               augment_labels.astype(emb.dtype))
    if self.num_classes:
      # EDM's label Linear sees one-hots x sqrt(L) with xavier init: std
      # sqrt(2 L / (L + C)) per entry, here as a table (+ the null row).
      std = np.sqrt(2 * self.num_classes
                    / (self.num_classes + 2 * noise_channels))
      emb = emb + nn.Embed(self.num_classes + 1, 2 * noise_channels,
                           embedding_init=nn.initializers.normal(std),
                           name="map_label")(y)
    for name in ("map_layer0", "map_layer1"):
      emb = nn.silu(nn.Dense(emb_channels, kernel_init=_init,
                             bias_init=_zeros, name=name)(emb))
    return emb

  @nn.compact
  def __call__(self, z, t, h, y, train: bool = False, augment_labels=None,
               with_logvar: bool = False):
    if z.shape[1] != self.img_resolution or z.shape[2] != self.img_resolution:
      raise ValueError(f"Input {z.shape[1]}x{z.shape[2]} does not match "
                       f"img_resolution {self.img_resolution}.")
    dtype = jnp.dtype(self.dtype)
    dtype = None if dtype == jnp.float32 else dtype
    emb = self._embedding(t, h, y, augment_labels)
    block = lambda c, name, **kw: UNetBlock(
        c, dropout=self.dropout, resample_filter=tuple(self.resample_filter),
        dtype=dtype, name=name, **kw)

    x = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    skips = []
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        x = _conv(self.model_channels, 3, dtype, f"enc_{res}x{res}_conv")(x)
      else:
        x = block(x.shape[-1], f"enc_{res}x{res}_down", down=True)(
            x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = block(self.model_channels * mult, f"enc_{res}x{res}_block{idx}",
                  attention=res in self.attn_resolutions)(x, emb, train)
        skips.append(x)

    for level in reversed(range(len(self.channel_mult))):
      res = self.img_resolution >> level
      mult = self.channel_mult[level]
      if level == len(self.channel_mult) - 1:
        c = x.shape[-1]
        x = block(c, f"dec_{res}x{res}_in0", attention=True)(x, emb, train)
        x = block(c, f"dec_{res}x{res}_in1")(x, emb, train)
      else:
        x = block(x.shape[-1], f"dec_{res}x{res}_up", up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = block(self.model_channels * mult, f"dec_{res}x{res}_block{idx}",
                  attention=attn)(x, emb, train)
    res = self.img_resolution
    x = nn.silu(_group_norm(x.shape[-1], 1e-6, f"dec_{res}x{res}_aux_norm")(x))
    x = _conv(self.out_channels, 3, dtype, f"dec_{res}x{res}_aux_conv",
              _init_zero)(x)
    return adaptive_weight.outputs(x.astype(z.dtype), t,
                                   self.adaptive_weight_dim, with_logvar)


def from_config(config) -> SongUNet:
  """SongUNet from a model config; unset fields take the CIFAR-10 setting."""
  get = config.get
  if get("time_inputs", "t,h") != "t,h":
    raise ValueError("The U-Net embeds (t, h) as the official code does; "
                     f"time_inputs {get('time_inputs')!r} is for the DiT.")
  size = get("input_size", 32)
  mults = tuple(get("channel_mult", (2, 2, 2)))
  if size % (1 << (len(mults) - 1)):
    raise ValueError(f"input_size {size} is not divisible by "
                     f"2^{len(mults) - 1} (channel_mult {mults}).")
  return SongUNet(
      img_resolution=size,
      out_channels=get("in_channels", 3),
      model_channels=get("model_channels", 128),
      channel_mult=mults,
      channel_mult_emb=get("channel_mult_emb", 4),
      channel_mult_noise=get("channel_mult_noise", 2),
      num_blocks=get("num_blocks", 4),
      attn_resolutions=tuple(get("attn_resolutions", (16,))),
      dropout=get("dropout", 0.0),
      resample_filter=tuple(get("resample_filter", (1, 3, 3, 1))),
      augment_dim=get("augment_dim", 0),
      num_classes=get("num_classes", 0),
      dtype=get("dtype", "float32"),
      adaptive_weight_dim=get("adaptive_weight_dim", 0))
