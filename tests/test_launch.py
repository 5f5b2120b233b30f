"""The launchers parse, and print or pass on the commands they should."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def _run(cmd, env=None, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=60, check=False, **kwargs)


def _env(tmp_path, **extra):
  """No gcloud or srun on PATH unless a test puts a fake one there."""
  env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path),
         "TMPDIR": str(tmp_path)}
  env.update(extra)
  return env


@pytest.mark.parametrize("script", [POD, SLURM])
def test_scripts_parse(script):
  result = _run(["bash", "-n", script])
  assert result.returncode == 0, result.stderr


def _commands(stdout):
  """The printed '+ cmd args' lines as argument lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines()
          if line.startswith("+ ")]


def test_pod_dry_run_prints_create_ship_install_and_train(tmp_path):
  result = _run(["bash", POD, "--dry-run", "--name=mf-xl",
                 "--zone=us-central2-b", "--type=v4-64", "--spot",
                 "--config=configs/imagenet256_xl.py",
                 "--workdir=gs://bucket/runs/xl", "--",
                 "--config.mesh.fsdp=-1", "--config.data.latents_dir=gs://b/l"],
                env=_env(tmp_path))
  assert result.returncode == 0, result.stderr
  create, tar, scp, untar, install, train = _commands(result.stdout)
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"mf-xl", "--zone=us-central2-b", "--accelerator-type=v4-64",
          "--spot"} <= set(create)
  assert tar[:2] == ["bash", "-c"] and "git ls-files" in tar[2]
  assert scp[4] == "scp" and "--worker=all" in scp
  for ssh in (untar, install, train):
    assert ssh[4:6] == ["ssh", "mf-xl"] and "--worker=all" in ssh
  assert "jax[tpu]" in install[-1] and "requirements.txt" in install[-1]
  remote = train[-1].removeprefix("--command=")
  assert shlex.split(remote) == [
      "cd", "mf_jax", "&&", "python3", "-m", "mf_jax.main",
      "--config=configs/imagenet256_xl.py", "--workdir=gs://bucket/runs/xl",
      "--config.mesh.fsdp=-1", "--config.data.latents_dir=gs://b/l"]
  # Dry run: nothing was built or run.
  assert not (tmp_path / "mf_jax_code.tar.gz").exists()


def test_pod_dry_run_from_env_with_git_clone_and_skip_setup(tmp_path):
  env = _env(tmp_path, TPU_NAME="pod", ZONE="europe-west4-a",
             WORKDIR="gs://b/run", REPO_URL="https://example.com/mf_jax.git",
             BRANCH="v1", DRY_RUN="1")
  result = _run(["bash", POD], env=env)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert [c[4] for c in commands] == ["create", "ssh", "ssh", "ssh"]
  assert ("git clone --depth=1 --branch=v1 https://example.com/mf_jax.git"
          in commands[1][-1])
  result = _run(["bash", POD, "--skip-setup"], env=env)
  (train,) = _commands(result.stdout)
  assert "python3 -m mf_jax.main" in train[-1]


def test_pod_requires_name_zone_and_workdir(tmp_path):
  result = _run(["bash", POD, "--dry-run", "--zone=z", "--workdir=gs://b/r"],
                env=_env(tmp_path))
  assert result.returncode == 2 and "--name" in result.stderr
  result = _run(["bash", POD, "--dry-run", "--name=n", "--zone=z",
                 "--bogus"], env=_env(tmp_path))
  assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


def test_slurm_script_runs_main_under_srun_with_its_arguments(tmp_path):
  fake_srun = tmp_path / "srun"
  fake_srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
  fake_srun.chmod(0o755)
  log = tmp_path / "srun.log"
  env = _env(tmp_path, WORKDIR="/shared/run", SRUN_LOG=str(log),
             SLURM_SUBMIT_DIR=ROOT, SLURM_NTASKS="16")
  result = _run(["bash", SLURM, "--config.mesh.fsdp=-1"], env=env)
  assert result.returncode == 0, result.stderr
  assert log.read_text().splitlines() == [
      "--kill-on-bad-exit=1", "python", "-m", "mf_jax.main",
      "--config=configs/imagenet256_xl.py", "--workdir=/shared/run",
      "--config.mesh.fsdp=-1"]
  del env["WORKDIR"]
  result = _run(["bash", SLURM], env=env)
  assert result.returncode != 0 and "WORKDIR" in result.stderr
