"""Training objectives, picked by `config.objective.name`.

An objective is a module with a pure `loss(u_fn, params, batch, rng, config,
num_classes) -> (loss, metrics)` and the name of the sampler that fits the
quantity it trains (`SAMPLER`). Adding a method of the family (shortcut,
consistency, CTM, alpha-Flow, ...) means adding a module here and one line
to `OBJECTIVES`; the trainer never changes.
"""

import functools
import types

from mf_jax.objectives import flow_matching
from mf_jax.objectives import meanflow
from mf_jax.objectives import time_samplers

OBJECTIVES: dict[str, types.ModuleType] = {
    "flow_matching": flow_matching,
    "meanflow": meanflow,
}


def get(name: str) -> types.ModuleType:
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective.name {name!r}; valid: "
                     f"{sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def validate(config) -> types.ModuleType:
  """Checks `config.objective` before anything is compiled."""
  objective = get(config.name)
  if config.time_sampler not in time_samplers.TIME_SAMPLERS:
    raise ValueError(f"Unknown objective.time_sampler {config.time_sampler!r}"
                     f"; valid: {time_samplers.TIME_SAMPLERS}.")
  if hasattr(objective, "validate"):
    objective.validate(config)
  return objective


def make_loss_fn(config, u_fn):
  """Binds the objective of `config` to the network: (params, batch, rng)."""
  objective = get(config.objective.name)
  return functools.partial(objective.loss, u_fn, config=config.objective,
                           num_classes=config.model.num_classes)
