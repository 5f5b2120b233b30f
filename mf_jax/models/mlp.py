"""A residual MLP with adaLN conditioning, for 2-D toy data and tiny inputs.

The DiT's conditioning recipe on vectors: c = sum of time embeddings (+ the
label embedding) modulates every block through (shift, scale, gate).
Blocks are pre-LayerNorm residuals, so the stack stays well-conditioned at
any depth; gates and the output projection start at zero, so u = 0 at init
and each block starts as the identity.
"""

import flax.linen as nn
import jax.numpy as jnp

from mf_jax.models import adaptive_weight
from mf_jax.models import embeddings

_zeros = nn.initializers.zeros


def _layer_norm():
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)


def _modulation(c_bd, parts: int, width: int, name: str):
  """SiLU(c) -> zero-initialised Dense, split into `parts` (B, width) arrays."""
  mod = nn.Dense(parts * width, kernel_init=_zeros, name=name)(nn.silu(c_bd))
  return jnp.split(mod, parts, axis=-1)


class ResBlock(nn.Module):
  """x + gate * MLP(modulate(LN(x)))."""

  @nn.compact
  def __call__(self, x_bd, c_bd):
    d = x_bd.shape[-1]
    shift, scale, gate = _modulation(c_bd, 3, d, "adaLN_modulation")
    y = _layer_norm()(x_bd) * (1 + scale) + shift
    y = nn.Dense(d, name="fc1")(y)
    y = nn.Dense(d, name="fc2")(nn.silu(y))
    return x_bd + gate * y


class FinalLayer(nn.Module):
  """adaLN (shift, scale), then a zero-initialised projection to D."""
  out_features: int

  @nn.compact
  def __call__(self, x_bd, c_bd):
    shift, scale = _modulation(c_bd, 2, x_bd.shape[-1], "adaLN_modulation")
    x_bd = _layer_norm()(x_bd) * (1 + scale) + shift
    return nn.Dense(self.out_features, kernel_init=_zeros, name="linear")(x_bd)


class MLP(nn.Module):
  """u = MLP(z, t, h, y) for z of shape (B, D); D is taken from z.

  Parameter tree (top level): input_proj, {t,r,h}_embedder (per
  `time_inputs`), y_embedder (if num_classes), blocks_0 .. blocks_{depth-1},
  final_layer (+ adaptive_weight: see models/adaptive_weight.py).
  """
  hidden_size: int = 256
  depth: int = 4
  num_classes: int = 0
  time_inputs: str = "t,h"
  adaptive_weight_dim: int = 0  # > 0: a learned loss weight w(t) (sCT)

  @nn.compact
  def __call__(self, z, t, h, y, train: bool = False,
               with_logvar: bool = False):
    del train  # no dropout
    c_bd = embeddings.embed_conditions(
        t, h, y, width=self.hidden_size, num_classes=self.num_classes,
        time_inputs=embeddings.parse_time_inputs(self.time_inputs))
    x_bd = nn.Dense(self.hidden_size, name="input_proj")(z)
    for i in range(self.depth):
      x_bd = ResBlock(name=f"blocks_{i}")(x_bd, c_bd)
    x_bd = FinalLayer(z.shape[-1], name="final_layer")(x_bd, c_bd)
    return adaptive_weight.outputs(x_bd.astype(z.dtype), t,
                                   self.adaptive_weight_dim, with_logvar)


def from_config(config) -> MLP:
  time_inputs = config.get("time_inputs", "t,h")
  embeddings.parse_time_inputs(time_inputs)
  return MLP(hidden_size=config.get("hidden_size", 256),
             depth=config.get("depth", 4),
             num_classes=config.get("num_classes", 0),
             time_inputs=time_inputs,
             adaptive_weight_dim=config.get("adaptive_weight_dim", 0))
