"""The training loop and the eval/sample entry points behind `main`.

`train_and_evaluate(config, workdir)` builds everything from the config,
checks what can be checked before compiling, resumes from the latest
checkpoint in `workdir/checkpoints`, and runs the jitted step with periodic
logging, sample grids, evaluation and checkpoints.
"""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from mf_jax import checkpointing
from mf_jax import models
from mf_jax import objectives
from mf_jax import samplers
from mf_jax import sharding
from mf_jax.data import pipeline
from mf_jax.evaluation import evaluator as evaluator_lib
from mf_jax.evaluation import images
from mf_jax.models import vae
from mf_jax.training import state as state_lib
from mf_jax.training import step as step_lib
from mf_jax.training import writers


class Experiment:
  """The pieces a config defines, built once and shared by every mode."""

  def __init__(self, config, workdir: str, devices=None):
    """`devices` default to jax.devices(); the plan tool passes a TPU
    topology's compile-only devices to compile for a slice it lacks."""
    self.config = config
    self.workdir = workdir
    # Cheap validation first: a bad name fails before any compilation.
    self.objective = objectives.validate(config.objective)
    check_local_files(config)
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
        os.path.join(absolute(self.workdir), "checkpoints"),
        self.config.checkpoint.max_to_keep, self.config.checkpoint.async_save)

  def jit_train_step(self):
    return step_lib.jit_train_step(
        objectives.make_loss_fn(self.config, self.u_fn), self.tx,
        self.schedule, self.state_shardings, self.mesh)

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
    augment_dim = self.config.model.get("augment_dim", 0)
    if augment_dim:  # the pipeline adds EDM augmentation labels for it
      batch["augment_labels"] = jax.ShapeDtypeStruct(
          (batch_size, augment_dim), jnp.float32, sharding=batch_sharding)
    return batch

  def lower_train_step(self, batch_size=None):
    """The train step lowered from abstract shapes: nothing is allocated."""
    rng = jax.eval_shape(jax.random.key, 0)
    return self.jit_train_step().lower(self.abstract_state,
                                       self.abstract_batch(batch_size), rng)

  def new_state(self):
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)(
        jax.random.key(self.config.training.seed))

  def restore(self, data_iterator=None, step=None):
    return self.checkpointer.restore(self.abstract_state, data_iterator, step)

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


def check_local_files(config):
  """Weights and statistics the config names exist, and FID has what it
  needs: one-line errors before anything compiles."""
  kind = pipeline.dataset_kind(config.data.name)
  files = {"data.vae": config.data.get("vae"),
           "eval.inception": config.eval.get("inception"),
           "eval.ref_stats": config.eval.get("ref_stats")}
  for field, path in files.items():
    if path and not os.path.exists(path):
      raise FileNotFoundError(f"{field}={path!r} does not exist; weights and "
                              "statistics are local files (no downloads).")
  if bool(files["eval.inception"]) != bool(files["eval.ref_stats"]):
    raise ValueError("FID needs both eval.inception (pytorch-fid's Inception "
                     "weights) and eval.ref_stats (reference statistics).")
  if files["eval.inception"] and kind == "latents" and not files["data.vae"]:
    raise ValueError("FID of latent samples needs data.vae=FILE (the SD-VAE "
                     "the latents were made with) to decode them.")


def absolute(workdir: str) -> str:
  """A local workdir made absolute (orbax wants that); URIs as they are."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def sample_schedule(config) -> int | str:
  """The grids' schedule: sample.timesteps if set, else sample.nfe steps."""
  return config.sample.get("timesteps") or config.sample.nfe


def write_json(path: str, record: dict):
  """Writes a JSON file atomically, on process 0 only; `path` may be local
  or a cloud URI such as gs://bucket/run/eval/1000.json (etils.epath)."""
  if jax.process_index() == 0:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def evaluate(exp: Experiment, state, step: int, evaluator) -> dict:
  """Scores the eval parameters and writes WORKDIR/eval/<step>.json."""
  rng = jax.random.key(exp.config.training.seed + 1)
  params = exp.eval_params(state)
  results = evaluator(params, rng)
  if exp.config.eval.inception:
    results.update(_fid_results(exp, params, step))
  write_json(os.path.join(exp.workdir, "eval", f"{step}.json"), results)
  return results


def _fid_results(exp: Experiment, params, step: int) -> dict:
  """FID and Inception Score at each eval NFE, from eval.num_samples
  class-balanced samples; each NFE's full record (weights, statistics,
  sample count) is WORKDIR/eval/fid_<step>_nfe<N>.json."""
  # Imported here: the FID driver builds on this module (Experiment).
  from mf_jax.evaluation import fid_eval  # pylint: disable=g-import-not-at-top
  c = exp.config
  results = {}
  for nfe in c.eval.nfe:
    record = fid_eval.score_params(
        exp, params, step, inception_path=c.eval.inception,
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


class _Preemption:
  """Decides when to save and exit early, at the same step on every host.

  One process: SIGTERM sets a flag the loop reads after each step.

  Several processes: `jax.distributed.initialize` starts JAX's preemption
  sync manager, which catches SIGTERM itself (so no Python handler is
  installed: it would replace the manager's), passes the notice through the
  coordination service to every host, and fixes one step for all of them
  (the largest step any host has reached, plus one). Asking
  `reached_preemption_sync_point(step)` every step is a local check: no
  device work and no host round trip until a notice arrives. It works on
  CPU (gloo) as on TPU and GPU. If the service is switched off
  (jax_enable_preemption_service=False), each host's SIGTERM flag is
  gathered from all hosts every step instead, a small collective per step.
  """

  def __init__(self):
    self._flag = False
    self._multi_host = jax.process_count() > 1
    self._sync_manager = self._multi_host and (
        jax.config.jax_enable_preemption_service)
    if not self._sync_manager:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def stop_at(self, step: int) -> bool:
    """Whether to save at `step` and stop; call it once for every step."""
    if self._sync_manager:
      return multihost_utils.reached_preemption_sync_point(step)
    if self._multi_host:
      flags = multihost_utils.process_allgather(np.int32(self._flag))
      return bool(np.any(flags))
    return self._flag


def train_and_evaluate(config, workdir: str):
  """Trains (resuming if possible) and returns the last eval results."""
  exp = Experiment(config, workdir)
  # The run's config beside its checkpoints, so tools (export) rebuild it.
  write_json(os.path.join(workdir, "config.json"),
              json.loads(config.to_json_best_effort()))
  data_iterator = pipeline.make_train_iterator(
      config, sharding.process_batch_rows(exp.mesh, config.training.batch_size))
  state, start_step = exp.restore(data_iterator)
  if state is None:
    state, start_step = exp.new_state(), 0
  else:
    logging.info("Resumed from step %d.", start_step)
  if jax.process_count() > 1:  # e.g. a host that could not read the latest
    multihost_utils.assert_equal(start_step, "Hosts resumed different steps.")
  rng = jax.random.key(config.training.seed)
  train_step = exp.jit_train_step()
  batch_sharding = sharding.batch_sharding(exp.mesh)
  evaluator = exp.make_evaluator()
  writer = writers.create_writer(workdir)
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.training.num_steps, writer=writer)
  preemption = _Preemption()
  num_steps, results = config.training.num_steps, {}

  def every(n, step):
    return n > 0 and (step % n == 0 or step == num_steps)

  previous_metrics = None
  for step in range(start_step + 1, num_steps + 1):
    batch = pipeline.to_global(next(data_iterator), batch_sharding)
    state, metrics = train_step(state, batch, rng)
    # At most two steps in flight: the device stays busy, the host never runs
    # far ahead (XLA:CPU's fake devices can deadlock in collectives when many
    # executions are queued).
    jax.block_until_ready(previous_metrics)
    previous_metrics = metrics
    progress(step)
    if every(config.training.log_every_steps, step):
      metrics = jax.device_get(metrics)
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"Loss is {metrics['loss']} at step {step}.")
      writer.write_scalars(step, metrics)
      writer.flush()
    if every(config.sample.every_steps, step):
      save_sample_grid(exp, state, step, evaluator)
    if every(config.eval.every_steps, step):
      results = evaluate(exp, state, step, evaluator)
      writer.write_scalars(step, results)
    stop = preemption.stop_at(step)
    if every(config.checkpoint.every_steps, step) or stop:
      exp.checkpointer.save(step, state, data_iterator, force=stop)
    if stop:
      logging.warning("SIGTERM: saved step %d, exiting.", step)
      break
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
  exp = Experiment(config, workdir)
  state, step = _restore_for_inference(exp, step)
  results = evaluate(exp, state, step, exp.make_evaluator())
  exp.checkpointer.close()
  return results


def sample_checkpoint(config, workdir: str, step: int | None = None,
                      nfe: int | str | None = None) -> str | None:
  """The 'sample' mode: writes a PNG of samples from a saved checkpoint."""
  exp = Experiment(config, workdir)
  state, step = _restore_for_inference(exp, step)
  path = save_sample_grid(exp, state, step, exp.make_evaluator(), nfe)
  exp.checkpointer.close()
  return path
