"""Training objectives, picked by `config.objective.name`.

An objective is a module with two pure functions and a sampler name:

- `draw(rng, batch, config, num_classes, context) -> draws`: every random
  quantity of the step (times, noise, dropped labels, dropout key), a dict
  of arrays;
- `loss(u_fn, params, batch, draws, config, num_classes, context)
  -> (loss, metrics)`: deterministic given the draws, so tests feed the
  draws of a reference implementation;
- `SAMPLER`: the sampler that fits the quantity it trains;
- `LEARNS_FROM` (distillation only): "teacher" (objective.teacher names an
  export) or "pairs" (data.pairs_dir holds a teacher's pairs).

`context` (`common.Context`) carries what some methods need beyond the
batch: the step (curricula), the EMA parameters and the objective's own
target parameters (consistency targets). An objective that keeps target
parameters defines `target_decay(step, settings, num_steps) -> mu`: the
train state then holds `target_params`, updated after every step as
mu * target + (1 - mu) * params.
Adding a method of the family means adding a module here and one line to
`OBJECTIVES`; the trainer never changes.
"""

import types

import jax

from mf_jax.objectives import alpha_flow
from mf_jax.objectives import ayf
from mf_jax.objectives import cd
from mf_jax.objectives import common
from mf_jax.objectives import ct
from mf_jax.objectives import ctm
from mf_jax.objectives import ect
from mf_jax.objectives import flow_matching
from mf_jax.objectives import ict
from mf_jax.objectives import meanflow
from mf_jax.objectives import reflow
from mf_jax.objectives import scd
from mf_jax.objectives import sct
from mf_jax.objectives import score_sde
from mf_jax.objectives import shortcut
from mf_jax.objectives import time_samplers

Context = common.Context

OBJECTIVES: dict[str, types.ModuleType] = {
    "alpha_flow": alpha_flow,
    "ayf": ayf,
    "cd": cd,
    "ct": ct,
    "ctm": ctm,
    "ect": ect,
    "flow_matching": flow_matching,
    "ict": ict,
    "meanflow": meanflow,
    "reflow": reflow,
    "scd": scd,
    "sct": sct,
    "score_sde": score_sde,
    "shortcut": shortcut,
}


def get(name: str) -> types.ModuleType:
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective.name {name!r}; valid: "
                     f"{sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def method_defaults() -> list[dict]:
  """Each objective's `CONFIG`: its fields of `config.objective` with their
  defaults (config_lib adds them to every config, so any objective can be
  chosen and tuned from the command line)."""
  return [m.CONFIG for m in OBJECTIVES.values() if hasattr(m, "CONFIG")]


def validate(config) -> types.ModuleType:
  """Checks the objective settings of a whole config before anything is
  compiled (some methods check them against training and eval fields:
  curricula against num_steps, step grids against eval.nfe)."""
  settings = config.objective
  objective = get(settings.name)
  if settings.time_sampler not in time_samplers.TIME_SAMPLERS:
    raise ValueError(f"Unknown objective.time_sampler "
                     f"{settings.time_sampler!r}; valid: "
                     f"{time_samplers.TIME_SAMPLERS}.")
  if hasattr(objective, "validate"):
    objective.validate(config)
  return objective


def learns_from(name: str) -> str:
  """'teacher', 'pairs', or '' for an objective that learns from data."""
  return getattr(get(name), "LEARNS_FROM", "")


def has_target(config) -> bool:
  """Whether the objective keeps target parameters in the train state."""
  return hasattr(get(config.objective.name), "target_decay")


def make_target_update(config):
  """(target, params, step) -> new target, or None without a target."""
  objective = get(config.objective.name)
  if not has_target(config):
    return None
  settings, num_steps = config.objective, config.training.num_steps

  def update(target, params, step):
    mu = objective.target_decay(step, settings, num_steps)
    return jax.tree.map(lambda old, new: mu * old + (1 - mu) * new,
                        target, jax.lax.stop_gradient(params))
  return update


def make_loss_fn(config, u_fn):
  """The objective of `config` bound to the network:
  (params, batch, rng, context) -> (loss, metrics)."""
  objective = get(config.objective.name)
  settings, num_classes = config.objective, config.model.num_classes

  def loss_fn(params, batch, rng, context):
    context = context.replace(num_steps=config.training.num_steps)
    draws = objective.draw(rng, batch, settings, num_classes, context)
    return objective.loss(u_fn, params, batch, draws, settings, num_classes,
                          context)
  return loss_fn
