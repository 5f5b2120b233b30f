"""Import networks written by the official MeanFlow code: the JAX DiT
(Gsunshine/meanflow) and the PyTorch CIFAR-10 U-Net (Gsunshine/py-meanflow,
at the end of this module).

The official JAX trainer (Gsunshine/meanflow, flax 0.8 + orbax 0.4) saves a
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
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mf_jax.models import unet

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


# ---------------------------------------------------------------------------
# py-meanflow (Gsunshine/py-meanflow, PyTorch): the CIFAR-10 SongUNet.
#
# Its state dict names modules `enc.<res>x<res>_<block>.<layer>.<leaf>` (torch
# ModuleDicts), ours `enc_<res>x<res>_<block>/<layer>/<leaf>`; the arrays
# differ only in layout (conv OIHW -> HWIO, Linear (out, in) -> (in, out),
# GroupNorm weight -> scale). The down/up blocks also carry the resampling
# filter as a buffer, a constant our model rebuilds from `resample_filter`.

# The official SongUNet constructor's defaults (EDM's), for arguments a
# caller leaves out. Ours differ (they default to the CIFAR-10 setting).
SONG_UNET_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2),
    channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
    label_dropout=0, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=(1, 1))
_SONG_UNET_REQUIRED = ("img_resolution", "in_channels", "out_channels")

_BLOCK = r"((?:enc|dec)\.\d+x\d+_(?:block\d+|down|up|in\d+))"
_CONV_LAYER = r"(conv0|conv1|skip|qkv|proj)"
# (torch name regex, our '/'-path template, leaf kind).
_UNET_RULES = (
    (_BLOCK + r"\." + _CONV_LAYER + r"\.weight", r"\1/\2/kernel", "conv"),
    (_BLOCK + r"\." + _CONV_LAYER + r"\.bias", r"\1/\2/bias", "copy"),
    (_BLOCK + r"\.(norm[012])\.weight", r"\1/\2/scale", "copy"),
    (_BLOCK + r"\.(norm[012])\.bias", r"\1/\2/bias", "copy"),
    (_BLOCK + r"\.affine\.weight", r"\1/affine/kernel", "linear"),
    (_BLOCK + r"\.affine\.bias", r"\1/affine/bias", "copy"),
    (r"((?:enc|dec)\.\d+x\d+_(?:conv|aux_conv))\.weight", r"\1/kernel",
     "conv"),
    (r"((?:enc|dec)\.\d+x\d+_(?:conv|aux_conv|aux_norm))\.bias", r"\1/bias",
     "copy"),
    (r"(dec\.\d+x\d+_aux_norm)\.weight", r"\1/scale", "copy"),
    (r"(map_augment|map_layer[01])\.weight", r"\1/kernel", "linear"),
    (r"(map_layer[01])\.bias", r"\1/bias", "copy"),
)
_RESAMPLE_FILTER = re.compile(_BLOCK + r"\.(conv0|skip)\.resample_filter")
_TO_FLAX = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # OIHW -> HWIO
    "linear": lambda w: np.transpose(w),  # (out, in) -> (in, out)
    "copy": lambda w: w,
}


def _unet_rename(name: str):
  """(our '/'-path, leaf kind) of a torch name, or None if unknown."""
  for pattern, template, kind in _UNET_RULES:
    if re.fullmatch(pattern, name):
      path = re.sub(pattern, template, name)
      return path.replace(".", "_", 1), kind
  return None


def _resample_filter_of(buffer) -> tuple:
  """The 1-D filter f of a stored f f^T / sum(f)^2 buffer (up to scale)."""
  row = np.asarray(buffer, np.float64).reshape(buffer.shape[-2:])[0]
  f = row / row[0]
  rounded = np.round(f)
  return tuple(int(v) for v in rounded) if np.allclose(f, rounded) else (
      tuple(float(v) for v in f))


def _resample_buffer(filt) -> np.ndarray:
  f = np.asarray(filt, np.float64)
  return (np.outer(f, f) / np.square(f.sum()))[None, None]


def pymeanflow_unet_args(state_dict) -> dict:
  """The SongUNet constructor arguments its state dict's shapes determine.

  Everything but `dropout` and `label_dropout`, which hold no weights.
  Layouts our U-Net does not have (skip/residual encoder, skip decoder,
  class labels) show up as unknown keys in `pymeanflow_unet_to_mf_jax`.
  """
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  res = {int(m.group(1)) for m in (re.match(r"enc\.(\d+)x\1_", k)
                                   for k in shapes) if m}
  if not res:
    raise ValueError("Not a py-meanflow SongUNet state dict: no "
                     "enc.<res>x<res>_* keys.")
  try:
    size, levels = max(res), len(res)
    channels, in_channels = shapes[f"enc.{size}x{size}_conv.weight"][:2]
    out_channels = shapes[f"dec.{size}x{size}_aux_conv.weight"][0]
    emb, noise = shapes["map_layer0.weight"]
    num_blocks = len({k.split(".")[1] for k in shapes
                      if re.match(rf"enc\.{size}x{size}_block\d+\.", k)})
    mults, attn = [], set()
    for level in range(levels):
      r = size >> level
      mults.append(shapes[f"dec.{r}x{r}_block0.conv1.weight"][0] // channels)
      if any(re.match(rf"(enc\.{r}x{r}_block\d+|dec\.{r}x{r}_block"
                      rf"{num_blocks})\.qkv\.weight", k) for k in shapes):
        attn.add(r)
  except KeyError as e:
    raise ValueError(f"Not a py-meanflow SongUNet state dict: no {e} (keys "
                     "such as enc.32x32_conv.weight expected).") from e
  args = dict(img_resolution=size, in_channels=in_channels,
              out_channels=out_channels, model_channels=channels,
              channel_mult=mults, channel_mult_emb=emb // channels,
              channel_mult_noise=noise // (2 * channels),
              num_blocks=num_blocks, attn_resolutions=sorted(attn),
              augment_dim=shapes.get("map_augment.weight", (0, 0))[1],
              label_dim=shapes.get("map_label.weight", (0, 0))[1])
  filters = [v for k, v in state_dict.items() if _RESAMPLE_FILTER.fullmatch(k)]
  if filters:
    args["resample_filter"] = list(_resample_filter_of(filters[0]))
  return {k: (int(v) if isinstance(v, (int, np.integer)) else v)
          for k, v in args.items()}


def unet_config_from_official(args: dict) -> ml_collections.ConfigDict:
  """Our U-Net config for the official SongUNet's constructor arguments.

  Missing arguments take the official class defaults (not ours). Settings
  our U-Net cannot represent (class labels, which the official forward
  rejects anyway, Fourier embedding, skip/residual encoder, skip decoder,
  out_channels != in_channels) raise ValueError.
  """
  missing = [k for k in _SONG_UNET_REQUIRED if k not in args]
  unknown = sorted(set(args) - set(SONG_UNET_DEFAULTS)
                   - set(_SONG_UNET_REQUIRED))
  if missing or unknown:
    raise ValueError(f"SongUNet arguments: missing {missing}, unknown "
                     f"{unknown}.")
  a = {**SONG_UNET_DEFAULTS, **args}
  unsupported = {k: a[k] for k, ok in (
      ("label_dim", 0), ("embedding_type", "positional"),
      ("encoder_type", "standard"), ("decoder_type", "standard"))
                     if a[k] != ok}
  if a["out_channels"] != a["in_channels"]:
    unsupported["out_channels"] = a["out_channels"]
  if unsupported:
    raise ValueError(f"Our U-Net cannot represent the SongUNet setting "
                     f"{unsupported} (it supports label_dim=0, positional "
                     "embedding, standard encoder/decoder, out_channels = "
                     "in_channels).")
  return ml_collections.ConfigDict(dict(
      name="unet", variant="", time_inputs="t,h", dtype="float32",
      num_classes=0, input_size=int(a["img_resolution"]),
      in_channels=int(a["in_channels"]),
      model_channels=int(a["model_channels"]),
      channel_mult=tuple(int(m) for m in a["channel_mult"]),
      channel_mult_emb=int(a["channel_mult_emb"]),
      channel_mult_noise=int(a["channel_mult_noise"]),
      num_blocks=int(a["num_blocks"]),
      attn_resolutions=tuple(int(r) for r in a["attn_resolutions"]),
      resample_filter=tuple(a["resample_filter"]),
      dropout=float(a["dropout"]), augment_dim=int(a["augment_dim"])))


def pymeanflow_unet_to_mf_jax(state_dict, model_config) -> dict:
  """py-meanflow SongUNet state dict (name -> numpy, torch layout) -> the
  params of our U-Net built from `model_config` (Flax layout).

  Every expected parameter must be present with its shape and every torch
  name known; the resampling-filter buffers must equal the filter of
  `model_config`. Otherwise one ValueError lists what differs, so a layout
  change upstream cannot import silently wrong.
  """
  size, channels = model_config.input_size, model_config.in_channels
  z = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(
      unet.from_config(model_config).init, jax.random.key(0), z, t, t,
      y)["params"], sep="/")
  filt = _resample_buffer(model_config.resample_filter)
  flat, unknown, wrong = {}, [], []
  for name, value in sorted(state_dict.items()):
    value = np.asarray(value)
    if _RESAMPLE_FILTER.fullmatch(name):
      if value.shape != filt.shape or not np.allclose(value, filt, atol=1e-7):
        wrong.append(f"{name} (not the filter "
                     f"{tuple(model_config.resample_filter)})")
      continue
    renamed = _unet_rename(name)
    if renamed is None or renamed[0] not in expected:
      unknown.append(name)
      continue
    path, kind = renamed
    flat[path] = np.asarray(_TO_FLAX[kind](value), np.float32)
    if flat[path].shape != tuple(expected[path].shape):
      wrong.append(f"{name} {value.shape}")
  missing = sorted(set(expected) - set(flat))
  if unknown or missing or wrong:
    raise ValueError(
        f"The py-meanflow state dict does not fit the U-Net config: unknown "
        f"keys {unknown}, missing parameters {missing}, wrong shapes or "
        f"values {wrong}.")
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# py-meanflow's trainer saves {'model': MeanFlow.state_dict(), 'optimizer',
# 'lr_schedule', 'epoch', 'args'} with torch.save: the online net under
# 'net.', the EMAs under 'net_ema.' (decay args.ema_decay, 0.9999) and
# 'net_ema<i>.' (args.ema_decays[i-1]: 0.99995, 0.9996), plus the buffer
# 'num_updates' (optimizer steps). Its released CIFAR-10 model is scored with
# net_ema1. DDP and torch.compile add 'module.' / '_orig_mod.' to names.
PYMEANFLOW_EMA_DECAY = 0.9999
PYMEANFLOW_EXTRA_EMA_DECAYS = (0.99995, 0.9996)
_WRAPPERS = ("module", "_orig_mod")


def _unwrapped(name: str) -> str:
  return ".".join(p for p in name.split(".") if p not in _WRAPPERS)


def pymeanflow_nets(state_dict) -> dict:
  """{net name: SongUNet state dict} of a MeanFlow (or bare SongUNet) state
  dict; a bare one is named 'state_dict'. Other entries are dropped."""
  flat = {_unwrapped(k): v for k, v in state_dict.items()}
  if "map_layer0.weight" in flat:
    return {"state_dict": flat}
  nets = {}
  for name, value in flat.items():
    head, _, rest = name.partition(".")
    nets.setdefault(head, {})[rest] = value
  return {k: v for k, v in nets.items() if "map_layer0.weight" in v}


def pymeanflow_ema_decays(args=None) -> dict:
  """EMA decay of each py-meanflow net, from the checkpoint's args (an
  argparse Namespace or dict) when it has them, else the trainer's
  defaults."""
  get = (args.get if isinstance(args, dict) else
         lambda k, d: getattr(args, k, d))
  extra = get("ema_decays", PYMEANFLOW_EXTRA_EMA_DECAYS)
  decays = {"net": 0.0, "net_ema": float(get("ema_decay",
                                              PYMEANFLOW_EMA_DECAY))}
  decays.update({f"net_ema{i + 1}": float(d) for i, d in enumerate(extra)})
  return decays


def read_torch_checkpoint(path: str) -> dict:
  """torch.load of a .pth as numpy: {'nets', 'step', 'args'}.

  weights_only=True (no code runs from the file) with argparse.Namespace
  allowed, the type of py-meanflow's 'args'. torch is needed only here.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch (pip install torch), "
                      "or convert it to a .safetensors state dict.") from e
  import argparse  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:  # an OSError here says what it is
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types
      lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
      # torch's refusal names the offending class on its 'Unsupported' line.
      reason = next((l for l in lines if "Unsupported" in l), lines[0])
      reason = re.sub(r"\x1b\[[0-9;]*m", "", reason).split(". ")[0][:200]
      raise ValueError(
          f"{path} is not a py-meanflow checkpoint torch can read safely "
          f"({type(e).__name__}: {reason}); if you trust it, re-save its "
          "state dict: torch.save(torch.load(PATH, weights_only=False)"
          "['model'], NEW.pth).") from e
  if not isinstance(ckpt, dict):
    raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a "
                     "checkpoint dict or state dict.")
  state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
  to_numpy = lambda v: (v.detach().cpu().float().numpy()
                        if v.is_floating_point() else v.detach().cpu().numpy())
  arrays = {_unwrapped(k): to_numpy(v) for k, v in state.items()
            if isinstance(v, torch.Tensor)}
  step = arrays.get("num_updates", ckpt.get("step"))
  return {"nets": pymeanflow_nets(arrays), "args": ckpt.get("args"),
          "step": None if step is None else int(step)}
