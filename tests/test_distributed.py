"""Distributed start-up: which environments start jax.distributed, which
stop with a one-line error, and that a faked multi-worker Cloud TPU VM (a
local metadata server) is recognised by this code and by JAX alike."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest
from jax._src import cloud_tpu_init
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from mf_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PREFIXES = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
             "MF_JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_",
             "GCE_METADATA", "HTTP_PROXY", "http_proxy")
NO_COORDINATOR = (
    "ValueError: JAX_NUM_PROCESSES=2 but JAX_COORDINATOR_ADDRESS is not set: "
    "set JAX_COORDINATOR_ADDRESS=host:port (process 0's host and a free "
    "port) in every process.")


@pytest.fixture
def env(monkeypatch):
  """A clean environment (no cluster variables) as a dict-like to fill."""
  for name in list(os.environ):
    if name.startswith(_PREFIXES):
      monkeypatch.delenv(name)
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
  return monkeypatch


@pytest.fixture
def starts(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting a client."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  return calls


class _Metadata(http.server.BaseHTTPRequestHandler):
  """GCE's metadata server for a few instance attributes."""
  attributes: dict = {}
  requests: list = []

  def do_GET(self):  # pylint: disable=invalid-name
    key = self.path.rsplit("/", 1)[-1]
    self.requests.append(key)
    value = self.attributes.get(key)
    if self.headers.get("Metadata-Flavor") != "Google":
      self.send_response(403)
    elif value is None:
      self.send_response(404)
    else:
      self.send_response(200)
    self.end_headers()
    if value is not None:
      self.wfile.write(value.encode())

  def log_message(self, *args):
    pass


@pytest.fixture
def metadata_server(env):
  """Serves `attributes` on 127.0.0.1, where GCE_METADATA_IP points (for
  this code and for JAX's cluster detection)."""
  handler = type("Handler", (_Metadata,), {"attributes": {}, "requests": []})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  env.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
  env.setenv("NO_PROXY", "127.0.0.1")
  yield handler
  server.shutdown()
  server.server_close()


def _fake_tpu_vm(env, handler, workers, worker_number=0):
  """What a GCE TPU VM shows: JAX saw TPU chips at import (so it left
  TPU_SKIP_MDS_QUERY unset), and the metadata server describes the slice."""
  env.delenv("TPU_SKIP_MDS_QUERY", raising=False)
  env.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  env.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  env.setattr(clusters.cluster, "running_in_cloud_tpu_vm", True)
  handler.attributes.update({
      "accelerator-type": "v5litepod-32",
      "agent-worker-number": str(worker_number),
      # The old format, name:id:ip; JAX takes the ip.
      "worker-network-endpoints": ",".join(
          f"t1v-n-w-{i}:{i}:10.130.0.{i + 2}" for i in range(workers)),
      "tpu-env": f"ACCELERATOR_TYPE: 'v5litepod-32'\nWORKER_ID: "
                 f"'{worker_number}'\n",
  })


def test_multi_worker_cloud_tpu_vm_starts_the_client(metadata_server, env,
                                                     starts):
  _fake_tpu_vm(env, metadata_server, workers=4, worker_number=2)
  assert distributed.start_reason(os.environ) == (
      "Cloud TPU VM v5litepod-32, 4 workers")
  distributed.initialize()
  assert starts == [{}]  # JAX detects the rest; what it finds:
  assert clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, 10) == ("10.130.0.2:8482", 4, 2, None)


def test_single_worker_cloud_tpu_vm_starts_nothing(metadata_server, env,
                                                   starts):
  _fake_tpu_vm(env, metadata_server, workers=1)
  distributed.initialize()
  assert starts == []
  assert "worker-network-endpoints" in metadata_server.requests


def test_metadata_is_not_queried_off_tpu_vms(metadata_server, env, starts):
  _fake_tpu_vm(env, metadata_server, workers=4)
  env.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
  distributed.initialize()
  env.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  env.setenv("TPU_SKIP_MDS_QUERY", "1")
  distributed.initialize()
  assert starts == [] and metadata_server.requests == []


def test_silent_metadata_server_costs_at_most_the_timeout(env, starts):
  """A server that accepts the connection and never answers."""
  env.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  env.delenv("TPU_SKIP_MDS_QUERY", raising=False)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    env.setenv("GCE_METADATA_IP", f"127.0.0.1:{s.getsockname()[1]}")
    begin = time.monotonic()
    distributed.initialize()
    seconds = time.monotonic() - begin
  assert starts == []
  assert seconds < distributed.METADATA_TIMEOUT_S + 1


@pytest.mark.parametrize("variables, started", [
    # GKE TPU slices list their workers.
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w-0", "TPU_WORKER_ID": "0"}, False),
    # SLURM: `srun` inside a job (a step of 4 tasks) ...
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4",
      "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"}, True),
    # ... not the `salloc` shell of that allocation, nor a one-task step.
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_NNODES": "2"}, False),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4",
      "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, False),
    # mpirun with 2 ranks.
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
      "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, True),
    # The launcher's switch: JAX detects the cluster ...
    ({"MF_JAX_DISTRIBUTED": "1"}, True),
    # ... or, set to 0, no detection at all.
    ({"MF_JAX_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "w-0,w-1"}, False),
    ({"JAX_NUM_PROCESSES": "1"}, False),
    ({}, False),
])
def test_cluster_environments(env, starts, variables, started):
  for name, value in variables.items():
    env.setenv(name, value)
  distributed.initialize()
  assert starts == ([{}] if started else [])


def test_explicit_coordinator_passes_its_numbers(env, starts):
  env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  env.setenv("JAX_NUM_PROCESSES", "2")
  env.setenv("JAX_PROCESS_ID", "1")
  distributed.initialize()
  assert starts == [dict(coordinator_address="10.0.0.1:1234",
                         num_processes=2, process_id=1)]


@pytest.mark.parametrize("variables, message", [
    ({"JAX_NUM_PROCESSES": "2"}, NO_COORDINATOR.removeprefix("ValueError: ")),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"},
     "JAX_COORDINATOR_ADDRESS='10.0.0.1' is not host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     "Set JAX_NUM_PROCESSES and JAX_PROCESS_ID together"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 is not in 0..1"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an int"),
    ({"MF_JAX_DISTRIBUTED": "auto"}, "MF_JAX_DISTRIBUTED='auto': use 1"),
])
def test_bad_settings_are_one_line_errors(env, starts, variables, message):
  for name, value in variables.items():
    env.setenv(name, value)
  with pytest.raises(ValueError) as error:
    distributed.initialize()
  assert str(error.value).startswith(message)
  assert "\n" not in str(error.value) and starts == []


def test_several_processes_without_a_client_stop(env, starts, monkeypatch):
  """E.g. a pod slice whose workers nothing detected: the backend spans 4
  processes, the client is missing."""
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(RuntimeError, match=(
      r"^jax.process_count\(\) is 4 but jax.distributed was not started, .*"
      r"set MF_JAX_DISTRIBUTED=1 on every host")):
    distributed.initialize()
  assert starts == []
  monkeypatch.setattr(distributed, "is_started", lambda: True)
  distributed.check_started()


def _two_processes(command, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)
  procs = [subprocess.Popen(command, cwd=REPO, env=dict(env, JAX_PROCESS_ID=
                                                         str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  return [(p.returncode, out, err) for p in procs
          for out, err in [p.communicate(timeout=300)]]


def test_two_processes_without_a_coordinator_fail_fast(tmp_path):
  """`python -m mf_jax.main` twice with JAX_NUM_PROCESSES=2 and no
  JAX_COORDINATOR_ADDRESS: each stops before touching a device, the last
  line of its stderr saying what to set."""
  command = [sys.executable, "-m", "mf_jax.main", "--config=configs/toy2d.py",
             f"--workdir={tmp_path}", "--config.training.num_steps=2"]
  for code, _, err in _two_processes(command):
    assert code == 1, err[-2000:]
    assert err.strip().splitlines()[-1] == NO_COORDINATOR
  assert not os.listdir(tmp_path)


def test_two_processes_with_a_coordinator_start_the_client():
  """The explicit path for real (gloo on CPU): both processes see 2
  processes and a client, so the check passes."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = ("from mf_jax import distributed; "
            "distributed.initialize(); import jax; "
            "print(jax.process_index(), jax.process_count(), "
            "distributed.is_started())")
  results = _two_processes([sys.executable, "-c", script],
                           JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
  for i, (code, out, err) in enumerate(results):
    assert code == 0, err[-2000:]
    assert out.split() == [str(i), "2", "True"]
