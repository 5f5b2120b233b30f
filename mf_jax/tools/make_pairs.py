r"""A teacher's (noise, sample, label) pairs, for reflow and distillation.

  python -m mf_jax.tools.make_pairs --teacher=FILE --num=N --output=DIR \
      [--solver=ode|eulerN|heunN] [--batch=B] [--seed=S] \
      [--labels=random|balanced] [--cfg_scale=S] [--shard_size=K]

Integrates the probability-flow ODE of an exported network (its velocity
u(z, t, h = 0, y), guided with --cfg_scale) from noise e at t = 1 to a
sample x at t = 0, and writes the pairs as ArrayRecord shards that
`data.pairs_dir=DIR` trains on (data/pairs.py has the layout). The default
solver is the adaptive Dopri5 of the evaluator's 'ode' reference, run per
pair (each row its own step sizes, to --rtol/--atol); 'eulerN' and 'heunN'
take N uniform steps.

Pair i is a function of (--seed, i) alone: its noise and label are drawn
from fold_in(key(seed), i) (or i mod classes with --labels=balanced) and
its solve involves no other row. So the output does not depend on --batch,
on the number of devices or hosts, nor on interruptions (noise and labels
to the bit; samples to the solver's tolerance, as another batch shape may
round differently in the last bit and the adaptive steps follow). Shard
k holds pairs k * shard_size, ...; process p of P computes shards p,
p + P, ... on its own devices (the batch split over them: hosts never
wait for each other); a shard is written under a temporary name and
renamed when complete, and finished shards are skipped, so rerunning the
same command after a kill finishes the set without a pair lost or made
twice.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app
from absl import flags
from absl import logging
from etils import epath

from mf_jax import distributed
from mf_jax import export
from mf_jax import samplers
from mf_jax import sharding
from mf_jax.data import latents
from mf_jax.data import pairs
from mf_jax.tools import prepare_latents
from mf_jax.training import state as state_lib
from mf_jax.training import teacher as teacher_lib

# Manifest fields that must agree with an existing output before resuming
# (--batch is not one: it changes no pair).
RESUME_KEYS = ("teacher_sha256", "cfg_scale", "solver", "rtol", "atol",
               "seed", "labels", "num_pairs", "shard_size", "shape",
               "num_classes")


def parse_solver(spec: str) -> samplers.Solver:
  """'ode', 'eulerN' or 'heunN' (samplers.Solver), else one line."""
  try:
    parsed = samplers.parse_schedule(spec)
  except ValueError:
    parsed = None
  if not isinstance(parsed, samplers.Solver):
    raise ValueError(f"--solver={spec!r}: use 'ode' (adaptive Dopri5), "
                     "'eulerN' or 'heunN' (N uniform steps).")
  return parsed


def pair_inputs(seed: int, indices, shape, num_classes: int, labels: str):
  """The noise (B, *shape) and labels (B,) of global pair `indices`: each
  a function of (seed, index) only, wherever the row is computed."""
  if labels not in samplers.LABEL_MODES:
    raise ValueError(f"--labels={labels!r}; valid: {samplers.LABEL_MODES}.")
  key = jax.random.key(seed)

  def one(index):
    key_i = jax.random.fold_in(key, index)
    noise = jax.random.normal(jax.random.fold_in(key_i, 0), shape)
    if num_classes == 0:
      label = jnp.int32(0)
    elif labels == "random":
      label = jax.random.randint(jax.random.fold_in(key_i, 1), (), 0,
                                 num_classes, jnp.int32)
    else:
      label = (index % num_classes).astype(jnp.int32)
    return noise, label

  return jax.vmap(one)(indices)


def solve(u_fn, params, noise, labels, solver: samplers.Solver,
          rtol: float = samplers.ODE_RTOL, atol: float = samplers.ODE_ATOL):
  """Samples x at t = 0 of the ODE dz/dt = u(z, t, 0, y) from z = noise at
  t = 1; returns (x, nfe per row, finished per row). The adaptive solve
  runs per row (vmapped): each pair gets its own step sizes, so no pair
  depends on the others in its batch."""
  if solver.method != "ode":
    x, stats = samplers.sample(u_fn, params, noise, labels, solver.name,
                               "euler")
    ones = jnp.ones(labels.shape, jnp.int32)
    return x, stats["nfe"] * ones, ones.astype(bool)

  def one(z, y):
    x, stats = samplers.ode_sample(u_fn, params, z[None], y[None], rtol,
                                   atol)
    return x[0], stats["nfe"], stats["finished"]

  return jax.vmap(one)(noise, labels)


def make_generate(u_fn, mesh, param_shardings, shape, num_classes: int,
                  seed: int, labels: str, solver: samplers.Solver,
                  rtol: float, atol: float):
  """Jitted (params, indices) -> (noise, sample, label, nfe, finished),
  the indices and every output split over the mesh's devices."""
  batch_sharding = sharding.batch_sharding(mesh)

  def generate(params, indices):
    noise, y = pair_inputs(seed, indices, shape, num_classes, labels)
    x, nfe, finished = solve(u_fn, params, noise, y, solver, rtol, atol)
    return noise, x, y, nfe, finished

  return jax.jit(generate, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def load_teacher(path: str, cfg_scale: float, mesh):
  """(u_fn(params, z, t, h, y, train), params on the mesh, meta) of an
  export, guided as a distillation teacher is (training/teacher.py)."""
  config = ml_collections.ConfigDict(dict(  # no student: model is empty
      objective=dict(teacher=path, teacher_cfg_scale=cfg_scale), model={},
      mesh=dict(fsdp_min_size=sharding.FSDP_MIN_SIZE)))
  teacher_lib.check(config)
  apply, frozen = teacher_lib.load(config, mesh)

  def u_fn(params, z, t, h, y, train):
    del train
    return apply(params, z, t, h, y)

  return u_fn, frozen["teacher"], export.read_meta(path)


def make_pairs(u_fn, params, output: str, num: int, shape, num_classes: int,
               mesh, solver: str = "ode", batch: int = 256, seed: int = 0,
               labels: str = "random", shard_size: int = 4096,
               rtol: float = samplers.ODE_RTOL,
               atol: float = samplers.ODE_ATOL, record=None) -> dict:
  """Writes this process's missing shards of `num` pairs of the field
  `u_fn` (params on `mesh`, this process's devices) into `output`;
  returns the manifest. `record` adds fields to the manifest (the
  teacher's file and checksum)."""
  parsed = parse_solver(solver)
  if num < 1 or shard_size < 1:
    raise ValueError(f"--num={num} and --shard_size={shard_size} must be "
                     "at least 1.")
  if batch < 1 or batch % mesh.size:
    raise ValueError(f"--batch={batch} must be a positive multiple of the "
                     f"{mesh.size} local devices.")
  num_shards = -(-num // shard_size)
  manifest = {
      "teacher": "", "teacher_sha256": "", "cfg_scale": 1.0,
      **(record or {}),
      "solver": parsed.name, "rtol": rtol if parsed.method == "ode" else 0,
      "atol": atol if parsed.method == "ode" else 0, "seed": seed,
      "labels": labels if num_classes else "none", "num_pairs": num,
      "shard_size": shard_size, "num_shards": num_shards,
      "shape": list(shape), "num_classes": num_classes, "dtype": "float32",
  }
  epath.Path(output).mkdir(parents=True, exist_ok=True)
  prepare_latents.check_or_write_manifest(output, manifest, RESUME_KEYS)

  generate = make_generate(
      u_fn, mesh, jax.tree.map(lambda a: a.sharding, params), tuple(shape),
      num_classes, seed, labels, parsed, rtol, atol)
  mine = range(jax.process_index(), num_shards, jax.process_count())
  done = {p.name for p in epath.Path(output).iterdir()}
  todo = [k for k in mine if latents.shard_name(k, num_shards) not in done]
  logging.info("Process %d: %d of its %d shards to make.",
               jax.process_index(), len(todo), len(mine))
  count = lambda k: min(shard_size, num - k * shard_size)
  with tqdm.tqdm(total=sum(count(k) for k in todo), unit="pair",
                 disable=jax.process_index() != 0) as progress:
    for k in todo:
      indices = np.arange(k * shard_size, k * shard_size + count(k))
      noise, x, y, nfe = _shard(generate, params, indices, batch)
      progress.update(len(indices))
      progress.set_postfix(nfe=f"{nfe:.1f}")
      path = epath.Path(output) / latents.shard_name(k, num_shards)
      prepare_latents.write_shard(str(path), y, np.stack([noise, x], 1),
                                  np.float32)
  return manifest


def _shard(generate, params, indices: np.ndarray, batch: int):
  """One shard's noise, samples, labels (numpy, index order) and the mean
  NFE per pair; the last batch is padded with its last index (one compiled
  shape) and trimmed."""
  outputs, nfes = [], []
  for start in range(0, len(indices), batch):
    chunk = indices[start:start + batch]
    padded = np.pad(chunk, (0, batch - len(chunk)), mode="edge")
    noise, x, y, nfe, finished = jax.device_get(generate(params, padded))
    if not finished[:len(chunk)].all():
      raise RuntimeError(
          f"The adaptive ODE solve of pairs {chunk[0]}..{chunk[-1]} took more "
          f"than {samplers.ODE_MAX_STEPS} steps: the teacher's field is too "
          "stiff for --rtol/--atol; raise them or use --solver=eulerN.")
    outputs.append((noise[:len(chunk)], x[:len(chunk)], y[:len(chunk)]))
    nfes.append(nfe[:len(chunk)])
  noise, x, y = (np.concatenate(parts) for parts in zip(*outputs))
  return noise, x, y, float(np.mean(np.concatenate(nfes)))


def run(teacher: str, output: str, num: int, solver: str = "ode",
        batch: int = 256, seed: int = 0, labels: str = "random",
        cfg_scale: float = 1.0, shard_size: int = 4096,
        rtol: float = samplers.ODE_RTOL,
        atol: float = samplers.ODE_ATOL) -> dict:
  """make_pairs with an exported teacher on this process's devices."""
  parse_solver(solver)  # before the teacher is read
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                            devices=jax.local_devices())
  u_fn, params, meta = load_teacher(teacher, cfg_scale, mesh)
  model_config = export.model_config(meta)
  record = {"teacher": str(epath.Path(teacher).absolute()),
            "teacher_sha256": meta.get(export.CHECKSUM_KEY, ""),
            "cfg_scale": cfg_scale}
  return make_pairs(
      u_fn, params, output, num, state_lib.model_input_shape(model_config),
      model_config.get("num_classes", 0), mesh, solver=solver, batch=batch,
      seed=seed, labels=labels, shard_size=shard_size, rtol=rtol, atol=atol,
      record=record)


def main(argv):
  del argv
  distributed.initialize()
  manifest = run(_TEACHER.value, _OUTPUT.value, _NUM.value, _SOLVER.value,
                 _BATCH.value, _SEED.value, _LABELS.value, _CFG_SCALE.value,
                 _SHARD_SIZE.value, _RTOL.value, _ATOL.value)
  if jax.process_index() == 0:
    print(json.dumps({k: manifest[k] for k in (
        "num_pairs", "num_shards", "shape", "solver")}))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _TEACHER = flags.DEFINE_string("teacher", None, "An mf_jax export "
                                 "(.safetensors) whose ODE makes the pairs.")
  _NUM = flags.DEFINE_integer("num", None, "Number of pairs.")
  _OUTPUT = flags.DEFINE_string("output", None, "Directory for the shards "
                                "(local or gs://).")
  _SOLVER = flags.DEFINE_string("solver", "ode", "'ode' (adaptive Dopri5 "
                                "per pair), 'eulerN' or 'heunN'.")
  _BATCH = flags.DEFINE_integer("batch", 256, "Pairs per host per call; a "
                                "multiple of the local devices.")
  _SEED = flags.DEFINE_integer("seed", 0, "Pair i's noise and label come "
                               "from (seed, i).")
  _LABELS = flags.DEFINE_enum("labels", "random", list(samplers.LABEL_MODES),
                              "Labels of a class-conditional teacher: "
                              "uniform draws or i mod classes.")
  _CFG_SCALE = flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free "
                                  "guidance of the teacher (1: none).")
  _SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Pairs per shard.")
  _RTOL = flags.DEFINE_float("rtol", samplers.ODE_RTOL, "Relative tolerance "
                             "of --solver=ode.")
  _ATOL = flags.DEFINE_float("atol", samplers.ODE_ATOL, "Absolute tolerance "
                             "of --solver=ode.")
  flags.mark_flags_as_required(["teacher", "num", "output"])
  app.run(main)
