"""Time and label conditioning shared by every backbone.

The MeanFlow network u(z, r, t) is conditioned on two times. The official
code embeds t and h = t - r with two separate sinusoidal embedders and sums
them with the label embedding into one vector c (official_meanflow.md §1.6).
The paper ablates which pair of times to feed; `time_inputs` picks them.

Times enter the sinusoid unscaled, in [0, 1]. MeanFlow differentiates u with
respect to t (du/dt in its target), and the common x1000 scaling would
multiply that derivative by up to 1000 (DESIGN.md §3).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

TIME_INPUT_NAMES = ("t", "r", "h")
FREQUENCY_DIM = 256  # sinusoid width, as in DiT and the official MeanFlow
MAX_PERIOD = 10_000


def parse_time_inputs(spec: str) -> tuple[str, ...]:
  """'t,h' -> ('t', 'h'); each name is one of t, r, h, used at most once."""
  names = tuple(name.strip() for name in spec.split(","))
  if (not spec.strip() or len(set(names)) != len(names)
      or any(name not in TIME_INPUT_NAMES for name in names)):
    raise ValueError(
        f"Invalid time_inputs {spec!r}: use distinct comma-separated names "
        f"from {TIME_INPUT_NAMES}, e.g. 't,h' (official), 't,r', 't,r,h', 'h'.")
  return names


def timestep_sinusoid(t_b: jnp.ndarray, dim: int = FREQUENCY_DIM):
  """[cos, sin] features of t at geometric frequencies 1 .. 1/MAX_PERIOD.

  Float32 at least (float64 when t is, for tight numerical tests).
  """
  dtype = jnp.promote_types(t_b.dtype, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-np.log(MAX_PERIOD) * jnp.arange(half, dtype=dtype) / half)
  args_bf = t_b.astype(dtype)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args_bf), jnp.sin(args_bf)], axis=-1)


class TimestepEmbedder(nn.Module):
  """Sinusoid of a scalar time, then Dense-SiLU-Dense to `width`, in float32.

  The time path stays float32 whatever the compute dtype: its derivative
  w.r.t. t is part of the MeanFlow target.
  """
  width: int

  @nn.compact
  def __call__(self, t_b):
    dense = lambda name: nn.Dense(
        self.width, kernel_init=nn.initializers.normal(0.02), name=name)
    x = dense("fc1")(timestep_sinusoid(t_b))
    return dense("fc2")(nn.silu(x))


def embed_conditions(t_b, h_b, y_b, *, width: int,
                     time_inputs: Sequence[str], num_classes: int):
  """c = sum of the chosen time embeddings (+ the label embedding), (B, width).

  Call it inside a compact method: the embedders become children of the
  calling module named `{t,r,h}_embedder` and `y_embedder`, the official
  checkpoint's top-level names. r is t - h. With `num_classes == 0` there is
  no label table and y is ignored; otherwise row `num_classes` is the null
  (unconditional) class.
  """
  times = {"t": t_b, "h": h_b, "r": t_b - h_b}
  c_bd = sum(TimestepEmbedder(width, name=f"{name}_embedder")(times[name])
             for name in time_inputs)
  if num_classes:
    c_bd = c_bd + nn.Embed(
        num_classes + 1, width, embedding_init=nn.initializers.normal(0.02),
        name="y_embedder")(y_b)
  return c_bd
