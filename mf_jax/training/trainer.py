"""The training loop and the eval/sample entry points behind `main`.

`train_and_evaluate(config, workdir)` builds everything from the config,
checks what can be checked before compiling, resumes from the latest
checkpoint in `workdir/checkpoints`, and runs the jitted step with periodic
logging, sample grids, evaluation and checkpoints.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from mf_jax import checkpointing
from mf_jax import files
from mf_jax import models
from mf_jax import objectives
from mf_jax import preflight
from mf_jax import samplers
from mf_jax import sharding
from mf_jax.data import pipeline
from mf_jax.evaluation import evaluator as evaluator_lib
from mf_jax.evaluation import fid_eval
from mf_jax.evaluation import images
from mf_jax.models import vae
from mf_jax.training import state as state_lib
from mf_jax.training import resume
from mf_jax.training import signals as signals_lib
from mf_jax.training import step as step_lib
from mf_jax.training import teacher as teacher_lib
from mf_jax.training import throughput
from mf_jax.training import writers


class Experiment:
  """The pieces a config defines, built once and shared by every mode."""

  def __init__(self, config, workdir: str, devices=None):
    """`devices` default to jax.devices(); the plan tool passes a TPU
    topology's compile-only devices to compile for a slice it lacks."""
    self.config = config
    self.workdir = workdir
    # Cheap validation first: a bad name fails before any compilation.
    preflight.validate_config(config)
    self.objective = objectives.validate(config)
    fid_eval.check_files(config)  # opens VAE/Inception/statistics files
    teacher_lib.check(config)
    for schedule in (*config.eval.nfe, sample_schedule(config)):
      samplers.parse_schedule(schedule)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.training.batch_size, self.mesh)
    self.model = models.build_model(config.model)
    self.u_fn = state_lib.make_u_fn(self.model)
    self.tx, self.schedule = state_lib.make_optimizer(
        config.optimizer, config.training.num_steps)
    self.init_fn, shapes, self.state_shardings = state_lib.abstract_state(
        self.model, self.tx, config, self.mesh)
    self.abstract_state = checkpointing.abstract_with_shardings(
        shapes, self.state_shardings)
    self.input_shape = state_lib.model_input_shape(config.model)

  @functools.cached_property
  def checkpointer(self) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
        os.path.join(files.absolute(self.workdir), "checkpoints"),
        self.config.checkpoint.max_to_keep, self.config.checkpoint.async_save)

  @functools.cached_property
  def teacher(self):
    """(apply, frozen): the distillation teacher, loaded on first use."""
    return teacher_lib.load(self.config, self.mesh)

  def jit_train_step(self, checked=False):
    """The jitted step; `checked` adds the exact check of the updated
    parameters and the gradient and parameter norms (training/step.py):
    the program of the steps whose state is logged or read."""
    teacher_apply, frozen = self.teacher
    training = self.config.training
    return step_lib.jit_train_step(
        objectives.make_loss_fn(self.config, self.u_fn), self.tx,
        self.schedule, self.state_shardings, self.mesh,
        objectives.make_target_update(self.config), teacher_apply,
        jax.tree.map(lambda a: a.sharding, frozen),
        donate=step_lib.donates_state(training.donate_state, self.mesh),
        checked=checked, drop_nonfinite=training.on_nonfinite == "skip")

  def abstract_batch(self, batch_size=None):
    """Shapes and shardings of a global batch, for ahead-of-time lowering."""
    batch_size = batch_size or self.config.training.batch_size
    batch_sharding = sharding.batch_sharding(self.mesh)
    batch = {
        "x": jax.ShapeDtypeStruct((batch_size, *self.input_shape),
                                  jnp.float32, sharding=batch_sharding),
        "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                  sharding=batch_sharding),
    }
    if self.config.data.get("pairs_dir"):  # a teacher's pairs: their noise
      batch["e"] = batch["x"]
    augment_dim = self.config.model.get("augment_dim", 0)
    if augment_dim:  # the pipeline adds EDM augmentation labels for it
      batch["augment_labels"] = jax.ShapeDtypeStruct(
          (batch_size, augment_dim), jnp.float32, sharding=batch_sharding)
    return batch

  def lower_train_step(self, batch_size=None, checked=False):
    """The train step lowered from abstract shapes: nothing is allocated
    (but a teacher's parameters, which are read)."""
    rng = jax.eval_shape(jax.random.key, 0)
    return self.jit_train_step(checked).lower(
        self.abstract_state, self.abstract_batch(batch_size), rng,
        teacher_lib.abstract(self.teacher[1]))

  def compile_train_step(self, batch_size=None, checked=False):
    """(step(state, batch, rng) -> (state, metrics), the compiled program):
    the call binds the frozen parameters; the program gives FLOPs/memory."""
    compiled = self.lower_train_step(batch_size, checked).compile()
    frozen = self.teacher[1]
    return (lambda state, batch, rng: compiled(state, batch, rng, frozen),
            compiled)

  def new_state(self):
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)(
        jax.random.key(self.config.training.seed))

  def restore(self, step=None):
    """(state, step) of checkpoint `step` (default: the latest readable),
    or (None, 0); reads only: damaged checkpoints are passed over, not
    moved (training's resume moves them aside)."""
    return resume.restore(self.checkpointer, self.abstract_state,
                          self.config, step=step, repair=False)

  def eval_params(self, state):
    """The parameters evaluation uses: an EMA copy unless ema_decay == 0."""
    decay = self.config.eval.ema_decay
    if decay == 0:
      return state.params
    if decay < 0:
      return next(iter(state.ema_params.values()))
    return state.ema_params[state_lib.ema_key(decay)]

  def make_evaluator(self):
    return evaluator_lib.Evaluator(self.config, self.u_fn, self.mesh,
                                   self.input_shape)


def sample_schedule(config) -> int | str:
  """The grids' schedule: sample.timesteps if set, else sample.nfe steps."""
  return config.sample.get("timesteps") or config.sample.nfe


def evaluate(exp: Experiment, state, step: int, evaluator) -> dict:
  """Scores the eval parameters and writes WORKDIR/eval/<step>.json."""
  rng = jax.random.key(exp.config.training.seed + 1)
  params = exp.eval_params(state)
  results = evaluator(params, rng)
  if exp.config.eval.inception:
    results.update(_fid_results(exp, params, step))
  files.write_json(os.path.join(exp.workdir, "eval", f"{step}.json"), results)
  return results


def _fid_results(exp: Experiment, params, step: int) -> dict:
  """FID and Inception Score at each eval NFE, from eval.num_samples
  class-balanced samples; each NFE's full record (weights, statistics,
  sample count) is WORKDIR/eval/fid_<step>_nfe<N>.json."""
  c = exp.config
  results = {}
  for nfe in c.eval.nfe:
    record = fid_eval.score_params(
        c, exp.u_fn, exp.mesh, exp.input_shape, params, step,
        workdir=exp.workdir, inception_path=c.eval.inception,
        ref_stats_path=c.eval.ref_stats, num_samples=c.eval.num_samples,
        nfe=nfe, vae_path=c.data.vae or None, batch_size=c.eval.batch_size,
        seed=c.training.seed)
    name = samplers.schedule_name(nfe)
    results[f"{name}/fid"] = record["fid"]
    results[f"{name}/inception_score"] = record["inception_score"]
  return results


def save_sample_grid(exp: Experiment, state, step: int, evaluator,
                     nfe: int | str | None = None) -> str | None:
  """A PNG of samples: a class-balanced grid of images (latents decoded by
  the VAE of `data.vae`), or a 2-D density. Returns its path, or None."""
  nfe = nfe or sample_schedule(exp.config)
  size = exp.config.sample.grid_size
  rng = jax.random.key(exp.config.training.seed + 2)
  if evaluator.kind == "toy2d":
    points, _ = evaluator.generate(exp.eval_params(state), rng, 20_000, nfe,
                                   "random")
    picture = images.density_image(points)
  else:
    samples, _ = evaluator.generate(exp.eval_params(state), rng, size * size,
                                    nfe, "balanced")
    if evaluator.kind == "latents":
      if not exp.config.data.vae:
        logging.warning("No sample grid at step %d: latent samples need the "
                        "VAE to be seen (--config.data.vae=FILE).", step)
        return None
      decode_fn, vae_params = vae.load_latent_decoder(exp.config.data.vae)
      samples = np.asarray(decode_fn(vae_params, samples))
    picture = images.image_grid(samples, columns=size,
                                scale=max(1, 64 // samples.shape[1]))
  path = os.path.join(exp.workdir, "samples",
                      f"{step}_{samplers.schedule_name(nfe)}.png")
  if jax.process_index() == 0:
    images.save_png(path, picture)
  return path


class SaveSchedule:
  """When to checkpoint: every `checkpoint.every_steps`, once early at
  `checkpoint.first_step`, at the last step, and once `every_secs` have
  passed since the last save. Time is read at log steps only, and process
  0's reading decides for every host (their clocks and speeds differ)."""

  def __init__(self, config):
    self.every = config.checkpoint.every_steps
    self.first = config.checkpoint.first_step
    self.every_secs = config.checkpoint.every_secs
    self.num_steps = config.training.num_steps
    self.saved()

  def saved(self):
    self._last = time.monotonic()

  def by_step(self, step: int) -> bool:
    """Whether `step` is a save step by its number alone (not by time)."""
    return step == self.num_steps or step == self.first or (
        self.every > 0 and step % self.every == 0)

  def due(self, step: int, log_step: bool) -> bool:
    if self.by_step(step):
      return True
    if not (self.every_secs > 0 and log_step):
      return False
    late = time.monotonic() - self._last >= self.every_secs
    if jax.process_count() > 1:
      late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
    return late


def checkpoint_meta(exp: Experiment, state, step: int) -> dict:
  """The record saved beside the state: see `checkpointing`."""
  digest, finite = checkpointing.fingerprint(state)
  if not finite:
    raise checkpointing.CheckpointError(
        f"The state at step {step} is not finite; not saving it.")
  return {"step": step, "fingerprint": digest,
          "tree": checkpointing.leaf_signatures(exp.abstract_state),
          "config": json.loads(exp.config.to_json_best_effort()),
          "process_count": jax.process_count()}


def check_finite(config, metrics, step: int):
  """Raises at the first non-finite step (policy 'stop'); `metrics` are
  host values that carry the state's non-finite record."""
  bad_step = int(metrics["nonfinite_step"])
  if bad_step and config.training.on_nonfinite == "stop":
    raise step_lib.NonFiniteError(step_lib.nonfinite_message(
        bad_step, int(metrics["nonfinite_what"]),
        metrics if bad_step == step else None))


def guarded(config, what: str, fn, *args):
  """Runs a sample grid or an evaluation; an error is logged with its
  traceback and training goes on (eval.errors_fatal=True re-raises)."""
  try:
    return fn(*args)
  except Exception:  # pylint: disable=broad-except
    if config.eval.errors_fatal:
      raise
    logging.exception("%s failed; training goes on (the checkpoint of this "
                      "step is saved; set eval.errors_fatal=True to stop "
                      "instead).", what)
    return None


def train_and_evaluate(config, workdir: str, step: int | None = None,
                       start_fresh: bool = False):
  """Trains (resuming if possible) and returns the last eval results.

  `step` resumes from that checkpoint instead of the latest (later ones are
  moved aside); `start_fresh` archives checkpoints that cannot be resumed
  (another config's shapes, or none readable) and starts from scratch.
  """
  exp = Experiment(config, workdir)
  state, start_step = resume.restore(
      exp.checkpointer, exp.abstract_state, config, step=step,
      start_fresh=start_fresh)
  num_steps = config.training.num_steps
  if state is None:
    state = exp.new_state()
  elif start_step >= num_steps:
    logging.warning("Checkpoint step %d >= training.num_steps=%d: nothing to "
                    "train (raise --config.training.num_steps to go on).",
                    start_step, num_steps)
    exp.checkpointer.close()
    return {}
  else:
    logging.info("Resumed from step %d.", start_step)
  # The run's config beside its checkpoints, so tools (export) rebuild it.
  files.write_json(os.path.join(workdir, "config.json"),
                   json.loads(config.to_json_best_effort()))
  data_iterator = pipeline.make_train_iterator(
      config, sharding.process_batch_rows(exp.mesh, config.training.batch_size),
      start_step)
  with signals_lib.StopSignals() as signals:
    try:
      return _train_loop(exp, state, start_step, data_iterator, signals)
    except Exception:
      _finish_pending_saves(exp.checkpointer)
      raise


def _finish_pending_saves(checkpointer):
  """Lets saves already under way (of good states) land before the error
  that stops the run propagates; their own failure is logged, not raised
  over the error that is on its way."""
  try:
    checkpointer.wait()
  except Exception:  # pylint: disable=broad-except
    logging.exception("A pending checkpoint save failed as well.")


def _train_loop(exp: Experiment, state, start_step: int, data_iterator,
                signals: signals_lib.StopSignals) -> dict:
  config, workdir = exp.config, exp.workdir
  rng = jax.jit(functools.partial(jax.random.key, config.training.seed),
                out_shardings=sharding.replicated(exp.mesh))()
  evaluator = exp.make_evaluator()  # checks eval.batch_size first
  # Compiled ahead of time from the abstract shapes: its FLOPs give the
  # model FLOPs utilisation, and a shape or sharding that does not fit
  # fails here, not at step one.
  log_every = config.training.log_every_steps
  train_step, compiled = exp.compile_train_step(checked=log_every == 1)
  # Steps whose state is logged, saved, sampled or evaluated run a second
  # program that also checks the updated parameters and computes the norms:
  # every step, that would cost 5-8 % (training/step.py).
  checked_train_step = (train_step if log_every == 1
                        else exp.compile_train_step(checked=True)[0])
  speed = throughput.StepRate(
      exp.mesh, throughput.compiled_flops(compiled), start_step)
  profile = throughput.ProfileWindow.from_config(config.profile, workdir)
  evaluating = evaluator.scores_samples or bool(config.eval.inception)
  if config.eval.every_steps and not evaluating:
    logging.warning("No evaluation: %s samples have no score without FID "
                    "(set eval.inception and eval.ref_stats).",
                    config.data.name)
  batch_sharding = sharding.batch_sharding(exp.mesh)
  writer = writers.create_writer(workdir)
  # Progress and ETA in the log; the scalars come from `speed`.
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.training.num_steps)
  schedule = SaveSchedule(config)
  num_steps, results = config.training.num_steps, {}

  def every(n, step):
    return n > 0 and (step % n == 0 or step == num_steps)

  previous_metrics = None
  for step in range(start_step + 1, num_steps + 1):
    batch = pipeline.to_global(next(data_iterator), batch_sharding)
    profile.before_step(step, wait_for=state)
    log_step = every(log_every, step)
    sampling = every(config.sample.every_steps, step)
    scoring = evaluating and every(config.eval.every_steps, step)
    checked = log_step or sampling or scoring or schedule.by_step(step)
    state, metrics = (checked_train_step if checked else train_step)(
        state, batch, rng)
    # At most two steps in flight: the device stays busy, the host never runs
    # far ahead (XLA:CPU's fake devices can deadlock in collectives when many
    # executions are queued).
    jax.block_until_ready(previous_metrics)
    previous_metrics = metrics
    progress(step)
    if log_step:
      metrics = jax.device_get(metrics)
      check_finite(config, metrics, step)
      writer.write_scalars(step, {**metrics, **speed.measure(step)})
      writer.flush()
      exp.checkpointer.check_for_errors()
    stop = signals.stop_at(step)
    saving = schedule.due(step, log_step) or stop
    if (saving or sampling or scoring) and not log_step:
      # Policy 'stop' keeps a non-finite step's update (training/step.py):
      # the run ends here, before anything reads that state. (A stop
      # signal at an unchecked step leaves the parameters' check to
      # `checkpoint_meta`.)
      check_finite(config, jax.device_get(metrics), step)
    if saving:
      exp.checkpointer.save(step, state, checkpoint_meta(exp, state, step))
      schedule.saved()
    if stop:
      exp.checkpointer.wait()
      logging.warning("Stop signal: saved step %d, exiting.", step)
      break
    if sampling:
      guarded(config, f"Sample grid at step {step}", save_sample_grid, exp,
              state, step, evaluator)
    if scoring:
      results = guarded(config, f"Evaluation at step {step}", evaluate, exp,
                        state, step, evaluator) or results
      writer.write_scalars(step, results)
  profile.close(wait_for=state)
  exp.checkpointer.wait()
  exp.checkpointer.close()
  writer.close()
  return results


def _restore_for_inference(exp: Experiment, step: int | None):
  state, step = exp.restore(step=step)
  if state is None:
    raise FileNotFoundError(
        f"No checkpoint in {exp.workdir}/checkpoints; train first.")
  return state, step


def evaluate_checkpoint(config, workdir: str, step: int | None = None):
  """The 'eval' mode: scores a saved checkpoint (latest by default)."""
  preflight.check_writable(os.path.join(workdir, "eval"), "evaluation results")
  if config.eval.num_samples < 1:
    raise ValueError(f"eval.num_samples={config.eval.num_samples}: "
                     "--mode=eval needs at least 1.")
  exp = Experiment(config, workdir)
  state, step = _restore_for_inference(exp, step)
  results = evaluate(exp, state, step, exp.make_evaluator())
  exp.checkpointer.close()
  return results


def sample_checkpoint(config, workdir: str, step: int | None = None,
                      nfe: int | str | None = None) -> str | None:
  """The 'sample' mode: writes a PNG of samples from a saved checkpoint."""
  preflight.check_writable(os.path.join(workdir, "samples"), "sample grids")
  exp = Experiment(config, workdir)
  state, step = _restore_for_inference(exp, step)
  path = save_sample_grid(exp, state, step, exp.make_evaluator(), nfe)
  exp.checkpointer.close()
  return path
