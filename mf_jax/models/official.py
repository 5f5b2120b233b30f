"""Import checkpoints written by the official MeanFlow JAX code.

The official trainer (Gsunshine/meanflow, flax 0.8 + orbax 0.4) saves a
TrainState dict {step, params, opt_state, ema_params} as one msgpack file,
`checkpoint_<step>/checkpoint`; the DiT is under `params['net']` and
`ema_params['net']` (evaluation uses the EMA). Its modules wrap every layer
(`nn.Sequential` gives `layers_<i>`, a torch-like Linear wrapper gives
`_flax_linear`), so only the key paths differ from our DiT: the arrays and
the computation are the same (official_meanflow.md §3.3).
"""

import os
import re

import flax.serialization
import flax.traverse_util
import ml_collections

# (official path regex, mf_jax path template), applied to '/'-joined keys.
_RULES = (
    (r"x_embedder/proj/(kernel|bias)", r"x_embedder/\1"),
    (r"([th])_embedder/mlp/layers_0/_flax_linear/(kernel|bias)",
     r"\1_embedder/fc1/\2"),
    (r"([th])_embedder/mlp/layers_2/_flax_linear/(kernel|bias)",
     r"\1_embedder/fc2/\2"),
    (r"y_embedder/embedding_table/_flax_embedding/embedding",
     r"y_embedder/embedding"),
    (r"blocks/layers_(\d+)/adaLN_modulation/layers_1/_flax_linear/"
     r"(kernel|bias)", r"blocks_\1/adaLN_modulation/\2"),
    (r"blocks/layers_(\d+)/(attn/qkv|attn/proj|mlp/fc1|mlp/fc2)/_flax_linear/"
     r"(kernel|bias)", r"blocks_\1/\2/\3"),
    (r"final_layer/adaLN_modulation/layers_1/_flax_linear/(kernel|bias)",
     r"final_layer/adaLN_modulation/\1"),
    (r"final_layer/linear/_flax_linear/(kernel|bias)",
     r"final_layer/linear/\1"),
)


def _rename(path: str) -> str | None:
  for pattern, template in _RULES:
    if re.fullmatch(pattern, path):
      return re.sub(pattern, template, path)
  return None


def official_to_mf_jax(net_tree) -> dict:
  """Official `['net']` parameter tree -> params of our `DiT` (same arrays).

  Raises ValueError listing any key the mapping does not know, so a layout
  change in the official code cannot be imported silently wrong.
  """
  flat = flax.traverse_util.flatten_dict(net_tree, sep="/")
  renamed = {path: _rename(path) for path in flat}
  unknown = sorted(path for path, new in renamed.items() if new is None)
  if unknown:
    raise ValueError(f"Unexpected keys in the official parameter tree: "
                     f"{unknown}. Pass the tree under ['net'].")
  return flax.traverse_util.unflatten_dict(
      {renamed[path]: value for path, value in flat.items()}, sep="/")


def load_official_checkpoint(checkpoint_dir: str) -> dict:
  """Reads `checkpoint_<step>/` into {'step', 'params', 'ema_params'} (ours).

  Adam moments are dropped: only the weights transfer. A file that is not
  such a checkpoint (truncated, overwritten, another format) fails with one
  line naming it; the decoder's own error is chained for the details.
  """
  path = os.path.join(checkpoint_dir, "checkpoint")
  with open(path, "rb") as f:  # an OSError here says what it is
    data = f.read()
  try:
    state = flax.serialization.msgpack_restore(data)
    nets = {k: state[k]["net"] for k in ("params", "ema_params")}
    step = int(state["step"])
  except Exception as e:  # msgpack raises many types; all mean the same here
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(
        f"{path} is not a readable official MeanFlow checkpoint "
        f"({type(e).__name__}: {reason}); expected the msgpack of "
        "{step, params['net'], ema_params['net']} the official trainer "
        "writes: the file is damaged or of another format.") from e
  return {"step": step,
          "params": official_to_mf_jax(nets["params"]),
          "ema_params": official_to_mf_jax(nets["ema_params"])}


def dit_config_from_official(meta: dict) -> ml_collections.ConfigDict:
  """Our model config for an official DiT's sizes (e.g. a fixture's meta.json).

  The official network always embeds t and h, i.e. time_inputs='t,h'.
  """
  fields = ("input_size", "in_channels", "patch_size", "hidden_size", "depth",
            "num_heads", "num_classes")
  missing = [k for k in fields if k not in meta]
  if missing:
    raise ValueError(f"Official DiT metadata lacks {missing}.")
  return ml_collections.ConfigDict(dict(
      name="dit", variant="", time_inputs="t,h", remat=False,
      dtype="float32", mlp_ratio=float(meta.get("mlp_ratio", 4.0)),
      **{k: meta[k] for k in fields}))
