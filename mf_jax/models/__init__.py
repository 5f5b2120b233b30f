"""Backbones: every model is called as `u = model.apply(variables, z, t, h, y,
train=...)` with h = t - r and y a class index (`num_classes` = null class).

`build_model(config.model)` picks one by `config.name`.
"""

import jax
import jax.numpy as jnp

from mf_jax.models import dit
from mf_jax.models import mlp
from mf_jax.models import unet
from mf_jax.models.dit import DIT_VARIANTS, DiT
from mf_jax.models.mlp import MLP

_BUILDERS = {"dit": dit.from_config, "mlp": mlp.from_config,
             "unet": unet.from_config}


def build_model(config):
  """The backbone a model config (ml_collections.ConfigDict) describes."""
  if config.name not in _BUILDERS:
    raise ValueError(f"Unknown model.name {config.name!r}; valid: "
                     f"{sorted(_BUILDERS)}.")
  return _BUILDERS[config.name](config)


def abstract_params(model, input_shape, batch_size: int = 1):
  """Parameter shapes (ShapeDtypeStruct tree), without allocating them.

  `input_shape` is one example's shape, without the batch axis: (H, W, C)
  for the DiT and the U-Net, (D,) for the MLP.
  """
  z = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), z, t, t, y)["params"]


def param_count(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["DIT_VARIANTS", "DiT", "MLP", "abstract_params", "build_model",
           "param_count"]
