"""The train state and the optimizer, created already sharded on the mesh."""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mf_jax import objectives
from mf_jax import sharding


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; with the data position, a resume.

  `ema_params` maps each decay (as a string, e.g. '0.9999') to its EMA copy
  of the parameters, initialised equal to them as in the official code.
  `target_params` is the copy a consistency objective regresses towards
  (an EMA whose rate follows its curriculum, `objectives.make_target_update`);
  empty ({}) for every other objective, so their checkpoints hold no copy.
  The last three fields record non-finite steps without a host sync:
  `nonfinite_step` is the first step found with a non-finite loss,
  gradient or updated parameters (0: none; under policy 'stop' the latter
  two are checked only in checked steps, see training/step.py),
  `nonfinite_what` says which (bits 1, 2, 4), `skipped_steps` counts the
  updates dropped for it (policy 'skip').
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: dict[str, Any]
  target_params: Any
  nonfinite_step: jax.Array
  nonfinite_what: jax.Array
  skipped_steps: jax.Array


def ema_key(decay: float) -> str:
  """'%g' (the keys of existing checkpoints) where it is exact, else the
  shortest exact repr: '%g' alone maps 0.9999995 to '1', so two decays
  could share a key and one EMA silently replace the other."""
  decay = float(decay)
  short = f"{decay:g}"
  return short if float(short) == decay else repr(decay)


def make_u_fn(model):
  """The backbone as u_fn(params, z, t, h, y, train), all objectives use.

  It also takes `rngs` (e.g. {'dropout': key} for the U-Net's dropout in
  training) and extra model inputs such as `augment_labels`; its attribute
  `takes_rngs` tells objectives so (plain test fields take six arguments).
  """
  def u_fn(params, z, t, h, y, train, rngs=None, **extras):
    return model.apply({"params": params}, z, t, h, y, train=train,
                       rngs=rngs, **extras)
  u_fn.takes_rngs = True
  return u_fn


def model_input_shape(model_config) -> tuple[int, ...]:
  """Shape of one example the backbone takes: NHWC image or a D-vector."""
  if model_config.name == "mlp":
    return (model_config.in_channels,)
  size = model_config.input_size
  return (size, size, model_config.in_channels)


def make_lr_schedule(config, num_steps: int) -> optax.Schedule:
  """Constant (the paper's) or cosine decay to 0 at `num_steps`, with an
  optional linear warmup from 0."""
  if config.schedule == "constant":
    if config.warmup_steps:
      return optax.linear_schedule(0.0, config.lr, config.warmup_steps)
    return optax.constant_schedule(config.lr)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, config.lr, max(config.warmup_steps, 1), num_steps)
  raise ValueError(f"Unknown optimizer.schedule {config.schedule!r}; valid: "
                   "'constant', 'cosine'.")


def make_optimizer(config, num_steps: int):
  """AdamW (or Adam) with its schedule and optional global-norm clipping.

  Returns the optax transformation and the schedule (for logging).
  """
  schedule = make_lr_schedule(config, num_steps)
  if config.name == "adamw":
    tx = optax.adamw(schedule, config.b1, config.b2, config.eps,
                     weight_decay=config.weight_decay)
  elif config.name == "adam":
    tx = optax.adam(schedule, config.b1, config.b2, config.eps)
  else:
    raise ValueError(f"Unknown optimizer.name {config.name!r}; valid: "
                     "'adamw', 'adam'.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule


def init_state(rng, model, tx, input_shape, ema_decays,
               with_target: bool = False) -> TrainState:
  z = jnp.zeros((1, *input_shape), jnp.float32)
  t = jnp.ones((1,), jnp.float32)
  params = model.init(rng, z, t, t, jnp.zeros((1,), jnp.int32))["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      step=zero, params=params, opt_state=tx.init(params),
      ema_params={ema_key(d): params for d in ema_decays},
      target_params=params if with_target else {},
      nonfinite_step=zero, nonfinite_what=zero, skipped_steps=zero)


def abstract_state(model, tx, config, mesh):
  """Shapes and shardings of the train state, without allocating it."""
  init = functools.partial(init_state, model=model, tx=tx,
                           input_shape=model_input_shape(config.model),
                           ema_decays=config.training.ema_decays,
                           with_target=objectives.has_target(config))
  shapes = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.tree_shardings(
      shapes, mesh, config.mesh.get("fsdp_min_size", sharding.FSDP_MIN_SIZE))
  return init, shapes, shardings


def create_state(model, tx, config, mesh) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings (no host copy)."""
  init, _, shardings = abstract_state(model, tx, config, mesh)
  rng = jax.random.key(config.training.seed)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings
