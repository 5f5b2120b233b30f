"""The device mesh and how arrays are laid out on it.

Axes: 'data' (pure data parallel) and 'fsdp' (data parallel whose devices
also split the large parameters, optimizer moments and EMA copies). The
batch is split over both. Small arrays are replicated: below
`mesh.fsdp_min_size` elements the all-gather costs more than the memory.

Everything is `jax.jit` over NamedShardings (no pmap): the same code runs
on one device, one host's devices, or every device of a multi-host job.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
FSDP_MIN_SIZE = 2**18  # parameters with fewer elements stay replicated


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh; one size may be -1 to take the rest.

  `mesh_config.num_devices` > 0 uses only the first that many devices (one
  process only): a single-device reference run inside an 8-device test.
  """
  devices = jax.devices() if devices is None else devices
  num_devices = mesh_config.get("num_devices", -1)
  if num_devices > 0:
    if jax.process_count() > 1 or num_devices > len(devices):
      raise ValueError(f"mesh.num_devices={num_devices} needs one process "
                       f"with at least that many devices (found "
                       f"{len(devices)} in {jax.process_count()} processes).")
    devices = devices[:num_devices]
  sizes = [mesh_config.data, mesh_config.fsdp]
  if sizes.count(-1) > 1:
    raise ValueError("At most one of mesh.data, mesh.fsdp may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if len(devices) % known:
    raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} do not divide the "
                     f"{len(devices)} devices.")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} need "
                     f"{math.prod(sizes)} devices, found {len(devices)}.")
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh, what: str = "training.batch_size"):
  """Fails early, with the fix, when the batch cannot be split evenly."""
  shards = mesh.size
  processes = jax.process_count()
  if batch_size % shards or batch_size % processes:
    raise ValueError(
        f"{what}={batch_size} is not divisible by the {shards} devices "
        f"({processes} processes); use a multiple of {shards}.")


def process_batch_rows(mesh, batch_size: int) -> np.ndarray:
  """The rows of each global batch that this process's devices hold, in the
  order `make_array_from_process_local_data` expects its local batch.

  The pipeline reads exactly these rows of one global data stream, so the
  batches (and the training run) do not depend on the number of processes.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map(
      (batch_size,))
  starts = sorted({index[0].indices(batch_size)[:2] for index in
                   index_map.values()})
  return np.concatenate([np.arange(start, stop) for start, stop in starts])


def fsdp_spec(shape, fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Shards the largest dimension divisible by the fsdp axis, if worth it."""
  if fsdp_size == 1 or np.prod(shape, dtype=np.int64) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def tree_shardings(abstract_tree, mesh, min_size: int = FSDP_MIN_SIZE):
  """NamedShardings for a tree of arrays (params, optimizer state, EMA):
  Adam's moments and the EMA copies have the parameters' shapes, so they
  are split exactly like the parameters."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)),
      abstract_tree)
