"""The train step: loss, gradient, optimizer update and EMA, one jit."""

import functools

import jax
import jax.numpy as jnp
import optax

from mf_jax import objectives
from mf_jax import sharding
from mf_jax.training.state import TrainState

NONFINITE_LOSS, NONFINITE_GRAD, NONFINITE_PARAMS = 1, 2, 4


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss, gradient or parameter."""


def train_step(state: TrainState, batch, rng, frozen, *, loss_fn, tx,
               schedule, target_update=None, teacher_apply=None,
               checked=True, drop_nonfinite=True):
  """One update. The step is folded into the RNG, so a resumed run draws
  the same noise and times as an uninterrupted one.

  Non-finite values are recorded in the state without a host sync: the
  first step whose loss, or (in a `checked` step) updated parameters, are
  not finite, and which (`nonfinite_step`, `nonfinite_what`). The host
  reads the record at log steps and before the state is saved, sampled or
  evaluated, and the trainer runs those steps `checked`. With
  `drop_nonfinite` (policy 'skip') every step is checked and a bad step
  changes nothing but the step counter and the record (a select over the
  state drops its update), so the run goes on from finite values. Policy
  'stop' keeps the update: the run ends at the next read, before the state
  is used. Non-finite parameters that leave the loss finite are then named
  at that read, not at their own step; a non-finite gradient reaches the
  parameters through Adam (m and v turn non-finite, the update is NaN even
  at lr 0).

  `checked` adds the exact check of the updated parameters (leaf by leaf:
  a norm overflows to inf while every value is still finite) and the
  gradient and parameter norms (naming a non-finite gradient). The other
  steps skip them because each is a reduction over a whole tree that XLA
  does not fuse into the update, so it reads the tree once more. DiT-B/4
  batch 8, MeanFlow with guidance, XLA:CPU, step time over the reference
  structure's (one process, 10 interleaved rounds): loss check only 0.936,
  with the parameter check 0.955, with or without the select. DiT-S/4
  batch 8, flow matching: no checks 0.88-0.89, the checks 0.90, the
  gradient norm alone 0.92, checks and both norms 0.95-0.96. Norms behind
  a `lax.cond` cost more than computing them (the operands are copied).
  """
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  teacher = teacher_weak = None
  if teacher_apply is not None:  # frozen parameters, never differentiated
    teacher = functools.partial(teacher_apply,
                                jax.lax.stop_gradient(frozen["teacher"]))
    if getattr(teacher_apply, "weak", None) is not None:  # autoguidance
      teacher_weak = functools.partial(
          teacher_apply.weak, jax.lax.stop_gradient(frozen["teacher_weak"]))
  context = objectives.Context(step=state.step, ema_params=state.ema_params,
                               target_params=state.target_params,
                               teacher=teacher, teacher_weak=teacher_weak)
  (loss, metrics), grads = grad_fn(state.params, batch, rng, context)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = {key: optax.incremental_update(params, ema, 1.0 - float(key))
                for key, ema in state.ema_params.items()}
  target_params = state.target_params
  if target_update is not None:
    target_params = target_update(target_params, params, state.step)
  metrics = dict(metrics, lr=schedule(state.step))
  bad = {NONFINITE_LOSS: ~jnp.isfinite(loss)}
  if checked or drop_nonfinite:
    bad[NONFINITE_PARAMS] = ~_all_finite(params)
  if checked:  # the gradient's bit only names the cause
    metrics.update(grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    bad[NONFINITE_GRAD] = ~jnp.isfinite(metrics["grad_norm"])
  finite = ~(bad[NONFINITE_LOSS] | bad.get(NONFINITE_PARAMS, False))
  what = jnp.where(finite, 0, sum(bit * b for bit, b in bad.items()))
  skipped = jnp.zeros((), jnp.int32)
  if drop_nonfinite:
    params, opt_state, ema_params, target_params = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o),
        (params, opt_state, ema_params, target_params),
        (state.params, state.opt_state, state.ema_params,
         state.target_params))
    skipped = (~finite).astype(jnp.int32)
  step = state.step + 1
  first = (state.nonfinite_step == 0) & ~finite
  new_state = TrainState(
      step=step, params=params, opt_state=opt_state,
      ema_params=ema_params, target_params=target_params,
      nonfinite_step=jnp.where(first, step, state.nonfinite_step),
      nonfinite_what=jnp.where(first, what, state.nonfinite_what),
      skipped_steps=state.skipped_steps + skipped)
  metrics.update(skipped_steps=new_state.skipped_steps,
                 nonfinite_step=new_state.nonfinite_step,
                 nonfinite_what=new_state.nonfinite_what)
  return new_state, metrics


def _all_finite(tree) -> jax.Array:
  """Whether every value is finite, as one float sum per leaf: x * 0 is 0
  or NaN, so the sum is NaN exactly where a value is not finite and never
  overflows; XLA:CPU fuses it with its producer (an is-finite + all
  materialized a boolean copy of the tree)."""
  return jnp.isfinite(sum(jnp.sum(x * 0) for x in jax.tree.leaves(tree)))


def nonfinite_message(step: int, what: int, values: dict | None = None) -> str:
  """One line: which quantity stopped being finite, and at which step."""
  names = [n for bit, n in ((NONFINITE_LOSS, "loss"),
                            (NONFINITE_GRAD, "gradient"),
                            (NONFINITE_PARAMS, "updated parameters"))
           if what & bit]
  shown = ""
  if values:
    shown = " (" + ", ".join(f"{k}={values[k]}" for k in ("loss", "grad_norm")
                             if k in values) + ")"
  return (f"Non-finite {' and '.join(names) or 'value'} at step {step}"
          f"{shown}; no non-finite state was saved. Lower optimizer.lr "
          "(or set optimizer.grad_clip_norm), or set "
          "training.on_nonfinite=skip to skip such steps.")


def on_cpu(mesh) -> bool:
  return all(d.platform == "cpu" for d in mesh.devices.flat)


def donates_state(setting: str, mesh) -> bool:
  """training.donate_state: 'auto' donates on accelerators (the state's
  memory is reused in place) but not on CPU, where a donated step takes a
  fresh buffer of 1-2x the parameters from the OS every step and ran ~13 %
  slower (issue 15's measurement, DiT-S/4 batch 8)."""
  if setting == "auto":
    return not on_cpu(mesh)
  return setting == "always"


def jit_train_step(loss_fn, tx, schedule, state_shardings, mesh,
                   target_update=None, teacher_apply=None,
                   frozen_shardings=None, donate=True, checked=True,
                   drop_nonfinite=True):
  """The jitted step(state, batch, rng, frozen) with explicit shardings
  (the state donated if `donate`, checks and norms as `train_step` says);
  `frozen` holds parameters the step reads but never changes (a
  distillation teacher's), {} for most objectives."""
  def step(state, batch, rng, frozen):
    return train_step(state, batch, rng, frozen, loss_fn=loss_fn, tx=tx,
                      schedule=schedule, target_update=target_update,
                      teacher_apply=teacher_apply, checked=checked,
                      drop_nonfinite=drop_nonfinite)

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    replicated, frozen_shardings or {}),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,) if donate else ())
