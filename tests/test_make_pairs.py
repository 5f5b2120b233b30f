"""make_pairs: the teacher's ODE solutions, the same on 1 and 8 devices and
at any batch size, resumed after a kill without a pair lost or made twice;
read back by the training pipeline as {'x', 'e', 'y'} batches."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import integrate

from mf_jax import config_lib
from mf_jax import export
from mf_jax import models
from mf_jax.data import pairs
from mf_jax.data import pipeline
from mf_jax.tools import make_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM, SHARD, SEED = 40, 16, 3  # shards of 16, 16 and 8 pairs

# Runs make_pairs' command line with its shard writer replaced: the second
# shard leaves a torn temporary file, then the process kills itself (-9).
_KILLED_RUN = """
import os, runpy, signal, sys
from mf_jax.tools import prepare_latents
write, written = prepare_latents.write_shard, []
def write_then_die(path, *args):
  if written:
    with open(path + ".tmp" + str(os.getpid()), "wb") as f:
      f.write(b"half a shard")
    os.kill(os.getpid(), signal.SIGKILL)
  write(path, *args)
  written.append(path)
prepare_latents.write_shard = write_then_die
sys.argv = ["make_pairs"] + sys.argv[1:]
runpy.run_module("mf_jax.tools.make_pairs", run_name="__main__")
"""


def _config():
  c = config_lib.base_config()
  c.model.update(name="mlp", in_channels=2, hidden_size=16, depth=1,
                 num_classes=3)
  for key in ("variant", "input_size", "mlp_ratio", "remat", "dtype"):
    del c.model[key]
  c.data.name = "moons"
  return c


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  config = _config()
  shapes = models.abstract_params(models.build_model(config.model), (2,))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32), shapes)
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
  export.save(path, params, config.model, source="test", step=0)
  return path


def _run(args, devices: int, script=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices}"))
  command = ([sys.executable, "-c", script] if script else
             [sys.executable, "-m", "mf_jax.tools.make_pairs"])
  return subprocess.run(command + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _args(teacher, output, batch):
  return [f"--teacher={teacher}", f"--output={output}", f"--num={NUM}",
          f"--shard_size={SHARD}", f"--seed={SEED}", f"--batch={batch}"]


@pytest.fixture(scope="module")
def eight_devices(teacher_file, tmp_path_factory):
  """A whole run here, on the tests' 8 devices."""
  output = str(tmp_path_factory.mktemp("eight_devices"))
  make_pairs.run(teacher_file, output, NUM, batch=8, seed=SEED,
                 shard_size=SHARD)
  return pairs.read_all(output)


@pytest.fixture(scope="module")
def killed_and_resumed(teacher_file, tmp_path_factory):
  """The command line on one device, killed while writing its second
  shard; then the same settings finished here on 8 devices with another
  batch size."""
  output = tmp_path_factory.mktemp("killed")
  killed = _run(_args(teacher_file, output, 8), devices=1,
                script=_KILLED_RUN)
  after_kill = sorted(p.name for p in output.iterdir())
  make_pairs.run(teacher_file, str(output), NUM, batch=24, seed=SEED,
                 shard_size=SHARD)
  return killed, after_kill, str(output)


def test_pairs_are_the_teachers_ode_solutions(teacher_file, eight_devices):
  """Each sample is the teacher's flow from its noise at t = 1 to t = 0
  (scipy's RK45 on the exported network, tight tolerances); labels are
  uniform draws of the 3 classes; every noise is distinct."""
  u_fn, _ = export.load(teacher_file)
  e, x, y = eight_devices["e"], eight_devices["x"], eight_devices["y"]
  assert e.shape == x.shape == (NUM, 2) and y.shape == (NUM,)
  assert set(y) == {0, 1, 2}
  assert len(np.unique(e[:, 0])) == NUM
  for i in range(0, NUM, 7):
    field = lambda t, z, i=i: np.asarray(
        u_fn(z[None].astype(np.float32), t, t, y[i:i + 1]))[0]
    ref = integrate.solve_ivp(field, (1.0, 0.0), e[i].astype(np.float64),
                              rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(x[i], ref.y[:, -1], rtol=1e-4, atol=1e-4)


def test_killed_on_one_device_and_resumed_on_eight_writes_the_same_pairs(
    eight_devices, killed_and_resumed):
  """Shard 0 made on one device, shards 1 and 2 after the kill on 8 with
  another batch size: pair i is the 8-device run's pair i."""
  killed, after_kill, output = killed_and_resumed
  assert killed.returncode == -9, killed.stderr[-3000:]
  shard_names = [pairs.latents.shard_name(k, 3) for k in range(3)]
  # Killed mid-write: the first shard is complete, the second is a torn
  # temporary file that is not a shard.
  assert [n for n in after_kill if n.endswith(".array_record")] == \
      shard_names[:1]
  assert any(".array_record.tmp" in n for n in after_kill)
  assert sorted(n for n in os.listdir(output)
                if n.endswith(".array_record")) == shard_names
  resumed = pairs.read_all(output)
  assert len(resumed["e"]) == NUM
  # Same noise and label bits; the same solution to the solver's
  # tolerance (another batch shape may round differently in the last bit,
  # and the adaptive steps follow: ~1e-4 here; a wrong pair is O(1) off).
  np.testing.assert_array_equal(resumed["e"], eight_devices["e"])
  np.testing.assert_array_equal(resumed["y"], eight_devices["y"])
  np.testing.assert_allclose(resumed["x"], eight_devices["x"], rtol=1e-3,
                             atol=1e-3)


def test_resume_with_other_settings_is_refused(teacher_file,
                                               killed_and_resumed):
  _, _, output = killed_and_resumed
  with pytest.raises(ValueError, match=r"different \['seed'\]"):
    make_pairs.run(teacher_file, output, NUM, batch=8, seed=SEED + 1,
                   shard_size=SHARD)


def test_bad_input_is_one_line(teacher_file, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_pairs.run(str(tmp_path / "none.safetensors"), str(tmp_path), 8)
  with pytest.raises(ValueError, match="--solver='rk4'"):
    make_pairs.run(teacher_file, str(tmp_path), 8, solver="rk4")
  with pytest.raises(ValueError, match="--batch=12"):
    make_pairs.run(teacher_file, str(tmp_path), 8, batch=12)


def test_pipeline_reads_pairs_as_batches(eight_devices, killed_and_resumed):
  """data.pairs_dir: batches {'x': sample, 'e': its noise, 'y'} of the
  pairs, rows kept together; one epoch visits every pair once."""
  _, _, output = killed_and_resumed
  config = _config()
  config.data.pairs_dir = output
  config.training.batch_size = 8
  iterator = pipeline.make_train_iterator(config)
  batches = [next(iterator) for _ in range(NUM // 8)]
  assert set(batches[0]) == {"x", "e", "y"}
  seen = []
  for batch in batches:
    for x, e, y in zip(batch["x"], batch["e"], batch["y"]):
      i = int(np.flatnonzero((eight_devices["e"] == e).all(-1))[0])
      np.testing.assert_allclose(x, eight_devices["x"][i], rtol=1e-3,
                                 atol=1e-3)
      assert y == eight_devices["y"][i]
      seen.append(i)
  assert sorted(seen) == list(range(NUM))
