"""Export and import: the exported network is the one that was trained."""

import json
import os
import subprocess
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest

from mf_jax import export
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
