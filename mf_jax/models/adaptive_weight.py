"""A learned loss weight w(t) as a small head of the backbone (sCT).

Lu & Song (2024) weight each sample's loss by e^{-w(t)} and add w(t), with
w a small network of time learned with the model (EDM2's uncertainty
weighting, Karras et al., 2024). Its parameters must live with the model's,
so the optimizer, the EMAs and checkpoints carry it: a backbone built with
`adaptive_weight_dim` > 0 owns this head as its child 'adaptive_weight' and
returns (u, w) when called with `with_logvar=True`; called as usual it
returns u alone (the head's output is then unused and compiled away). With
`adaptive_weight_dim` = 0 (the default) there is no head and the parameter
tree is the backbone's alone.

As in EDM2 the head reads the time alone (its own sinusoid, not the
backbone's embedding), so its gradient never reaches the backbone. The
output layer starts at zero: w = 0, weight 1, at initialisation.
"""

import flax.linen as nn

from mf_jax.models import embeddings


class AdaptiveWeight(nn.Module):
  """w(t): sinusoid of t -> Dense(dim) -> SiLU -> Dense(1), shape (B,)."""
  dim: int

  @nn.compact
  def __call__(self, t_b):
    x = embeddings.timestep_sinusoid(t_b, self.dim)
    x = nn.silu(nn.Dense(self.dim, name="fc1")(x))
    return nn.Dense(1, kernel_init=nn.initializers.zeros, name="fc2")(x)[:, 0]


def outputs(u, t_b, dim: int, with_logvar: bool):
  """What a backbone returns: u, or (u, w(t)) when asked for the weight.

  Call it inside the backbone's compact method: the head becomes its child
  'adaptive_weight'.
  """
  if not dim:
    if with_logvar:
      raise ValueError("This backbone has no loss-weight head: set "
                       "model.adaptive_weight_dim > 0.")
    return u
  logvar = AdaptiveWeight(dim, name="adaptive_weight")(t_b)
  return (u, logvar) if with_logvar else u
