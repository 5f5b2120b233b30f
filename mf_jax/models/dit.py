"""The MeanFlow DiT: a DiT with adaLN-Zero conditioned on two times.

Architecturally identical to the official MeanFlow JAX network
(Gsunshine/meanflow, `models_dit.py`): an official checkpoint maps onto it
by renaming keys only (`official.py`), and tests check that it reproduces the
official outputs to float32 precision. As in the official code there is no
learned positional embedding and no LayerNorm affine parameters, so the
parameter counts are the paper's (131M for B/4, 676M for XL/2).

Mixed precision: with `dtype=bfloat16` the matmuls and convolution run in
bfloat16 while parameters, the residual stream, the time/label conditioning
and the output stay float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mf_jax.models import adaptive_weight
from mf_jax.models import embeddings

LN_EPS = 1e-6

_zeros = nn.initializers.zeros
# PyTorch DiT initialises the patch kernel as xavier_uniform of its
# (out, in*p*p) view: fan_in = p*p*C, fan_out = D, not flax's conv default.
_patch_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)


def _dense(features, dtype, name, zero=False):
  """Linear layer with DiT's init: xavier_uniform (or zero) and zero bias."""
  kernel_init = _zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, kernel_init=kernel_init, bias_init=_zeros,
                  dtype=dtype, name=name)


def tokenwise(layer, x_bnd):
  """`layer` applied to (B*N, D) rows, reshaped back to (B, N, features).

  Same result and parameters as calling it on (B, N, D). Why: the weight
  gradient of a Dense on a 3-D input contracts two axes, and XLA:CPU then
  transposes the (B, N, F) output gradient into an (F, B*N) copy before
  the dot; on 2-D rows the dot reads it in place. Forward and backward of
  one DiT-S fc1 (B*N = 512, 384 -> 1536): 6.8 ms on (B, N, D), 4.3 on
  rows. On TPU the merge of B and N is a free bitcast.
  """
  rows_k = layer(x_bnd.reshape(-1, x_bnd.shape[-1]))
  return rows_k.reshape(*x_bnd.shape[:-1], rows_k.shape[-1])


def _layer_norm(dtype):
  return nn.LayerNorm(epsilon=LN_EPS, use_bias=False, use_scale=False,
                      dtype=dtype)


def modulate(x_bnd, shift_bd, scale_bd):
  return x_bnd * (1 + scale_bd[:, None]) + shift_bd[:, None]


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE's 1-D embedding: [sin, cos] at frequencies 10000^(-2i/dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """MAE's fixed 2-D embedding of a row-major token grid, (grid_h*grid_w, dim).

  As in MAE (meshgrid with w first), the first half of each vector encodes
  the column and the second half the row. A numpy constant: not a parameter.
  """
  cols, rows = np.meshgrid(np.arange(grid_w), np.arange(grid_h))
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)],
                       axis=1)
  return emb.astype(np.float32)


def unpatchify(x_bnk, grid_h: int, grid_w: int, patch: int, channels: int):
  """(B, gh*gw, p*p*C) -> (B, gh*p, gw*p, C); features ordered (p, q, c)."""
  b = x_bnk.shape[0]
  x = x_bnk.reshape(b, grid_h, grid_w, patch, patch, channels)
  x = jnp.einsum("nhwpqc->nhpwqc", x)
  return x.reshape(b, grid_h * patch, grid_w * patch, channels)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection.

  Plain einsums and softmax (no custom_vjp kernel), so jax.jvp and jax.grad
  of jax.jvp work through it, as the MeanFlow loss needs. The fused output
  is transposed once to (3, B, heads, N, head_dim) and split, as timm and
  the official code do: slicing q, k, v out of the (B, N, 3, ...) layout
  instead made the backward pass build the qkv gradient from three padded
  full-size copies, and `jax.nn.dot_product_attention` transposed each of
  q, k, v on its own (forward and backward of DiT-S/4 at batch 8 on
  XLA:CPU: 1.01x the official layout's time; this layout 0.96x).
  """
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x_bnd):
    b, n, d = x_bnd.shape
    h = self.num_heads
    head_dim = d // h
    qkv = tokenwise(_dense(3 * d, self.dtype, "qkv"), x_bnd)
    qkv_3bhnk = qkv.reshape(b, n, 3, h, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = (a[0] for a in jnp.split(qkv_3bhnk, 3, axis=0))
    # Logits and softmax in float32 under bfloat16 compute, as
    # jax.nn.dot_product_attention does.
    logits_bhnm = jnp.einsum("bhnk,bhmk->bhnm", q * head_dim ** -0.5, k,
                             preferred_element_type=jnp.float32)
    weights_bhnm = jax.nn.softmax(logits_bhnm, axis=-1).astype(v.dtype)
    out_bhnk = jnp.einsum("bhnm,bhmk->bhnk", weights_bhnm, v)
    out_bnd = out_bhnk.transpose(0, 2, 1, 3).reshape(b, n, d)
    return tokenwise(_dense(d, self.dtype, "proj"), out_bnd)


class Mlp(nn.Module):
  hidden: int
  dtype: Any

  @nn.compact
  def __call__(self, x_bnd):
    y = tokenwise(_dense(self.hidden, self.dtype, "fc1"), x_bnd)
    y = nn.gelu(y, approximate=True)
    return tokenwise(_dense(x_bnd.shape[-1], self.dtype, "fc2"), y)


class DiTBlock(nn.Module):
  """Pre-norm transformer block with adaLN-Zero (gates start at zero)."""
  num_heads: int
  mlp_ratio: float
  dtype: Any

  @nn.compact
  def __call__(self, x_bnd, c_bd):
    d = x_bnd.shape[-1]
    mod = _dense(6 * d, self.dtype, "adaLN_modulation", zero=True)(
        nn.silu(c_bd))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        jnp.split(mod, 6, axis=-1))
    y = modulate(_layer_norm(self.dtype)(x_bnd), shift_msa, scale_msa)
    x_bnd = x_bnd + gate_msa[:, None] * Attention(
        self.num_heads, self.dtype, name="attn")(y)
    y = modulate(_layer_norm(self.dtype)(x_bnd), shift_mlp, scale_mlp)
    return x_bnd + gate_mlp[:, None] * Mlp(
        int(d * self.mlp_ratio), self.dtype, name="mlp")(y)


class FinalLayer(nn.Module):
  """adaLN (shift, scale) then a zero-initialised projection to patches."""
  out_features: int
  dtype: Any

  @nn.compact
  def __call__(self, x_bnd, c_bd):
    d = x_bnd.shape[-1]
    mod = _dense(2 * d, self.dtype, "adaLN_modulation", zero=True)(
        nn.silu(c_bd))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x_bnd = modulate(_layer_norm(self.dtype)(x_bnd), shift, scale)
    return tokenwise(
        _dense(self.out_features, self.dtype, "linear", zero=True), x_bnd)


class DiT(nn.Module):
  """u = DiT(z, t, h, y): NHWC in, same shape and dtype out.

  Parameter tree (top level): x_embedder, {t,r,h}_embedder (per
  `time_inputs`), y_embedder (if num_classes), blocks_0 .. blocks_{depth-1},
  final_layer (+ adaptive_weight: see models/adaptive_weight.py).
  """
  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  num_classes: int
  mlp_ratio: float = 4.0
  time_inputs: str = "t,h"
  remat: bool = False  # recompute blocks in the backward pass to save memory
  dtype: Any = "float32"  # compute dtype of Dense/Conv; params stay float32
  adaptive_weight_dim: int = 0  # > 0: a learned loss weight w(t) (sCT)

  @nn.compact
  def __call__(self, z, t, h, y, train: bool = False,
               with_logvar: bool = False):
    del train  # no dropout
    b, height, width, channels = z.shape
    p, d = self.patch_size, self.hidden_size
    if height % p or width % p:
      raise ValueError(f"Input {height}x{width} is not divisible by "
                       f"patch_size {p}.")
    if d % self.num_heads:
      raise ValueError(f"hidden_size {d} is not divisible by num_heads "
                       f"{self.num_heads}.")
    # float32 means no casting: float64 params (enable_x64) then stay float64.
    dtype = jnp.dtype(self.dtype)
    dtype = None if dtype == jnp.float32 else dtype
    resid_dtype = jnp.promote_types(z.dtype, jnp.float32)

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID",
                kernel_init=_patch_init, bias_init=_zeros, dtype=dtype,
                name="x_embedder")(z)
    grid_h, grid_w = height // p, width // p
    x_bnd = (x.reshape(b, grid_h * grid_w, d).astype(resid_dtype)
             + sincos_2d(d, grid_h, grid_w))

    c_bd = embeddings.embed_conditions(
        t, h, y, width=d, num_classes=self.num_classes,
        time_inputs=embeddings.parse_time_inputs(self.time_inputs))

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      x_bnd = block_cls(self.num_heads, self.mlp_ratio, dtype,
                        name=f"blocks_{i}")(x_bnd, c_bd)
    x_bnk = FinalLayer(p * p * channels, dtype, name="final_layer")(x_bnd, c_bd)
    u = unpatchify(x_bnk, grid_h, grid_w, p, channels).astype(z.dtype)
    return adaptive_weight.outputs(u, t, self.adaptive_weight_dim,
                                   with_logvar)


def _variants():
  sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 1024, 16),
           "L": (24, 1024, 16), "XL": (28, 1152, 16)}
  return {f"{size}/{patch}": dict(depth=depth, hidden_size=hidden,
                                  num_heads=heads, patch_size=patch)
          for size, (depth, hidden, heads) in sizes.items()
          for patch in (2, 4, 8)}


# "B/4" -> depth, hidden_size, num_heads, patch_size: DiT sizes S, B, L, XL
# plus MeanFlow's M, each with patch 2, 4 or 8.
DIT_VARIANTS = _variants()
ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")


def from_config(config) -> DiT:
  """DiT from a model config: `variant` sizes, overridden by explicit fields."""
  variant = config.get("variant") or ""
  if variant and variant not in DIT_VARIANTS:
    raise ValueError(f"Unknown DiT variant {variant!r}; valid: "
                     f"{sorted(DIT_VARIANTS)}.")
  arch = dict(DIT_VARIANTS.get(variant, {}))
  arch.update({k: config[k] for k in ARCH_FIELDS
               if config.get(k) is not None})
  missing = [k for k in ARCH_FIELDS if k not in arch]
  if missing:
    raise ValueError(f"DiT config needs a variant or explicit {missing}.")
  input_size = config.get("input_size")
  if input_size is not None and input_size % arch["patch_size"]:
    raise ValueError(f"input_size {input_size} is not divisible by "
                     f"patch_size {arch['patch_size']}.")
  embeddings.parse_time_inputs(config.get("time_inputs", "t,h"))
  return DiT(num_classes=config.get("num_classes", 0),
             mlp_ratio=config.get("mlp_ratio", 4.0),
             time_inputs=config.get("time_inputs", "t,h"),
             remat=config.get("remat", False),
             dtype=config.get("dtype", "float32"),
             adaptive_weight_dim=config.get("adaptive_weight_dim", 0), **arch)
