"""Reflow and one-step distillation (Liu, Gong & Liu, 2023).

Flow matching on a teacher's coupling instead of independent noise: each
example is a pair (x, e) whose x is the teacher's ODE solution from e
(`python -m mf_jax.tools.make_pairs`, read with `data.pairs_dir`). With

  z_t = (1 - t) x + t e,   target v = e - x   (at h = 0),

the learned field's flow is straighter than the teacher's (the rectified
flow of the coupling; with a deterministic coupling the optimum is the
straight line from e to its x), so few Euler steps suffice.
`reflow_one_step=True` is the k = 1 distillation: t = 1 always, z = e, so
the network regresses e - x and one Euler step x = e - u(e, 1, 0, y) is the
student's sample (the Rectified Flow code's 't0' schedule, here with L2;
its LPIPS option is not implemented). The step keeps h = 0 in both modes,
so one sampler (Euler, `SAMPLER`) fits both and the student's inputs stay
those of the flow-matching teacher it starts from.

Start: `reflow_init_from_teacher=True` (default) starts the student as the
network that made the pairs (the pairs' manifest names it;
`objective.teacher`, then `objective.init_from`, override it), as the
reference code fine-tunes 1-RF (training/init_from.py loads it). Labels are never dropped: the coupling is
label-specific, and a null-label student would average the class maps.
"""

import jax.numpy as jnp

from mf_jax.data import pairs
from mf_jax.objectives import common
from mf_jax.objectives import time_samplers

SAMPLER = "euler"
# What it learns from: a teacher\'s pairs (tools/compare.py provides them).
LEARNS_FROM = "pairs"

CONFIG = dict(
    reflow_one_step=False,  # k = 1: regress e - x at t = 1 (one Euler step)
    reflow_init_from_teacher=True,  # start as the pairs' teacher
)


def validate(config):
  """pairs_dir set, and its pairs fit the model if they are there (a run
  that is evaluated or exported after its pairs were deleted still
  builds; training reads them first and says so if they are gone)."""
  pairs_dir = config.data.get("pairs_dir", "")
  if not pairs_dir:
    raise ValueError(
        "objective.name=reflow trains on a teacher's (noise, sample) pairs: "
        f"set data.pairs_dir (make them with {pairs.MAKE_COMMAND}).")
  if pairs.exists(pairs_dir):
    pairs.check_fits(pairs_dir, config.model)


def init_source(config) -> str:
  """The export the student starts from (training/init_from.py):
  objective.init_from if set, else (reflow_init_from_teacher) the teacher
  named by objective.teacher or, failing that, by the pairs' manifest."""
  settings = config.objective
  if settings.get("init_from", ""):
    return settings.init_from
  if not settings.reflow_init_from_teacher:
    return ""
  if settings.get("teacher", ""):
    return settings.teacher
  teacher = pairs.read_manifest(config.data.pairs_dir).get("teacher", "")
  if not teacher:
    raise ValueError(
        f"The pairs in {config.data.pairs_dir} name no teacher file to start "
        "from; set objective.teacher=FILE or "
        "objective.reflow_init_from_teacher=False.")
  return teacher


def draw(rng, batch, config, num_classes, context=None):
  """Times t (all 1 for the one-step variant) and the dropout key; the
  noise is the pair's own, batch['e']."""
  del num_classes, context
  size = batch["x"].shape[0]
  if config.reflow_one_step:
    t = jnp.ones((size,), batch["x"].dtype)
  else:
    t = time_samplers.sample_time(rng, (size,), config)
  return {"t": t, "dropout": common.dropout_rng(rng)}


def loss(u_fn, params, batch, draws, config, num_classes, context=None):
  """Returns (scalar loss, metrics) for one batch {'x', 'e', 'y'}."""
  del num_classes, context
  t = draws["t"]
  z, v = common.interpolate(batch["x"], batch["e"], t)
  u = u_fn(params, z, t, jnp.zeros_like(t), batch["y"], True,
           **common.model_extras(u_fn, batch, draws))
  sq_error_b = common.per_sample_sq_error(u, v)
  value, weight_b = common.adaptive_weighted_loss(
      sq_error_b, config.adaptive_p, config.adaptive_eps)
  return value, {"loss": value, "mse": jnp.mean(sq_error_b),
                 "v_mse": jnp.mean(sq_error_b), "weight": jnp.mean(weight_b)}
