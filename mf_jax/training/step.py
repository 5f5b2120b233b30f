"""The train step: loss, gradient, optimizer update and EMA, one jit."""

import jax
import optax

from mf_jax import sharding
from mf_jax.training.state import TrainState


def train_step(state: TrainState, batch, rng, *, loss_fn, tx, schedule):
  """One update. The step is folded into the RNG, so a resumed run draws
  the same noise and times as an uninterrupted one."""
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = {
      key: optax.incremental_update(params, ema, 1.0 - float(key))
      for key, ema in state.ema_params.items()}
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params),
                 lr=schedule(state.step))
  new_state = TrainState(step=state.step + 1, params=params,
                         opt_state=opt_state, ema_params=ema_params)
  return new_state, metrics


def jit_train_step(loss_fn, tx, schedule, state_shardings, mesh):
  """The jitted step with donated state and explicit shardings."""
  def step(state, batch, rng):
    return train_step(state, batch, rng, loss_fn=loss_fn, tx=tx,
                      schedule=schedule)

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)
