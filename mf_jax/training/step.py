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
               norms=True):
  """One update. The step is folded into the RNG, so a resumed run draws
  the same noise and times as an uninterrupted one.

  A step whose loss or updated parameters are not finite changes nothing
  but the step counter and the non-finite record (both `on_nonfinite`
  policies drop its update): the state stays finite, so it can never be
  saved poisoned, and the host learns of it from one scalar it reads at
  log and save steps. The gradients are not checked on their own: Adam
  carries a non-finite gradient into every parameter it touches (m and v
  turn non-finite, the update is NaN even at lr 0), so the check of the
  updated parameters catches it.

  `norms` adds the gradient and parameter norms to the metrics (and names
  a non-finite gradient as the cause). The trainer runs that variant only
  at log steps, where the metrics are read: a reduction over the
  gradients costs ~4 % of a step, because the gradients then have a
  second reader besides the Adam update (DiT-S/4 batch 8, XLA:CPU, step
  time over the reference structure's, one process, 16 interleaved
  rounds: no checks 0.88-0.89, the checks 0.90, the gradient norm alone
  0.92, the checks and both norms 0.95-0.96; a finiteness sum over the
  gradients cost as much as their norm, one over the optimizer state
  more). Norms
  behind a `lax.cond` cost more than computing them (the operands are
  copied). One sum of squares of the updated parameters for both their
  norm and the check flags finite parameters whose squares overflow, so
  the check stays exact.
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
  new = (params, opt_state, ema_params, target_params)
  old = (state.params, state.opt_state, state.ema_params,
         state.target_params)
  # The decision leaf by leaf, not through the parameter norm: a norm
  # overflows to inf while every value is still finite.
  bad = {NONFINITE_LOSS: ~jnp.isfinite(loss),
         NONFINITE_PARAMS: ~_all_finite(params)}
  metrics = dict(metrics, lr=schedule(state.step))
  if norms:  # the gradient's bit only names the cause
    metrics.update(grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    bad[NONFINITE_GRAD] = ~jnp.isfinite(metrics["grad_norm"])
  finite = ~(bad[NONFINITE_LOSS] | bad[NONFINITE_PARAMS])
  what = jnp.where(finite, 0, sum(bit * b for bit, b in bad.items()))
  params, opt_state, ema_params, target_params = jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  step = state.step + 1
  first = (state.nonfinite_step == 0) & ~finite
  new_state = TrainState(
      step=step, params=params, opt_state=opt_state,
      ema_params=ema_params, target_params=target_params,
      nonfinite_step=jnp.where(first, step, state.nonfinite_step),
      nonfinite_what=jnp.where(first, what, state.nonfinite_what),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
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
          f"{shown}; its update was dropped and no non-finite state was "
          "saved. Lower optimizer.lr (or set optimizer.grad_clip_norm), or "
          "set training.on_nonfinite=skip to skip such steps.")


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
                   frozen_shardings=None, donate=True, norms=True):
  """The jitted step(state, batch, rng, frozen) with explicit shardings
  (the state donated if `donate`, the norms computed if `norms`); `frozen`
  holds parameters the step reads but never changes (a distillation
  teacher's), {} for most objectives."""
  def step(state, batch, rng, frozen):
    return train_step(state, batch, rng, frozen, loss_fn=loss_fn, tx=tx,
                      schedule=schedule, target_update=target_update,
                      teacher_apply=teacher_apply, norms=norms)

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    replicated, frozen_shardings or {}),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,) if donate else ())
