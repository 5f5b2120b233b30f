"""The official py-meanflow U-Net's weights in our U-Net: same outputs.

The fixture (tests/fixtures/pymeanflow_unet, see its README.md) was written
by the official PyTorch code (Gsunshine/py-meanflow): a small SongUNet's
state dict with every branch non-trivial, and its outputs with and without
augmentation labels, at h = 0, and the forward-mode derivative training
takes (tangents (v, 1, 0) of (z, t, r), h = t - r).
"""

import argparse
import functools
import json
import os
import subprocess
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from mf_jax import export
from mf_jax import models
from mf_jax.models import official
from mf_jax.tools import import_official

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "pymeanflow_unet")
WEIGHTS = os.path.join(FIXTURE, "weights.safetensors")
# A float32 port of the same computation: max |ours - official| over
# max |official|.
RTOL = 1e-5


def _fixture():
  with open(os.path.join(FIXTURE, "config.json"), encoding="utf-8") as f:
    meta = json.load(f)
  return (meta, safetensors.numpy.load_file(WEIGHTS),
          dict(np.load(os.path.join(FIXTURE, "io.npz"))))


META, STATE_DICT, IO = _fixture()
CONFIG = official.unet_config_from_official(META["constructor_args"])
MODEL = models.build_model(CONFIG)


@jax.jit
def _u_and_dudt(params, z, t, r, augment_labels, v):
  """u(z, t, r) = net(z, (t, t - r), labels) and its training JVP, tangents
  (v, 1, 0), as the official trainer takes it."""
  u_fn = lambda z, t, r: MODEL.apply({"params": params}, z, t, t - r, None,
                                     augment_labels=augment_labels)
  return jax.jvp(u_fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))


def _assert_close(ours, reference, what):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape, what
  error = np.abs(ours - reference).max() / np.abs(reference).max()
  assert error < RTOL, f"{what}: relative error {error:.2e}"


def _assert_reproduces_fixture(params):
  """One compiled call on three copies of the batch: as given (`out`, the
  derivative), with r = t (`out_h0`), with zero augmentation labels
  (`out_noaug`: the official None; our None is tested through export)."""
  x, t, r, a, v = (IO[k] for k in ("x_nhwc", "t", "r", "aug_cond", "v_nhwc"))
  u, dudt = _u_and_dudt(params, np.concatenate([x] * 3),
                        np.concatenate([t] * 3), np.concatenate([r, t, r]),
                        np.concatenate([a, a, np.zeros_like(a)]),
                        np.concatenate([v] * 3))
  out, out_h0, out_noaug = np.split(np.asarray(u), 3)
  _assert_close(out, IO["out_nhwc"], "out")
  _assert_close(out, IO["jvp_u"].transpose(0, 2, 3, 1), "jvp primal")
  _assert_close(dudt[:len(x)], IO["jvp_dudt_nhwc"], "jvp tangent du/dt")
  _assert_close(out_h0, IO["out_h0_nhwc"], "out at h = 0")
  _assert_close(out_noaug, IO["out_noaug_nhwc"], "out without labels")


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


@functools.cache
def _fixture_params():
  return official.pymeanflow_unet_to_mf_jax(STATE_DICT, CONFIG)


def test_official_weights_reproduce_official_outputs_and_jvp():
  params = _fixture_params()
  assert models.param_count(params) == META["param_count"]["small"]
  _assert_reproduces_fixture(params)


def test_constructor_args_from_the_weights_and_the_official_defaults():
  args = official.pymeanflow_unet_args(STATE_DICT)
  expected = {k: v for k, v in META["constructor_args"].items()
              if k not in ("dropout", "label_dropout", "embedding_type",
                           "encoder_type", "decoder_type")}
  assert args == expected
  # The official CIFAR-10 net (its script's arguments, the class defaults
  # for the rest) has the official count, 55,932,419.
  cifar = {k: v for k, v in META["official_cifar10_constructor_args"].items()
           if not k.startswith("_")}
  config = official.unet_config_from_official(cifar)
  assert config.model_channels == 128 and config.num_blocks == 4
  assert models.param_count(models.abstract_params(
      models.build_model(config), (32, 32, 3))) == 55_932_419
  # EDM's class defaults, not ours, fill what the caller leaves out.
  plain = official.unet_config_from_official(
      dict(img_resolution=32, in_channels=3, out_channels=3))
  assert (plain.channel_mult, plain.channel_mult_noise,
          plain.resample_filter, plain.dropout) == ((1, 2, 2, 2), 1, (1, 1),
                                                    0.1)
  for bad in ({"label_dim": 10}, {"encoder_type": "residual"},
              {"out_channels": 6}, {"num_heads": 2}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      official.unet_config_from_official({**cifar, **bad})


def test_mapping_names_unknown_missing_and_wrong_entries():
  extra = {**STATE_DICT, "enc.16x16_aux_skip.weight": np.zeros((32, 3, 1, 1))}
  with pytest.raises(ValueError, match=r"unknown keys \['enc.16x16_aux_skip"):
    official.pymeanflow_unet_to_mf_jax(extra, CONFIG)
  fewer = {k: v for k, v in STATE_DICT.items()
           if k != "dec.8x8_in0.qkv.weight"}
  with pytest.raises(ValueError,
                     match=r"missing parameters \['dec_8x8_in0/qkv/kernel'\]"):
    official.pymeanflow_unet_to_mf_jax(fewer, CONFIG)
  # The resampling filter is a constant of our model, checked not imported.
  box = {**STATE_DICT,
         "enc.8x8_down.skip.resample_filter": np.full((1, 1, 4, 4), 1 / 16,
                                                      np.float32)}
  with pytest.raises(ValueError, match="enc.8x8_down.skip.resample_filter"):
    official.pymeanflow_unet_to_mf_jax(box, CONFIG)
  try:
    official.pymeanflow_unet_to_mf_jax(fewer, CONFIG)
  except ValueError as e:
    assert "\n" not in str(e)


def _tool(*args):
  return subprocess.run(
      [sys.executable, "-m", "mf_jax.tools.import_official", *args], cwd=REPO,
      capture_output=True, text=True, timeout=300)


def _assert_exports_fixture(path, state_dict=None):
  """The export holds exactly the mapped arrays of `state_dict`; for the
  fixture's, they reproduce its outputs."""
  got = _flat(export.load_params(path)[1])
  want = _flat(_fixture_params() if state_dict is None else
               official.pymeanflow_unet_to_mf_jax(state_dict, CONFIG))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if state_dict is None:
    _assert_reproduces_fixture(flax.traverse_util.unflatten_dict(got,
                                                                 sep="/"))


def test_import_tool_reads_a_safetensors_state_dict(tmp_path):
  out = str(tmp_path / "cifar.safetensors")
  done = _tool(f"--checkpoint={WEIGHTS}", f"--output={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  meta = export.read_meta(out)
  assert (meta.name, meta.input_size, meta.channel_mult) == ("unet", 16,
                                                             [1, 2])
  assert meta.source == f"py-meanflow:{WEIGHTS}:state_dict"
  _assert_exports_fixture(out)
  # The loader's sampling function (augmentation labels None).
  u_fn, _ = export.load(out)
  _assert_close(u_fn(IO["x_nhwc"], IO["t"], IO["r"]), IO["out_noaug_nhwc"],
                "export.load's u_fn")
  with pytest.raises(ValueError, match="are for the official DiT"):
    import_official.import_checkpoint(WEIGHTS, out, num_heads=4)


def test_import_tool_reads_a_pymeanflow_training_checkpoint(tmp_path):
  """The trainer's layout: {'model': MeanFlow state dict, 'args', ...},
  here saved from a torch.compile'd module ('_orig_mod.' names)."""
  torch = pytest.importorskip("torch")
  online = {k: v if k.endswith("resample_filter") else v + 0.01 * (i % 7)
            for i, (k, v) in enumerate(STATE_DICT.items())}
  nets = {"net": online, "net_ema": online, "net_ema1": STATE_DICT,
          "net_ema2": online}
  model = {f"_orig_mod.{net}.{k}": torch.from_numpy(np.array(v))
           for net, tree in nets.items() for k, v in tree.items()}
  model["_orig_mod.num_updates"] = torch.tensor(1234)
  path = str(tmp_path / "checkpoint-last.pth")
  torch.save({"model": model, "optimizer": {"state": {}}, "epoch": 9,
              "args": argparse.Namespace(ema_decay=0.9999,
                                         ema_decays=[0.99995, 0.9996],
                                         dropout=0.2)}, path)
  out = str(tmp_path / "ema.safetensors")
  record = import_official.import_checkpoint(path, out)
  assert (record["step"], record["ema_decay"], record["dropout"]) == (
      1234, 0.99995, 0.2)
  assert record["source"] == f"py-meanflow:{path}:net_ema1"
  _assert_exports_fixture(out)
  noema = str(tmp_path / "online.safetensors")
  record = import_official.import_checkpoint(path, noema, use_ema=False)
  assert (record["ema_decay"], record["source"][-4:]) == (0.0, ":net")
  _assert_exports_fixture(noema, online)
  with pytest.raises(ValueError, match="net_ema9 is not in"):
    import_official.import_checkpoint(path, noema, net="net_ema9")
