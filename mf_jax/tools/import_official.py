r"""Imports an official MeanFlow JAX checkpoint into mf_jax's export format.

  python -m mf_jax.tools.import_official \
      --checkpoint=/ckpt/checkpoint_1200960 --output=/ckpt/mf_b4.safetensors

`--checkpoint` is a `checkpoint_<step>/` directory written by the official
code (Gsunshine/meanflow), or the directory holding several of them (the
latest is taken). Its EMA network (`ema_params['net']`, what the official
evaluation uses; `--noema` takes `params['net']`) is renamed to our DiT's
keys and written with `mf_jax.export.save`, so `mf_jax.export.load` evaluates
it like any exported run.

The checkpoint holds weights only, so the DiT's sizes are read off their
shapes (patch, channels, width, depth, classes, MLP ratio). Two are not in
the shapes: `--num_heads` (default: the DiT table's value for the width, 12
for B) and `--input_size` (latent side, default 32 for ImageNet 256);
`--meta=FILE` reads them (and checks the rest) from a JSON of
`dit_config_from_official`'s fields.
"""

import json
import os
import re

from absl import app
from absl import flags

from mf_jax import export
from mf_jax.models import dit
from mf_jax.models import official

# The official runs keep one EMA with this decay (official_meanflow.md §3.4).
OFFICIAL_EMA_DECAY = 0.9999
IMAGENET_LATENT_SIZE = 32
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


def import_checkpoint(checkpoint: str, output: str, meta_path=None,
                      input_size=None, num_heads=None, use_ema=True) -> dict:
  """Reads an official checkpoint, writes the export; returns its JSON."""
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
                             _INPUT_SIZE.value, _NUM_HEADS.value, _EMA.value)
  print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CHECKPOINT = flags.DEFINE_string(
      "checkpoint", None, "checkpoint_<step>/ directory, or one holding "
      "several (the latest is taken).")
  _OUTPUT = flags.DEFINE_string("output", None, "FILE.safetensors to write "
                                "(FILE.json is written beside it).")
  _META = flags.DEFINE_string("meta", None, "JSON with the DiT's sizes "
                              "(input_size, num_heads, ...).")
  _INPUT_SIZE = flags.DEFINE_integer(
      "input_size", None, f"Latent side (default {IMAGENET_LATENT_SIZE}).")
  _NUM_HEADS = flags.DEFINE_integer(
      "num_heads", None, "Attention heads (default: the DiT table's value "
      "for the width).")
  _EMA = flags.DEFINE_boolean("ema", True, "Import ema_params (what the "
                              "official evaluation uses), else params.")
  flags.mark_flags_as_required(["checkpoint", "output"])
  app.run(main)
