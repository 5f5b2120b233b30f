"""Export and import: the exported network is the one that was trained."""

import json
import os
import subprocess
import sys

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import pytest

from mf_jax import export
from mf_jax import models
from mf_jax import samplers
from mf_jax.tools import export as export_tool
from mf_jax.tools import import_official
from mf_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import toy2d  # pylint: disable=g-import-not-at-top,wrong-import-position

# Written by the official MeanFlow code (see its README.md); shared/ sits
# beside the repository checkout (as in test_models.py).
FIXTURE = os.path.join(REPO, "tests", "fixtures", "official_meanflow_tiny")


def _tool(name, *args):
  return subprocess.run(
      [sys.executable, "-m", f"mf_jax.tools.{name}", *args], cwd=REPO,
      capture_output=True, text=True, timeout=300)


def _last_line(done) -> str:
  """What a user reads: the last line of stderr (a traceback's own last
  line is the exception's message)."""
  return done.stderr.strip().splitlines()[-1]


def tiny_toy_config(num_steps=8):
  c = toy2d.get_config("objective=meanflow")
  c.model.update(hidden_size=32, depth=1)
  # A short EMA and a large step: after 8 steps the exported network's
  # samples must differ visibly from the noise (its output layer starts at 0).
  c.optimizer.lr = 1e-2
  c.training.update(num_steps=num_steps, batch_size=64, log_every_steps=4,
                    ema_decays=(0.9,))
  c.checkpoint.update(every_steps=num_steps, async_save=False)
  c.eval.update(every_steps=0)
  c.sample.update(every_steps=0)
  return c


def test_import_official_reproduces_official_outputs(tmp_path):
  out = str(tmp_path / "official.safetensors")
  # The parent directory: the tool finds checkpoint_3 in it. The sizes come
  # from the weights' shapes except the two the shapes cannot tell.
  done = _tool("import_official",
               f"--checkpoint={os.path.join(FIXTURE, 'checkpoint')}",
               f"--output={out}", "--num_heads=4", "--input_size=8")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(FIXTURE, "meta.json")) as f:
    fixture_meta = json.load(f)
  u_fn, meta = export.load(out)
  for key in ("input_size", "patch_size", "in_channels", "hidden_size",
              "depth", "num_heads", "num_classes", "mlp_ratio"):
    assert meta[key] == fixture_meta[key], key
  assert (meta.step, meta.ema_decay, meta.sampler) == (3, 0.9999, "flow_map")
  assert meta.source.startswith("official:")
  io = np.load(os.path.join(FIXTURE, "io.npz"))
  z, t, r, y = io["z"], io["t"], io["r"], io["y"]
  np.testing.assert_allclose(u_fn(z, t, r, y), io["u_ema"], atol=1e-5,
                             rtol=1e-5)
  one_step = z - u_fn(z, 1.0, 0.0, y)
  np.testing.assert_allclose(one_step, io["one_step_ema"], atol=1e-5,
                             rtol=1e-5)
  # The online and EMA weights differ, so the comparison picks out the EMA.
  assert not np.allclose(io["u_ema"], io["u_params"], atol=1e-4)
  # The safetensors header carries the same record if the JSON gets lost.
  os.remove(export.config_path(out))
  assert export.read_meta(out) == meta


def test_official_import_rejects_contradicting_meta(tmp_path):
  params = {"x_embedder": {"kernel": np.zeros((2, 2, 4, 8))},
            "blocks_0": {"mlp": {"fc1": {"kernel": np.zeros((8, 32))}}}}
  with pytest.raises(ValueError, match="hidden_size"):
    import_official.official_model_config(params, {"hidden_size": 16})
  with pytest.raises(ValueError, match="num_heads"):
    import_official.official_model_config(params)  # width 8: no DiT table row
  with pytest.raises(FileNotFoundError, match="checkpoint_<step>"):
    import_official.find_checkpoint(str(tmp_path))


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_exported_run_samples_like_the_run(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "toy.safetensors")
  trainer.train_and_evaluate(tiny_toy_config(), workdir)
  # The CLI, with the config the run saved in WORKDIR/config.json.
  done = _tool("export", f"--workdir={workdir}", f"--output={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  printed = json.loads(done.stdout.splitlines()[-1])
  with open(export.config_path(out)) as f:
    written = json.load(f)
  for record in (printed, written):
    assert (record["step"], record["ema_decay"]) == (8, 0.9)
    assert record["weights_sha256"] == export.weights_checksum(
        export.flatten_params(export.load_params(out)[1]))
    assert (record["objective"], record["sampler"]) == ("meanflow", "flow_map")
  assert written["name"] == "mlp" and written["hidden_size"] == 32

  config = tiny_toy_config()
  exp = trainer.Experiment(config, workdir)
  state, _ = exp.restore()
  exp.checkpointer.close()
  ema = jax.device_get(exp.eval_params(state))
  _, params, _ = export.load_params(out)
  expected, got = _flat(ema), _flat(params)
  assert expected.keys() == got.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value)
  online = _flat(state.params)
  assert any(not np.array_equal(online[k], v) for k, v in expected.items())

  u_fn, _ = export.load(out)

  def exported(params, z, t, h, y, train):  # the samplers' u_fn signature
    del params, train
    return u_fn(z, t, t - h, y)
  noise = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
  labels = np.zeros((64,), np.int32)
  one_and_two = []
  for nfe in (1, 2):
    steps = samplers.uniform_timesteps(nfe)
    want = samplers.flow_map_sample(exp.u_fn, ema, noise, labels, steps)
    have = samplers.flow_map_sample(exported, None, noise, labels, steps)
    np.testing.assert_allclose(have, want, atol=1e-6, rtol=0)
    one_and_two.append(np.asarray(have))
  assert np.abs(one_and_two[0] - noise).mean() > 1e-2
  assert np.abs(one_and_two[0] - one_and_two[1]).mean() > 1e-3

  with pytest.raises(ValueError, match="No checkpoint at step 5"):
    export_tool.export_run(workdir, out, step=5)
  with pytest.raises(ValueError, match="No EMA with decay 0.5"):
    export_tool.export_run(workdir, out, ema_decay=0.5)


def test_export_without_checkpoint_fails_clearly(tmp_path):
  out = str(tmp_path / "x.safetensors")
  with pytest.raises(FileNotFoundError, match="config.json"):
    export_tool.export_run(str(tmp_path), out)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    export_tool.export_run(str(tmp_path), out, config=tiny_toy_config())
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(out)
  with pytest.raises(IsADirectoryError, match="is a directory"):
    export_tool.export_run(str(tmp_path), str(tmp_path),
                           config=tiny_toy_config())


def _random_export(directory, nonfinite=None):
  """(path, params): an export of the tiny toy MLP with random weights;
  `nonfinite` = {key: (count, value)} spoils the first values of those
  parameters first, the way a diverged run's state would be."""
  config = tiny_toy_config().model
  shapes = models.abstract_params(models.build_model(config), (2,))
  rng = np.random.default_rng(0)
  flat = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in
          flax.traverse_util.flatten_dict(shapes, sep="/").items()}
  for key, (count, value) in (nonfinite or {}).items():
    flat[key].reshape(-1)[:count] = value
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  path = str(directory / "w.safetensors")
  export.save(path, params, config, source="test", step=1, ema_decay=0.0,
              objective="meanflow", sampler="flow_map")
  return path, flat


def test_export_checksum_catches_a_bit_flip(tmp_path):
  path, flat = _random_export(tmp_path)
  with open(export.config_path(path)) as f:
    recorded = json.load(f)["weights_sha256"]
  assert recorded == export.weights_checksum(flat)
  _, params, meta = export.load_params(path)  # intact: loads, verified
  assert meta.weights_sha256 == recorded
  # One bit of the last weight (the tensor data ends the file) flipped: the
  # file is still a valid safetensors file, only the value changed.
  with open(path, "r+b") as f:
    f.seek(-1, os.SEEK_END)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_END)
    f.write(bytes([byte ^ 0x01]))
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  changed = [k for k, v in safetensors.numpy.load_file(path).items()
             if not np.array_equal(v, flat[k])]
  assert len(changed) == 1
  with pytest.raises(ValueError) as error:
    export.load(path)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{path}: weights checksum mismatch")
  assert "damaged or was changed after export" in message
  del params


def test_export_without_checksum_loads_with_a_warning(tmp_path, caplog):
  """An export written before checksums existed: no field to verify."""
  path, flat = _random_export(tmp_path)
  json_path = export.config_path(path)
  with open(json_path) as f:
    record = json.load(f)
  del record["weights_sha256"]
  with open(json_path, "w") as f:
    json.dump(record, f)
  with caplog.at_level("WARNING"):
    _, params, meta = export.load_params(path)
  assert "weights_sha256" not in meta
  assert any("loaded unverified" in r.getMessage() and path in r.getMessage()
             for r in caplog.records)
  got = flax.traverse_util.flatten_dict(params, sep="/")
  assert all(np.array_equal(got[k], v) for k, v in flat.items())


def test_export_refuses_nonfinite_weights_and_writes_nothing(tmp_path):
  run = tmp_path / "run"
  path, flat = _random_export(run)  # a good export already there
  before = {name: (run / name).read_bytes() for name in os.listdir(run)}
  first, later = sorted(flat)[0], sorted(flat)[-1]
  with pytest.raises(FloatingPointError) as error:
    _random_export(run, {later: (2, np.inf), first: (3, np.nan)})
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"Refusing to export {path}: parameter "
                            f"{first!r} has 3 non-finite values")
  assert message.endswith("5 in 2 parameters in all. Nothing was written.")
  # Neither file was replaced and no temporary file is left; a new export
  # of non-finite weights leaves no files at all.
  after = {name: (run / name).read_bytes() for name in os.listdir(run)}
  assert after == before
  with pytest.raises(FloatingPointError):
    _random_export(tmp_path / "new", {first: (1, -np.inf)})
  assert not os.path.exists(tmp_path / "new")


def _official_copy(tmp_path, change):
  """The official fixture checkpoint copied to tmp_path, its file bytes
  passed through `change`; returns its checkpoint_3 directory."""
  source = os.path.join(FIXTURE, "checkpoint", "checkpoint_3", "checkpoint")
  directory = tmp_path / "ckpt" / "checkpoint_3"
  directory.mkdir(parents=True)
  with open(source, "rb") as f:
    data = f.read()
  (directory / "checkpoint").write_bytes(change(data))
  return str(directory)


def test_import_official_refuses_nonfinite_weights(tmp_path):
  def spoil(data):
    state = flax.serialization.msgpack_restore(data)
    linear = state["ema_params"]["net"]["final_layer"]["linear"][
        "_flax_linear"]
    linear["kernel"] = np.array(linear["kernel"])  # a writable copy
    linear["kernel"].reshape(-1)[:4] = np.nan
    return flax.serialization.msgpack_serialize(state)
  directory = _official_copy(tmp_path, spoil)
  out = str(tmp_path / "out" / "mf.safetensors")
  done = _tool("import_official", f"--checkpoint={directory}",
               f"--output={out}", "--num_heads=4", "--input_size=8")
  assert done.returncode == 1
  line = _last_line(done)
  assert line.startswith(
      f"FloatingPointError: Refusing to export {out}: parameter "
      "'final_layer/linear/kernel' has 4 non-finite values (NaN or Inf)"), line
  assert line.endswith("4 in 1 parameters in all. Nothing was written.")
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_import_official_names_a_damaged_file(tmp_path, damage):
  def change(data):
    if damage == "truncated":  # e.g. a copy that stopped half way
      return data[:len(data) // 2]
    return np.random.default_rng(0).bytes(4096)
  directory = _official_copy(tmp_path, change)
  path = os.path.join(directory, "checkpoint")
  out = str(tmp_path / "mf.safetensors")
  if damage == "random":  # in process: the cause is chained
    with pytest.raises(ValueError) as error:
      import_official.import_checkpoint(directory, out)
    assert error.value.__cause__ is not None
    assert f"{path} is not a readable official MeanFlow checkpoint" in str(
        error.value)
    assert "\n" not in str(error.value)
  else:  # the CLI, as the issue ran it
    done = _tool("import_official", f"--checkpoint={directory}",
                 f"--output={out}")
    assert done.returncode == 1
    line = _last_line(done)
    assert line.startswith(
        f"ValueError: {path} is not a readable official MeanFlow checkpoint "
        "(ValueError: Unpack failed: incomplete input)"), line
    assert "the file is damaged or of another format" in line
  assert not os.path.exists(out)


def test_load_says_what_an_export_is(tmp_path):
  expected = "expected an mf_jax export NAME.safetensors"
  with pytest.raises(IsADirectoryError,
                     match=f"{tmp_path} is a directory; {expected}"):
    export.load(str(tmp_path))
  missing = str(tmp_path / "missing.safetensors")
  with pytest.raises(FileNotFoundError,
                     match=f"{missing} does not exist; {expected}"):
    export.load(missing)
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(ValueError, match="is not a readable safetensors file"):
    export.load(str(junk))
  # The same with a valid JSON beside it (the weights file replaced).
  path, _ = _random_export(tmp_path)
  with open(path, "wb") as f:
    f.write(b"not safetensors")
  with pytest.raises(ValueError,
                     match=f"{path} is not a readable safetensors file"):
    export.load(path)
  with pytest.raises(IsADirectoryError, match="an export is written to a "
                     "file, NAME.safetensors"):
    export.save(str(tmp_path), {"w": np.zeros(2)}, {"name": "mlp"})
