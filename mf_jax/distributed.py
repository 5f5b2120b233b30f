"""Starting jax.distributed: when, and how each platform is recognised.

Several hosts run one process each. They must start JAX's distributed
client before anything touches a device: without it a multi-host run
trains, but orbax's multi-process checkpoint fails at the first save and a
preemption notice saves nothing (hours in, on a pod). So `initialize` decides
from the environment, in this order:

  (a) explicit: JAX_COORDINATOR_ADDRESS=host:port of process 0 (with
      JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither for JAX to detect
      them). JAX_NUM_PROCESSES > 1 without an address is an error.
  (b) MF_JAX_DISTRIBUTED=1 (exported by launch/tpu_pod.sh on every worker):
      start, and let JAX detect the cluster. MF_JAX_DISTRIBUTED=0 turns the
      detection below off.
  (c) SLURM, inside a job step (`srun`: SLURM_STEP_ID set) of more than one
      task. Not a user's `salloc` shell, which sets SLURM_NTASKS but runs no
      step: JAX could not find a coordinator there.
  (d) Open MPI's mpirun with more than one rank.
  (e) GKE TPU: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) lists
      several hosts.
  (f) Cloud TPU VMs (GCE, e.g. made by launch/tpu_pod.sh) with several
      workers: JAX's own test (it saw TPU chips when imported and
      TPU_SKIP_MDS_QUERY is unset), then the VM's metadata server lists the
      slice's workers (`worker-network-endpoints`), times MEGASCALE_NUM_SLICES.
      Only TPU VMs query it, with a short timeout.

In (b)-(f) JAX finds the coordinator, process count and id itself
(`jax._src.clusters`), so this module only decides *whether* to start.
Afterwards `check_started` stops a run whose backend spans several
processes but has no client, with the variable to set, instead of letting it
fail at its first checkpoint.
"""

import http.client
import os
import urllib.error
import urllib.request

import jax
from absl import logging

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
# The metadata server answers within milliseconds on GCE; outside it a
# lookup must not hold up start-up.
METADATA_TIMEOUT_S = 2.0
_SET_ME = ("set MF_JAX_DISTRIBUTED=1 on every host (Cloud TPU, GKE, SLURM "
           "and mpirun are then detected), or JAX_COORDINATOR_ADDRESS="
           "host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID")


def initialize():
  """Starts jax.distributed if the environment announces several processes,
  then checks that a multi-process backend has its client.

  Every entry point (training, FID, latent preparation) calls this once,
  first: the client must start before JAX's backends do. Calling it again
  only repeats the check.
  """
  if not is_started():
    reason = start_reason(os.environ)
    if reason is not None:
      logging.info("Starting jax.distributed: %s.", reason)
      jax.distributed.initialize(**_explicit_args(os.environ))
  check_started()


def is_started() -> bool:
  """Whether this process's distributed client is up."""
  # Private, but the one place every jax version keeps it (the public
  # `jax.distributed.is_initialized` is recent).
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


def check_started():
  """A clear stop when several processes run without a distributed client
  (e.g. a TPU pod slice whose workers were not detected): orbax's
  multi-process save and the preemption sync point need it."""
  count = jax.process_count()
  if count > 1 and not is_started():
    raise RuntimeError(
        f"jax.process_count() is {count} but jax.distributed was not "
        f"started, so checkpoints and preemption saves would fail: {_SET_ME}.")


def start_reason(env) -> str | None:
  """Why this process should start jax.distributed (rules (a)-(f) of the
  module docstring), or None for a single process. Bad settings raise a
  one-line ValueError."""
  explicit = _explicit_args(env)
  if explicit:
    return (f"JAX_COORDINATOR_ADDRESS={explicit['coordinator_address']}, "
            f"{explicit['num_processes']} processes")
  switch = env.get("MF_JAX_DISTRIBUTED", "").strip().lower()
  if switch in _TRUE:
    return "MF_JAX_DISTRIBUTED=1"
  if switch in _FALSE:
    return None
  if switch:
    raise ValueError(f"MF_JAX_DISTRIBUTED={env['MF_JAX_DISTRIBUTED']!r}: use "
                     "1 (start jax.distributed and detect the cluster) or 0 "
                     "(do not detect one).")
  for detect in (_slurm_step, _open_mpi, _gke_tpu, _cloud_tpu_vm):
    reason = detect(env)
    if reason:
      return reason
  return None


def _explicit_args(env) -> dict:
  """jax.distributed.initialize's arguments from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; {} when no address is set."""
  address = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
  num = _env_int(env, "JAX_NUM_PROCESSES")
  pid = _env_int(env, "JAX_PROCESS_ID")
  if not address:
    if num is not None and num > 1:
      raise ValueError(
          f"JAX_NUM_PROCESSES={num} but JAX_COORDINATOR_ADDRESS is not set: "
          "set JAX_COORDINATOR_ADDRESS=host:port (process 0's host and a "
          "free port) in every process.")
    return {}
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port "
                     "(process 0's host and a free port).")
  if (num is None) != (pid is None):
    raise ValueError("Set JAX_NUM_PROCESSES and JAX_PROCESS_ID together "
                     "(or neither, for JAX to detect them), found "
                     f"JAX_NUM_PROCESSES={num}, JAX_PROCESS_ID={pid}.")
  if num is not None and not 0 <= pid < num:
    raise ValueError(f"JAX_PROCESS_ID={pid} is not in 0..{num - 1} "
                     f"(JAX_NUM_PROCESSES={num}).")
  return dict(coordinator_address=address, num_processes=num, process_id=pid)


def _env_int(env, name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _count(env, *names) -> int:
  """The first of `names` that is set, as an integer (1 if none is)."""
  for name in names:
    if env.get(name, "").strip():
      return _env_int(env, name)
  return 1


def _slurm_step(env) -> str | None:
  # srun sets SLURM_STEP_ID and the step's task count; an allocation's shell
  # (salloc, or sbatch's script before srun) has SLURM_NTASKS only.
  if "SLURM_STEP_ID" not in env:
    return None
  tasks = _count(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
  return f"SLURM job step of {tasks} tasks" if tasks > 1 else None


def _open_mpi(env) -> str | None:
  if "OMPI_MCA_orte_hnp_uri" not in env:  # what JAX's detection reads
    return None
  ranks = _count(env, "OMPI_COMM_WORLD_SIZE")
  return f"mpirun with {ranks} ranks" if ranks > 1 else None


def _gke_tpu(env) -> str | None:
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  workers = len([h for h in (hosts or "").split(",") if h.strip()])
  return f"GKE TPU slice of {workers} workers" if workers > 1 else None


def on_cloud_tpu_vm() -> bool:
  """JAX's own verdict, made when it was imported: libtpu is installed and
  this machine has TPU chips (it then also leaves TPU_SKIP_MDS_QUERY unset)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _cloud_tpu_vm(env) -> str | None:
  if "TPU_SKIP_MDS_QUERY" in env or not on_cloud_tpu_vm():
    return None
  endpoints = gce_metadata("worker-network-endpoints")
  if endpoints is None:
    logging.info("On a Cloud TPU VM whose metadata server lists no workers: "
                 "assuming one.")
    return None
  workers = len([w for w in endpoints.split(",") if w.strip()])
  processes = workers * _count(env, "MEGASCALE_NUM_SLICES")
  if processes <= 1:
    return None
  accelerator = (env.get("TPU_ACCELERATOR_TYPE")
                 or gce_metadata("accelerator-type") or "TPU")
  return f"Cloud TPU VM {accelerator.strip()}, {processes} workers"


def gce_metadata(key: str, timeout: float = METADATA_TIMEOUT_S) -> str | None:
  """An attribute of this VM from the GCE metadata server, None if it is
  absent or the server does not answer. Honours GCE_METADATA_IP as JAX's
  cluster detection does (tests point it at a local server)."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
      headers={"Metadata-Flavor": "Google"})
  # The metadata server is link-local: never through an HTTP proxy.
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  try:
    with opener.open(request, timeout=timeout) as response:
      return response.read().decode()
  except (urllib.error.URLError, http.client.HTTPException, OSError,
          ValueError):
    return None
