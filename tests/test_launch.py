"""The launchers: the commands they send, and what runs on a worker or task.

gcloud, srun, scancel, scontrol, uv, gcsfuse, lsof and sudo are fakes on PATH
that record their arguments (a fake gcloud also answers with scripted queued
resource states); the worker script and the SLURM task wrapper run for real
around a fake trainer that records its arguments, environment and signals.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
POD = os.path.join(LAUNCH, "tpu_pod.sh")
WORKER = os.path.join(LAUNCH, "tpu_worker.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")
TASK = os.path.join(LAUNCH, "slurm_task.sh")

# A fake gcloud: records its arguments; `queued-resources describe` answers
# with the next line of $GCLOUD_STATES (the last one repeats, ABSENT is
# NOT_FOUND); `ssh ... tpu_worker.sh status --output-directory=D` writes each
# worker's line from the next line of $GCLOUD_WORKERS.
FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")

def pop(var):
  with open(os.environ[var]) as f:
    items = f.read().splitlines()
  if len(items) > 1:
    with open(os.environ[var], "w") as f:
      f.write("\\n".join(items[1:]) + "\\n")
  return items[0]

if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  state = pop("GCLOUD_STATES")
  if state == "ABSENT":
    sys.exit("ERROR: (gcloud) NOT_FOUND: Resource not found")
  print(state)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  command = [a for a in args if a.startswith("--command=")][0]
  out = [a.split("=", 1)[1] for a in args
         if a.startswith("--output-directory=")]
  if "tpu_worker.sh status" in command:
    status = pop("GCLOUD_WORKERS")
    for worker in range(2):
      with open(os.path.join(out[0], f"{worker}.log"), "w") as f:
        f.write(f"MF_WORKER {worker} {status}\\n")
"""

# Records its arguments (one JSON list per line in $FAKE_LOG_<NAME>).
RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0")" "$@" | {python} -c '
import json, sys; lines = sys.stdin.read().splitlines()
open(sys.argv[1], "a").write(json.dumps(lines[1:]) + chr(10))' "$FAKE_LOG"
"""

# A trainer that records its arguments, environment, working directory and
# session, and the signals it gets; sleeps, then exits with $FAKE_EXIT.
FAKE_TRAINER = """
import json, os, signal, sys, time
def record(**event):
  with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps(dict(event, argv=sys.argv[1:], pid=os.getpid())) + "\\n")
def on_signal(signum, frame):
  record(signal=signal.Signals(signum).name)
  if signum == signal.SIGTERM:
    print("saved a checkpoint, exiting", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGHUP, on_signal)
if os.environ.get("FAKE_IGNORE_TERM"):
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
record(env={k: os.environ.get(k) for k in (
    "MF_JAX_DISTRIBUTED", "JAX_COMPILATION_CACHE_DIR", "PYTHONUNBUFFERED")},
    cwd=os.getcwd(), sid=os.getsid(0))
print("training step 1", flush=True)
time.sleep(float(os.environ.get("FAKE_SECONDS", "60")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _run(cmd, env, timeout=60, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=timeout, check=False, **kwargs)


def _env(tmp_path, **extra):
  """Fakes first on PATH; HOME and TMPDIR inside the test's folder."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
         "TMPDIR": str(tmp_path), "FAKE_LOG": str(tmp_path / "calls.jsonl")}
  env.update(extra)
  return env


def _fake(tmp_path, name, text):
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text(text.replace("{python}", sys.executable))
  path.chmod(0o755)


def _calls(tmp_path):
  path = tmp_path / "calls.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def _commands(stdout):
  """The printed '+ cmd args' lines as argument lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines()
          if line.startswith("+ ")]


def _remote(ssh):
  """The shell words an ssh command runs on the workers."""
  (command,) = [a for a in ssh if a.startswith("--command=")]
  return shlex.split(command.removeprefix("--command="))


def _after(words, word):
  return words[words.index(word) + 1:]


@pytest.mark.parametrize("script", [POD, WORKER, SLURM, TASK])
def test_scripts_parse(script):
  result = subprocess.run(["bash", "-n", script], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


# --- tpu_pod.sh: the commands --------------------------------------------


@pytest.mark.parametrize("tpu_type, image", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v4-32", "tpu-ubuntu2204-base")])
def test_pod_creates_a_queued_resource_with_the_image_of_its_type(
    tmp_path, tpu_type, image):
  result = _run(["bash", POD, "create", "--dry-run", "--name=mf",
                 "--zone=z", f"--type={tpu_type}", "--reserved"],
                _env(tmp_path))
  assert result.returncode == 0, result.stderr
  describe, create, wait = _commands(result.stdout)
  assert describe == wait == [
      "gcloud", "compute", "tpus", "queued-resources", "describe", "mf",
      "--zone=z", "--format=value(state.state)"]
  assert create == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "mf",
      "--zone=z", "--node-id=mf", f"--accelerator-type={tpu_type}",
      f"--runtime-version={image}", "--reserved"]


def test_pod_refuses_unknown_types_and_bad_arguments(tmp_path):
  env = _env(tmp_path)
  result = _run(["bash", POD, "create", "--dry-run", "--name=n", "--zone=z",
                 "--type=v9x-8"], env)
  assert result.returncode == 2 and "--version" in result.stderr
  result = _run(["bash", POD, "create", "--dry-run", "--name=n", "--zone=z",
                 "--type=v9x-8", "--version=my-image"], env)
  assert "--runtime-version=my-image" in result.stdout
  result = _run(["bash", POD, "--dry-run", "--zone=z",
                 "--workdir=gs://b/r"], env)
  assert result.returncode == 2 and "--name" in result.stderr
  result = _run(["bash", POD, "up", "--dry-run", "--name=n", "--zone=z"], env)
  assert result.returncode == 2 and "--workdir" in result.stderr
  result = _run(["bash", POD, "--dry-run", "--name=n", "--zone=z",
                 "--bogus"], env)
  assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
  result = _run(["bash", POD, "up", "--dry-run", "--name=n", "--zone=z",
                 "--workdir=gs://b/r", "--latents_bucket=gs://b/l", "--",
                 "--config.data.latents_dir=/x"], env)
  assert result.returncode == 2 and "one of them" in result.stderr
  result = _run(["bash", POD, "up", "--dry-run", "--name=n", "--zone=z",
                 "--workdir=gs://b/r", "--latents_bucket=gs://"], env)
  assert result.returncode == 2 and "[gs://]BUCKET[/DIR]" in result.stderr


def test_pod_up_dry_run_creates_sets_up_and_trains_detached(tmp_path):
  result = _run(["bash", POD, "up", "--dry-run", "--name=mf-xl",
                 "--zone=us-central2-b", "--project=p", "--type=v5litepod-16",
                 "--spot", "--config=configs/imagenet256_xl.py",
                 "--workdir=gs://bucket/runs/xl",
                 "--latents_bucket=bucket/latents/in256",
                 "--env=LIBTPU_INIT_ARGS=--a=1 --b", "--",
                 "--config.mesh.fsdp=-1"], _env(tmp_path))
  assert result.returncode == 0, result.stderr
  (describe, create, wait, tar, scp, untar, setup,
   train) = _commands(result.stdout)
  assert describe[3:5] == wait[3:5] == ["queued-resources", "describe"]
  assert create[3:6] == ["queued-resources", "create", "mf-xl"]
  assert {"--zone=us-central2-b", "--project=p", "--node-id=mf-xl", "--spot",
          "--accelerator-type=v5litepod-16",
          "--runtime-version=v2-alpha-tpuv5-lite"} <= set(create)
  assert tar[:2] == ["bash", "-c"] and "git ls-files" in tar[2]
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  for ssh in (untar, setup, train):
    assert ssh[3:6] == ["tpu-vm", "ssh", "mf-xl"] and "--worker=all" in ssh
  # Setup: the venv (Python 3.11, jax[tpu] under constraints.txt) and gcsfuse.
  assert _remote(setup) == ["bash", "mf_jax/launch/tpu_worker.sh", "setup",
                            "--python=3.11", "--jax=jax[tpu]", "--gcsfuse"]
  # Training: mount the latents, then start detached on every worker with
  # the distributed switch, the shared compilation cache and --env.
  words = _remote(train)
  assert words[:5] == ["bash", "mf_jax/launch/tpu_worker.sh", "mount",
                       "--bucket=gs://bucket/latents/in256",
                       "--mount_point=/mnt/mf_jax_latents"]
  start = _after(words, "&&")
  assert start[:6] == [
      "MF_JAX_DISTRIBUTED=1",
      "JAX_COMPILATION_CACHE_DIR=gs://bucket/runs/xl/jax_cache",
      "LIBTPU_INIT_ARGS=--a=1 --b", "bash", "mf_jax/launch/tpu_worker.sh",
      "start"]
  assert start[6] == "--workdir=gs://bucket/runs/xl"
  assert re.fullmatch(r"--stamp=\d{8}-\d{6}", start[7])
  assert _after(start, "--") == [
      "--config=configs/imagenet256_xl.py", "--workdir=gs://bucket/runs/xl",
      "--config.mesh.fsdp=-1", "--config.data.latents_dir=/mnt/mf_jax_latents"]
  # A dry run builds and runs nothing.
  assert not (tmp_path / "mf_jax_code.tar.gz").exists()


def test_pod_subcommands_dry_run(tmp_path):
  env = _env(tmp_path, TPU_NAME="pod", ZONE="z", WORKDIR="gs://b/run",
             DRY_RUN="1")

  def remote(*args):
    result = _run(["bash", POD, *args], env)
    assert result.returncode == 0, result.stderr
    return [(c[3:5], _remote(c) if c[4] == "ssh" else c)
            for c in _commands(result.stdout)]

  worker = ["bash", "mf_jax/launch/tpu_worker.sh"]
  (ssh,) = remote("train")
  assert ssh[1][2:5] == worker + ["start"]
  assert _after(ssh[1], "--") == ["--config=configs/imagenet256_xl.py",
                                  "--workdir=gs://b/run"]
  assert remote("logs") == [(["tpu-vm", "ssh"], worker + [
      "logs", "--workdir=gs://b/run", "--lines=50"])]
  assert remote("stop", "--grace=120") == [(["tpu-vm", "ssh"], worker + [
      "stop", "--grace=120", "--workdir=gs://b/run"])]
  describe, stop, delete = remote("delete")
  assert describe[0] == ["queued-resources", "describe"]
  assert stop[1] == worker + ["stop", "--grace=300", "--workdir=gs://b/run"]
  assert delete[1] == ["gcloud", "compute", "tpus", "queued-resources",
                       "delete", "pod", "--zone=z", "--force", "--quiet"]
  describe, status = remote("status")
  assert status[1] == worker + ["status"]
  # --repo clones on the workers instead of copying this checkout.
  commands = remote("setup", "--repo=https://example.com/mf_jax.git",
                    "--branch=v1")
  assert [c[0] for c in commands] == [["tpu-vm", "ssh"]] * 2
  assert "git clone --depth=1 --branch=v1 https://example.com/mf_jax.git" in (
      " ".join(commands[0][1]))


def _watch(tmp_path, states, workers, *flags):
  _fake(tmp_path, "gcloud", FAKE_GCLOUD)
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  (tmp_path / "workers").write_text("\n".join(workers) + "\n")
  env = _env(tmp_path, GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
             GCLOUD_STATES=str(tmp_path / "states"),
             GCLOUD_WORKERS=str(tmp_path / "workers"))
  result = _run(["bash", POD, "watch", "--name=mf", "--zone=z",
                 "--type=v6e-16", "--spot", "--workdir=gs://b/run",
                 "--repo=https://example.com/mf_jax.git", "--poll=0", *flags,
                 "--", "--config.mesh.fsdp=-1"], env)
  calls = [json.loads(line) for line in
           (tmp_path / "gcloud.jsonl").read_text().splitlines()]
  return result, calls


def _step(call):
  """A short name for a recorded gcloud call: 'create', 'ssh start', ..."""
  if call[3] != "ssh":
    return call[3]
  words = _remote(call)
  if "git" in words:
    return "ssh git"
  return "ssh " + _after(words, "mf_jax/launch/tpu_worker.sh")[0]


def test_pod_watch_recreates_a_preempted_slice_and_resumes(tmp_path):
  result, calls = _watch(
      tmp_path, ["SUSPENDED", "ABSENT", "WAITING_FOR_RESOURCES", "ACTIVE"],
      ["running", "exited 0"])
  assert result.returncode == 0, result.stderr
  assert [_step(c) for c in calls] == [
      "describe",                          # preempted: SUSPENDED
      "delete", "describe",                # deleted, gone
      "create", "describe", "describe",    # waiting, then ACTIVE
      "ssh git", "ssh setup", "ssh start",  # code, venv, training
      "describe", "ssh status",            # still running
      "describe", "ssh status"]            # every trainer exited 0
  delete = calls[1]
  assert delete[3:6] == ["delete", "mf", "--zone=z"]
  assert {"--force", "--quiet"} <= set(delete)
  create = calls[3]
  assert {"--spot", "--accelerator-type=v6e-16",
          "--runtime-version=v2-alpha-tpuv6e"} <= set(create)
  start = _remote(calls[8])
  assert start[:2] == ["MF_JAX_DISTRIBUTED=1",
                       "JAX_COMPILATION_CACHE_DIR=gs://b/run/jax_cache"]
  assert _after(start, "--")[-1] == "--config.mesh.fsdp=-1"
  assert "SUSPENDED: deleting and recreating" in result.stderr
  assert "every worker's trainer exited 0" in result.stderr


def test_pod_watch_relaunches_a_crashed_run_then_gives_up(tmp_path):
  result, calls = _watch(tmp_path, ["ACTIVE"], ["exited 1"],
                         "--max-restarts=1")
  assert result.returncode == 2
  assert "gave up after 1 restarts" in result.stderr
  steps = [_step(c) for c in calls]
  assert steps == ["describe", "ssh status", "ssh git", "ssh setup",
                   "ssh start", "describe", "ssh status"]
  assert "create" not in steps  # an ACTIVE slice is reused


def test_pod_status_and_delete_against_gcloud(tmp_path):
  _fake(tmp_path, "gcloud", FAKE_GCLOUD)
  env = _env(tmp_path, GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
             GCLOUD_STATES=str(tmp_path / "states"),
             GCLOUD_WORKERS=str(tmp_path / "workers"), TPU_NAME="mf",
             ZONE="z", POLL_SECS="0")
  (tmp_path / "states").write_text("ACTIVE\n")
  (tmp_path / "workers").write_text("exited 1\n")
  result = _run(["bash", POD, "status"], env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == "queued resource mf: ACTIVE"
  assert result.stdout.splitlines()[2:] == [
      "== worker 0", "MF_WORKER 0 exited 1", "== worker 1",
      "MF_WORKER 1 exited 1"]
  # delete: the trainers save first, then the resource goes, and is gone.
  (tmp_path / "states").write_text("ACTIVE\nDELETING\nABSENT\n")
  result = _run(["bash", POD, "delete"], env)
  assert result.returncode == 0, result.stderr
  calls = [json.loads(line) for line in
           (tmp_path / "gcloud.jsonl").read_text().splitlines()][2:]
  assert [_step(c) for c in calls] == [
      "describe", "ssh stop", "delete", "describe", "describe"]
  result = _run(["bash", POD, "delete"], env)
  assert "no queued resource mf" in result.stderr
  # train needs an ACTIVE slice.
  (tmp_path / "states").write_text("SUSPENDED\n")
  result = _run(["bash", POD, "train", "--workdir=gs://b/r"], env)
  assert result.returncode == 2
  assert "mf is SUSPENDED, not ACTIVE" in result.stderr


# --- tpu_worker.sh: what runs on each worker ------------------------------


@pytest.fixture
def worker(tmp_path):
  """A code folder with the worker script and a fake trainer, a venv whose
  python is this interpreter, and the fakes; returns (run, env, paths)."""
  code = tmp_path / "code"
  (code / "launch").mkdir(parents=True)
  (code / "mf_jax").mkdir()
  (code / "launch" / "tpu_worker.sh").write_text(open(WORKER).read())
  (code / "mf_jax" / "__init__.py").write_text("")
  (code / "mf_jax" / "main.py").write_text(FAKE_TRAINER)
  (code / "requirements.txt").write_text("jax\n")
  (code / "constraints.txt").write_text("jax==0.0\n")
  # A venv name no other process on this machine uses: the worker script
  # kills any trainer started from it.
  venv = tmp_path / f"venv_{os.getpid()}_{time.monotonic_ns()}"
  (venv / "bin").mkdir(parents=True)
  os.symlink(sys.executable, venv / "bin" / "python")
  (tmp_path / "accel0").write_text("")
  (tmp_path / "libtpu_lockfile").write_text("")
  for name in ("sudo",):
    _fake(tmp_path, name, '#!/bin/sh\nexec "$@"\n')
  _fake(tmp_path, "lsof", '#!/bin/sh\necho "${FAKE_HOLDER_PID:-}"\n')
  env = _env(tmp_path, MF_JAX_VENV=str(venv),
             MF_JAX_LOG_DIR=str(tmp_path / "logs"), MF_JAX_WORKER_ID="3",
             MF_JAX_TPU_DEVICES=str(tmp_path / "accel0"),
             MF_JAX_LIBTPU_LOCKFILE=str(tmp_path / "libtpu_lockfile"),
             MF_JAX_UPLOAD_SECS="1", FAKE_RECORD=str(tmp_path / "trainer"))
  script = str(code / "launch" / "tpu_worker.sh")
  started = []

  def run(*args, extra=None, timeout=60):
    return _run(["bash", script, *args], dict(env, **(extra or {})),
                timeout=timeout)

  yield run, env, dict(code=code, venv=venv, started=started)
  # Nothing the test started outlives it.
  run("stop", "--grace=1")
  for process in started:
    if process.poll() is None:
      process.kill()


def _events(tmp_path, tag):
  path = tmp_path / "trainer"
  if not path.exists():
    return []
  events = [json.loads(line) for line in path.read_text().splitlines()]
  return [e for e in events if f"--tag={tag}" in e["argv"]]


def _until(predicate, seconds=20):
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.1)


def _lines_until(stream, last):
  lines = []
  while not lines or lines[-1] != last:
    lines.append(stream.readline().rstrip("\n"))
    assert lines[-1] or len(lines) < 50, lines
  return lines


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_worker_start_clears_stale_runs_detaches_logs_and_stops(
    tmp_path, worker):
  run, env, paths = worker
  workdir = tmp_path / "workdir"
  # A stale trainer from an earlier launch, and another process holding the
  # TPU device.
  stale = subprocess.Popen(
      [str(paths["venv"] / "bin" / "python"), "-m", "mf_jax.main",
       "--tag=stale"], cwd=paths["code"], env=env, start_new_session=True)
  holder = subprocess.Popen(["sleep", "60"])
  paths["started"] += [stale, holder]
  _until(lambda: _events(tmp_path, "stale"))
  # The launch runs inside a session that then drops, as an ssh one would.
  launch = subprocess.Popen(
      ["bash", "-c", 'bash "$0" start --workdir="$1" --stamp=20250101-000000 '
       '--grace=10 -- --tag=new --config=c.py; echo launched; sleep 60',
       str(paths["code"] / "launch" / "tpu_worker.sh"), str(workdir)],
      env=dict(env, MF_JAX_DISTRIBUTED="1", FAKE_HOLDER_PID=str(holder.pid),
               JAX_COMPILATION_CACHE_DIR=f"{workdir}/jax_cache"),
      stdout=subprocess.PIPE, text=True, start_new_session=True,
      # An ssh session dies of SIGHUP, even where this test runs with it
      # ignored (under nohup: an ignored signal is inherited).
      preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
  paths["started"].append(launch)
  said = _lines_until(launch.stdout, "launched")
  assert said[0].startswith("tpu_worker.sh: SIGTERM to trainer")
  assert "MF_WORKER 3 started: log " in said[-2]
  _until(lambda: _events(tmp_path, "new"))

  # The stale trainer was asked to save and exit; the TPU holder was killed
  # and libtpu's lock file removed.
  assert stale.wait(10) == 0
  assert [e.get("signal") for e in _events(tmp_path, "stale")][-1] == "SIGTERM"
  assert holder.wait(10) == -signal.SIGKILL
  assert not (tmp_path / "libtpu_lockfile").exists()
  # The trainer got its arguments and environment, in its own session.
  (started,) = _events(tmp_path, "new")
  assert started["argv"] == ["--tag=new", "--config=c.py"]
  assert started["env"] == {"MF_JAX_DISTRIBUTED": "1", "PYTHONUNBUFFERED": "1",
                            "JAX_COMPILATION_CACHE_DIR": f"{workdir}/jax_cache"}
  assert started["cwd"] == str(paths["code"])
  assert started["sid"] != os.getsid(launch.pid)
  # Its log is per worker, and copied to the workdir as it runs.
  log = tmp_path / "logs" / "train_20250101-000000_worker3.log"
  assert os.path.realpath(tmp_path / "logs" / "latest.log") == str(log)
  copy = workdir / "logs" / log.name
  _until(lambda: copy.exists() and "training step 1" in copy.read_text())
  assert run("status").stdout.startswith("MF_WORKER 3 running")

  # The ssh session drops: SIGHUP to its whole process group.
  os.killpg(launch.pid, signal.SIGHUP)
  launch.wait(10)
  time.sleep(1)
  assert _alive(started["pid"])
  assert [e for e in _events(tmp_path, "new") if "signal" in e] == []

  # stop: SIGTERM, the trainer saves and exits 0; the log reaches the workdir.
  result = run("stop", "--grace=10", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == "MF_WORKER 3 exited 0"
  assert [e.get("signal") for e in _events(tmp_path, "new")][-1] == "SIGTERM"
  assert "saved a checkpoint" in copy.read_text()
  assert "trainer exited with status 0" in copy.read_text()
  result = run("logs", f"--workdir={workdir}", "--lines=2")
  assert result.stdout.splitlines()[0] == f"== worker 3: {log}"


def test_worker_stop_kills_a_trainer_that_ignores_sigterm(tmp_path, worker):
  run, _, _ = worker
  result = run("start", f"--workdir={tmp_path}/w", "--stamp=s", "--",
               "--tag=stubborn", extra={"FAKE_IGNORE_TERM": "1"})
  assert result.returncode == 0, result.stderr
  _until(lambda: _events(tmp_path, "stubborn"))
  result = run("stop", "--grace=1")
  assert "SIGKILL" in result.stdout
  assert result.stdout.splitlines()[-1] == "MF_WORKER 3 exited 137"


def test_worker_start_needs_the_venv(tmp_path, worker):
  run, _, _ = worker
  result = run("start", "--workdir=w", "--stamp=s", "--",
               extra={"MF_JAX_VENV": str(tmp_path / "none")})
  assert result.returncode == 2 and "run setup first" in result.stderr


def test_worker_setup_makes_a_python311_venv_under_the_constraints(
    tmp_path, worker):
  run, env, paths = worker
  # uv: records; `uv venv ... DIR` makes DIR/bin/python (this interpreter).
  _fake(tmp_path, "uv", RECORDER.replace(
      "#!/bin/sh\n", '#!/bin/sh\nif [ "$1" = venv ]; then for a; do d="$a"; '
      'done; mkdir -p "$d/bin"; ln -sf {python} "$d/bin/python"; fi\n'))
  venv = tmp_path / "new_venv"
  python = "%d.%d" % sys.version_info[:2]
  result = run("setup", f"--python={python}", extra={"MF_JAX_VENV": str(venv)})
  assert result.returncode == 0, result.stderr
  assert _calls(tmp_path) == [
      ["venv", "--seed", "--python", python, str(venv)],
      ["pip", "install", "--python", f"{venv}/bin/python", "-c",
       "constraints.txt", "-r", "requirements.txt", "jax[tpu]"]]
  assert re.search(r"MF_WORKER 3 ready: Python 3\.\d+\.\d+ jax \S+",
                   result.stdout)
  # Run again: the venv is kept, only the install repeats.
  result = run("setup", f"--python={python}", "--jax=jax[tpu]==0.0",
               extra={"MF_JAX_VENV": str(venv)})
  assert _calls(tmp_path)[2:] == [
      ["pip", "install", "--python", f"{venv}/bin/python", "-c",
       "constraints.txt", "-r", "requirements.txt", "jax[tpu]==0.0"]]
  (paths["code"] / "constraints.txt").unlink()
  result = run("setup")
  assert result.returncode == 2 and "constraints.txt" in result.stderr


def test_worker_mounts_the_latents_bucket_once(tmp_path, worker):
  run, _, _ = worker
  _fake(tmp_path, "gcsfuse", RECORDER)
  _fake(tmp_path, "mountpoint", '#!/bin/sh\nexit "${FAKE_MOUNTED:-1}"\n')
  mount = tmp_path / "mnt" / "latents"
  result = run("mount", "--bucket=gs://bkt/latents/in256/",
               f"--mount_point={mount}")
  assert result.returncode == 0, result.stderr
  assert _calls(tmp_path) == [["--implicit-dirs", "-o", "ro", "--only-dir",
                               "latents/in256", "bkt", str(mount)]]
  assert mount.is_dir()
  result = run("mount", "--bucket=gs://bkt", f"--mount_point={mount}",
               extra={"FAKE_MOUNTED": "0"})
  assert "already mounted" in result.stdout and len(_calls(tmp_path)) == 1


# --- slurm_gpu.sbatch and slurm_task.sh ----------------------------------

SLURM_ENV = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
                 SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8",
                 SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="12",
                 SLURM_SUBMIT_DIR=ROOT, WORKDIR="/shared/run")

# srun: records its arguments and environment, then runs like the step:
# exits at once, or (FAKE_SRUN_WAIT) until SIGTERM, as a trainer that saves.
FAKE_SRUN = """#!/bin/bash
{python} -c 'import json, os, sys; json.dump(dict(argv=sys.argv[1:],
    env=dict(os.environ)), open(os.environ["SRUN_RECORD"], "w"))' "$@"
echo $$ > "$SRUN_RECORD.pid"
if [ -n "$FAKE_SRUN_WAIT" ]; then
  trap 'echo "srun: TERM, saved" >> "$FAKE_LOG.order"; exit 0' TERM
  while true; do sleep 0.1; done
fi
"""


def _slurm(tmp_path, **env):
  _fake(tmp_path, "srun", FAKE_SRUN)
  for name in ("scontrol", "scancel"):
    _fake(tmp_path, name, RECORDER.replace(
        "#!/bin/sh\n", '#!/bin/sh\necho "$(basename "$0") $*" >> '
        '"$FAKE_LOG.order"\n'))
  env = _env(tmp_path, SRUN_RECORD=str(tmp_path / "srun.json"),
             **dict(SLURM_ENV, **env))
  return env


def test_slurm_srun_gets_the_allocation_layout_cpus_and_xla_settings(
    tmp_path):
  env = _slurm(tmp_path, XLA_FLAGS="--xla_dump_to=/tmp/d", NCCL_DEBUG="INFO")
  result = _run(["bash", SLURM, "--config.mesh.fsdp=-1"], env)
  assert result.returncode == 0, result.stderr
  srun = json.loads((tmp_path / "srun.json").read_text())
  assert srun["argv"] == [
      "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=16",
      "--ntasks-per-node=8", "--cpus-per-task=12", "bash",
      "launch/slurm_task.sh", "python", "-m", "mf_jax.main",
      "--config=configs/imagenet256_xl.py", "--workdir=/shared/run",
      "--config.mesh.fsdp=-1"]
  step_env = srun["env"]
  assert step_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  assert step_env["XLA_FLAGS"] == (
      "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true")
  assert step_env["NCCL_DEBUG"] == "INFO"  # the user's value is kept
  assert step_env["JAX_COMPILATION_CACHE_DIR"] == "/shared/run/jax_cache"
  assert _calls(tmp_path) == []  # finished: no requeue

  # One task per node with 4 GPUs, no --cpus-per-task, in a container.
  env = _slurm(tmp_path, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
               SLURM_GPUS_ON_NODE="4", CONTAINER_IMAGE="nvcr.io/nvidia/jax:x",
               CONTAINER_MOUNTS="/data:/data")
  del env["SLURM_CPUS_PER_TASK"]
  result = _run(["bash", SLURM], env)
  assert result.returncode == 0, result.stderr
  assert json.loads((tmp_path / "srun.json").read_text())["argv"][:7] == [
      "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2",
      "--ntasks-per-node=1", "--container-image=nvcr.io/nvidia/jax:x",
      f"--container-mounts={ROOT}:{ROOT},/data:/data",
      f"--container-workdir={ROOT}"]


def test_slurm_refuses_layouts_that_do_not_fit(tmp_path):
  env = _slurm(tmp_path, SLURM_NTASKS="6", SLURM_NTASKS_PER_NODE="3")
  result = _run(["bash", SLURM], env)
  assert result.returncode == 2 and "3 tasks per node" in result.stderr
  env = _slurm(tmp_path, SLURM_GPUS_ON_NODE="")
  result = _run(["bash", SLURM], env)
  assert result.returncode == 2 and "no GPUs" in result.stderr
  del env["WORKDIR"]
  result = _run(["bash", SLURM], env)
  assert result.returncode != 0 and "WORKDIR" in result.stderr


def test_slurm_saves_and_requeues_before_the_time_limit(tmp_path):
  env = _slurm(tmp_path, FAKE_SRUN_WAIT="1", SLURM_RESTART_COUNT="2")
  _fake(tmp_path, "scancel", '#!/bin/sh\necho "scancel $*" >> '
        '"$FAKE_LOG.order"\nkill -TERM "$(cat "$SRUN_RECORD.pid")"\n')
  job = subprocess.Popen(["bash", SLURM], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
  try:
    _until(lambda: (tmp_path / "srun.json.pid").exists())
    job.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@300
    out, err = job.communicate(timeout=30)
  finally:
    job.kill()
  assert job.returncode == 0, err
  order = (tmp_path / "calls.jsonl.order").read_text().splitlines()
  assert order == ["scancel --signal=TERM 4242", "srun: TERM, saved",
                   "scontrol requeue 4242"]
  assert "requeueing job 4242" in out
  # Past MAX_REQUEUES the job ends instead.
  (tmp_path / "calls.jsonl.order").unlink()
  (tmp_path / "srun.json.pid").unlink()
  job = subprocess.Popen(["bash", SLURM], cwd=ROOT,
                         env=dict(env, MAX_REQUEUES="2"),
                         stdout=subprocess.PIPE, text=True)
  try:
    _until(lambda: (tmp_path / "srun.json.pid").exists())
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=30)
  finally:
    job.kill()
  assert "not requeueing" in out
  assert "scontrol requeue 4242" not in (
      tmp_path / "calls.jsonl.order").read_text()


@pytest.mark.parametrize("env, ids", [
    # 8 tasks share a node's 8 GPUs: task 3 of node 1 takes GPU 3 (JAX's
    # own default).
    (dict(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_NODEID="1",
          SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_LOCALID="3"), "3"),
    # --gpus-per-task=1: Slurm shows task 5 its own GPU only, CUDA's number 0.
    (dict(CUDA_VISIBLE_DEVICES="5", SLURM_STEP_TASKS_PER_NODE="8(x2)",
          SLURM_LOCALID="5"), "0"),
    # One task per node drives all 8 GPUs (JAX alone would take GPU 0).
    (dict(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_NODEID="2",
          SLURM_STEP_TASKS_PER_NODE="1(x4)", SLURM_LOCALID="0"),
     "0,1,2,3,4,5,6,7"),
    # 2 tasks on the first node: 4 GPUs each.
    (dict(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_NODEID="0",
          SLURM_STEP_TASKS_PER_NODE="2,4", SLURM_LOCALID="1"), "4,5,6,7"),
    # A user's choice is kept; no GPUs: nothing set.
    (dict(JAX_LOCAL_DEVICE_IDS="1", SLURM_LOCALID="0"), "1"),
    (dict(SLURM_GPUS_ON_NODE="0", SLURM_LOCALID="0"), "unset"),
])
def test_slurm_task_gives_jax_its_gpus(tmp_path, env, ids):
  env = _env(tmp_path, **dict(dict(SLURM_GPUS_ON_NODE="8", SLURM_PROCID="1"),
                              **env))
  result = _run(["bash", TASK, "sh", "-c",
                 'echo "ids=${JAX_LOCAL_DEVICE_IDS:-unset} $*"', "sh", "x y"],
                env)
  assert result.returncode == 0, result.stderr
  assert result.stdout == f"ids={ids} x y\n"


def test_slurm_task_refuses_uneven_gpu_sharing(tmp_path):
  env = _env(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
             SLURM_GPUS_ON_NODE="8", SLURM_STEP_TASKS_PER_NODE="3",
             SLURM_LOCALID="0")
  result = _run(["bash", TASK, "true"], env)
  assert result.returncode == 2 and "evenly" in result.stderr
