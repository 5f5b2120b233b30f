r"""Imports an official MeanFlow network into mf_jax's export format.

  python -m mf_jax.tools.import_official \
      --checkpoint=/ckpt/checkpoint_1200960 --output=/ckpt/mf_b4.safetensors
  python -m mf_jax.tools.import_official \
      --checkpoint=/ckpt/checkpoint-last.pth --output=/ckpt/mf_cifar.safetensors

The official JAX DiT (Gsunshine/meanflow): `--checkpoint` is a
`checkpoint_<step>/` directory, or the directory holding several of them (the
latest is taken). Its EMA network (`ema_params['net']`, what the official
evaluation uses; `--noema` takes `params['net']`) is renamed to our DiT's
keys. The checkpoint holds weights only, so the DiT's sizes are read off
their shapes (patch, channels, width, depth, classes, MLP ratio). Two are not
in the shapes: `--num_heads` (default: the DiT table's value for the width,
12 for B) and `--input_size` (latent side, default 32 for ImageNet 256);
`--meta=FILE` reads them (and checks the rest) from a JSON of
`dit_config_from_official`'s fields.

The official PyTorch CIFAR-10 U-Net (Gsunshine/py-meanflow): `--checkpoint`
is a `.pth` its trainer saved (torch needed to read it), or a
`.safetensors` state dict of a SongUNet (or of its MeanFlow module). Of the
MeanFlow module's nets, the EMA of decay 0.99995 (`net_ema1`, the one the
released model is scored with) is taken, `--noema` takes the online `net`,
`--net=NAME` any other (`net_ema`: decay 0.9999). All sizes are read off the
state dict; dropout (training only) from the checkpoint's args if present.

Either way the network is written with `mf_jax.export.save`, so
`mf_jax.export.load` evaluates it like any exported run.
"""

import json
import os
import re

import safetensors
import safetensors.numpy
from absl import app
from absl import flags

from mf_jax import export
from mf_jax.models import dit
from mf_jax.models import official

# The official runs keep one EMA with this decay (official_meanflow.md §3.4).
OFFICIAL_EMA_DECAY = 0.9999
IMAGENET_LATENT_SIZE = 32
PYMEANFLOW_SUFFIXES = (".pth", ".pt", ".safetensors")
_STEP_DIR = re.compile(r"checkpoint_(\d+)")


def find_checkpoint(path: str) -> str:
  """`path` if it is a checkpoint_<step>/ directory, else its latest one."""
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return path
  steps = {}
  if os.path.isdir(path):
    for name in os.listdir(path):
      match = _STEP_DIR.fullmatch(name)
      if match and os.path.isfile(os.path.join(path, name, "checkpoint")):
        steps[int(match.group(1))] = os.path.join(path, name)
  if not steps:
    raise FileNotFoundError(
        f"No official checkpoint at {path}: expected a checkpoint_<step>/ "
        "directory holding a 'checkpoint' file, or a directory of them.")
  return steps[max(steps)]


def dit_sizes(params) -> dict:
  """The DiT fields the parameter shapes determine (our key names)."""
  patch, _, channels, width = params["x_embedder"]["kernel"].shape
  depth = sum(1 for k in params if re.fullmatch(r"blocks_\d+", k))
  hidden = params["blocks_0"]["mlp"]["fc1"]["kernel"].shape[1]
  classes = (params["y_embedder"]["embedding"].shape[0] - 1
             if "y_embedder" in params else 0)
  return dict(patch_size=int(patch), in_channels=int(channels),
              hidden_size=int(width), depth=depth, num_classes=int(classes),
              mlp_ratio=hidden / width)


def _default_heads(width: int) -> int:
  heads = {v["num_heads"] for v in dit.DIT_VARIANTS.values()
           if v["hidden_size"] == width}
  if len(heads) != 1:
    raise ValueError(f"No standard DiT has width {width}: pass --num_heads "
                     "(or --meta).")
  return heads.pop()


def official_model_config(params, meta: dict | None = None,
                          input_size: int | None = None,
                          num_heads: int | None = None):
  """Our model config for imported parameters: shapes, then meta, then
  flags; a meta value the shapes contradict is an error."""
  sizes = dit_sizes(params)
  meta = dict(meta or {})
  wrong = {k: (meta[k], v) for k, v in sizes.items()
           if k in meta and meta[k] != v}
  if wrong:
    raise ValueError(f"--meta disagrees with the checkpoint's shapes "
                     f"(meta, checkpoint): {wrong}.")
  fields = {**meta, **sizes}
  if input_size is not None:
    fields["input_size"] = input_size
  fields.setdefault("input_size", IMAGENET_LATENT_SIZE)
  if num_heads is not None:
    fields["num_heads"] = num_heads
  if "num_heads" not in fields:
    fields["num_heads"] = _default_heads(sizes["hidden_size"])
  return official.dit_config_from_official(fields)


def _choose_net(path: str, nets: dict, use_ema: bool, net: str | None):
  """The py-meanflow net to import (see the module docstring)."""
  if not nets:
    raise ValueError(f"{path} holds no SongUNet state dict (no "
                     "map_layer0.weight under any prefix).")
  if net:
    if net not in nets:
      raise ValueError(f"--net={net} is not in {path}; it holds "
                       f"{sorted(nets)}.")
    return net
  if len(nets) == 1:
    return next(iter(nets))
  for name in (("net_ema1", "net_ema") if use_ema else ("net",)):
    if name in nets:
      return name
  raise ValueError(f"{path} holds nets {sorted(nets)}: pick one with --net.")


def _read_pymeanflow(path: str) -> dict:
  """{'nets', 'args', 'step'} of a .pth or a .safetensors state dict."""
  if not path.endswith(".safetensors"):
    return official.read_torch_checkpoint(path)
  try:
    arrays = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"{path} is not a readable safetensors file "
                     f"({e}).") from e
  return {"nets": official.pymeanflow_nets(arrays), "args": None,
          "step": None}


def import_pymeanflow(path: str, output: str, use_ema=True,
                      net: str | None = None) -> dict:
  """Reads a py-meanflow U-Net, writes the export; returns its JSON."""
  ckpt = _read_pymeanflow(path)
  name = _choose_net(path, ckpt["nets"], use_ema, net)
  state_dict = ckpt["nets"][name]
  args = ckpt["args"]
  dropout = (args.get("dropout", 0.0) if isinstance(args, dict)
             else getattr(args, "dropout", 0.0))
  config = official.unet_config_from_official(
      {**official.pymeanflow_unet_args(state_dict), "dropout": dropout})
  params = official.pymeanflow_unet_to_mf_jax(state_dict, config)
  record = export.save(
      output, params, config,
      source=f"py-meanflow:{os.path.abspath(path)}:{name}", step=ckpt["step"],
      ema_decay=official.pymeanflow_ema_decays(args).get(name),
      objective="meanflow", sampler="flow_map")
  export.load_params(output)  # the config builds exactly these shapes
  return record


def is_pymeanflow(path: str) -> bool:
  """A file (.pth, .pt, .safetensors) rather than an official JAX dir."""
  return not os.path.isdir(path) and path.endswith(PYMEANFLOW_SUFFIXES)


def import_checkpoint(checkpoint: str, output: str, meta_path=None,
                      input_size=None, num_heads=None, use_ema=True,
                      net=None) -> dict:
  """Reads an official checkpoint, writes the export; returns its JSON."""
  if is_pymeanflow(checkpoint):
    dit_only = {k: v for k, v in (("--meta", meta_path), ("--input_size",
                input_size), ("--num_heads", num_heads)) if v is not None}
    if dit_only:
      raise ValueError(f"{sorted(dit_only)} are for the official DiT; a "
                       "py-meanflow U-Net's sizes are all in its weights.")
    return import_pymeanflow(checkpoint, output, use_ema, net)
  if net is not None:
    raise ValueError("--net picks a py-meanflow net; the official JAX "
                     "checkpoint has params and ema_params (--ema).")
  directory = find_checkpoint(checkpoint)
  meta = None
  if meta_path:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  ckpt = official.load_official_checkpoint(directory)
  params = ckpt["ema_params" if use_ema else "params"]
  config = official_model_config(params, meta, input_size, num_heads)
  record = export.save(
      output, params, config, source=f"official:{os.path.abspath(directory)}",
      step=ckpt["step"], ema_decay=OFFICIAL_EMA_DECAY if use_ema else 0.0,
      objective="meanflow", sampler="flow_map")
  export.load_params(output)  # the config builds exactly these shapes
  return record


def main(argv):
  del argv
  record = import_checkpoint(_CHECKPOINT.value, _OUTPUT.value, _META.value,
                             _INPUT_SIZE.value, _NUM_HEADS.value, _EMA.value,
                           _NET.value)
  print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CHECKPOINT = flags.DEFINE_string(
      "checkpoint", None, "checkpoint_<step>/ directory, or one holding "
      "several (the latest is taken); or a py-meanflow .pth / .safetensors.")
  _OUTPUT = flags.DEFINE_string("output", None, "FILE.safetensors to write "
                                "(FILE.json is written beside it).")
  _META = flags.DEFINE_string("meta", None, "JSON with the DiT's sizes "
                              "(input_size, num_heads, ...).")
  _INPUT_SIZE = flags.DEFINE_integer(
      "input_size", None, f"Latent side (default {IMAGENET_LATENT_SIZE}).")
  _NUM_HEADS = flags.DEFINE_integer(
      "num_heads", None, "Attention heads (default: the DiT table's value "
      "for the width).")
  _EMA = flags.DEFINE_boolean("ema", True, "Import the EMA (what the "
                              "official evaluation uses), else the online "
                              "parameters.")
  _NET = flags.DEFINE_string("net", None, "py-meanflow only: the net to "
                             "import (net, net_ema, net_ema1, ...).")
  flags.mark_flags_as_required(["checkpoint", "output"])
  app.run(main)
