"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax Linen, NHWC.

DiT and MeanFlow train on the latents of `stabilityai/sd-vae-ft-mse` (or
`-ema`): a 256x256x3 image in [-1, 1] becomes a 32x32x4 Gaussian posterior
(mean, std) and the decoder maps latents back to images. This module rebuilds
that network so the weights load straight from the diffusers safetensors file
the user names; nothing is downloaded (DESIGN.md §3 lists run-time downloads
among the reference code's traps).

Parameter names follow the diffusers state dict with '.' nesting and list
indices merged into the name ('encoder.down_blocks.0.resnets.1.conv1.weight'
-> params['encoder']['down_blocks_0']['resnets_1']['conv1']['kernel']), so the
conversion is mechanical and checked key by key against the module's shapes.

Public interface (the data tools and the FID driver use these):
  load_vae(path) -> (module, params)                 path: local or gs://
  check_weights(path, latent_channels) -> channels   a few shapes, no load
  encode(module, params, images) -> (mean, std)     unscaled latents
  decode(module, params, latents) -> images in [-1, 1]
  load_latent_decoder(path) -> (decode_fn, params)   for scaled latents
  save_vae(path, params, module)                     diffusers-format file
  LATENT_SCALE = 0.18215                             applied by the data reader
"""

import functools
import json
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mf_jax import files

LATENT_SCALE = 0.18215
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_EPS = 1e-6  # every GroupNorm of the SD VAE
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers clamps the posterior log-variance
# Older diffusers files (sd-vae-ft-mse among them) name the attention
# projections like this; newer ones use to_q / to_k / to_v / to_out.0.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                           "proj_attn": "to_out_0"}
_CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels",
                  "layers_per_block", "latent_channels", "norm_num_groups",
                  "use_quant_conv", "use_post_quant_conv",
                  "mid_block_add_attention")


def _norm(groups, name):
  # Exact two-pass variance: decoder activations reach the hundreds, where
  # E[x^2] - E[x]^2 in float32 loses digits.
  return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False,
                      name=name)


def _conv(features, kernel, name, dtype, stride=1, padding=None):
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""
  features: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_norm(self.groups, "norm1")(x))
    h = _conv(self.features, 3, "conv1", self.dtype)(h)
    h = nn.silu(_norm(self.groups, "norm2")(h))
    h = _conv(self.features, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all positions, with a residual."""
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = _norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    dense = functools.partial(nn.Dense, c, dtype=self.dtype)
    q = dense(name="to_q")(tokens)
    k = dense(name="to_k")(tokens)
    v = dense(name="to_v")(tokens)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)
    out = dense(name="to_out_0")(out)
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding only bottom and right, as diffusers."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=0)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class Encoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_features: int  # 2 * latent_channels: mean and log-variance
  groups: int
  add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    chans = self.block_out_channels
    x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
    for i, features in enumerate(chans):
      x = _Level(features, self.layers_per_block, self.groups,
                 "down" if i < len(chans) - 1 else None, self.dtype,
                 name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.add_attention, self.dtype,
                 name="mid_block")(x)
    x = nn.silu(_norm(self.groups, "conv_norm_out")(x))
    return _conv(self.out_features, 3, "conv_out", self.dtype)(x)


class _Level(nn.Module):
  """One resolution level: resnets, then a down- or upsampler (or none)."""
  features: int
  num_layers: int
  groups: int
  resample: str | None  # "down", "up" or None (the last level)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype,
                      name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, name="upsamplers_0")(x)
    return x


class Decoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_features: int
  groups: int
  add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    chans = tuple(reversed(self.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", self.dtype)(z)
    x = MidBlock(self.groups, self.add_attention, self.dtype,
                 name="mid_block")(x)
    for i, features in enumerate(chans):
      # The decoder has one resnet more per level than the encoder.
      x = _Level(features, self.layers_per_block + 1, self.groups,
                 "up" if i < len(chans) - 1 else None, self.dtype,
                 name=f"up_blocks_{i}")(x)
    x = nn.silu(_norm(self.groups, "conv_norm_out")(x))
    return _conv(self.out_features, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder; defaults are the SD VAE (8x spatial reduction).

  Use through `encode` / `decode` below, or `module.apply(variables, x,
  method='encode' | 'decode')`.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups,
                  add_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(out_features=2 * self.latent_channels, **common)
    self.decoder = Decoder(out_features=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, None, self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, None, self.dtype)

  def encode(self, images):
    """Images (B, H, W, 3) in [-1, 1] -> posterior (mean, std), float32."""
    moments = self.encoder(images)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, *_LOGVAR_RANGE)
    return mean, jnp.exp(0.5 * logvar)

  def decode(self, latents):
    """Unscaled latents (B, h, w, C) -> images, not clipped, float32."""
    if self.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents).astype(jnp.float32)

  def __call__(self, images):
    """Encode then decode the mean: used to create every parameter."""
    mean, _ = self.encode(images)
    return self.decode(mean)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def config_dict(self) -> dict:
    """The diffusers config.json fields this module reproduces."""
    n = len(self.block_out_channels)
    config = {k: getattr(self, k) for k in _CONFIG_FIELDS}
    config["block_out_channels"] = list(self.block_out_channels)
    config.update(_class_name="AutoencoderKL", act_fn="silu",
                  down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n,
                  scaling_factor=LATENT_SCALE)
    return config


@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, images):
  return module.apply({"params": params}, images, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def _decode(module, params, latents):
  return module.apply({"params": params}, latents, method="decode")


def encode(module: AutoencoderKL, params, images_nhwc):
  """(mean, std) of the posterior of images in [-1, 1]; unscaled latents.

  Jitted once per module and shape; a batch sharded over a mesh is encoded
  where it lies (the output keeps the input's batch sharding).
  """
  return _encode(module, params, jnp.asarray(images_nhwc, jnp.float32))


def decode(module: AutoencoderKL, params, latents_nhwc, clip: bool = True):
  """Images in [-1, 1] from unscaled latents (divide by LATENT_SCALE first).

  `clip=False` returns the decoder's raw output (for parity checks).
  """
  images = _decode(module, params, jnp.asarray(latents_nhwc, jnp.float32))
  return jnp.clip(images, -1.0, 1.0) if clip else images


def module_from_config(config: dict, dtype=jnp.float32) -> AutoencoderKL:
  """An AutoencoderKL from a diffusers config dict; unsupported types fail."""
  act = config.get("act_fn", "silu")
  blocks = set(config.get("down_block_types", ["DownEncoderBlock2D"])) | set(
      config.get("up_block_types", ["UpDecoderBlock2D"]))
  if act != "silu" or blocks != {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
    raise ValueError(f"Unsupported VAE config (act_fn={act!r}, blocks="
                     f"{sorted(blocks)}): only the SD AutoencoderKL is built.")
  kwargs = {k: config[k] for k in _CONFIG_FIELDS if k in config}
  if "block_out_channels" in kwargs:
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
  return AutoencoderKL(dtype=dtype, **kwargs)


def abstract_params(module: AutoencoderKL):
  """Parameter shapes of `module`, without allocating them."""
  size = 2 * module.downsample_factor
  images = jax.ShapeDtypeStruct((1, size, size, module.in_channels),
                                jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def random_params(module: AutoencoderKL, seed: int = 0):
  """Random parameters with unit-scale activations, drawn in numpy.

  For tests and trials: unlike `module.init` this compiles nothing (the
  jitted init of even a tiny VAE takes a minute to compile on a busy CPU),
  and norms and biases are random too, so a weight mix-up cannot hide.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(module))


def weights_file(path: str) -> str:
  """The safetensors file of a diffusers directory, or `path` itself."""
  return str(epath.Path(path) / WEIGHTS_NAME) if files.is_dir(path) else path


def _weights_and_config(path: str) -> tuple[str, dict]:
  """(local weights file, diffusers config or {}) of a file or directory,
  local or remote (remote weights are copied to the local cache once)."""
  weights = weights_file(path)
  if not files.exists(weights):
    raise FileNotFoundError(
        f"No VAE weights at {weights}: pass a diffusers "
        f"'{WEIGHTS_NAME}' file (e.g. from stabilityai/sd-vae-ft-mse).")
  config_path = epath.Path(weights).parent / "config.json"
  config = files.read_json(config_path) if config_path.exists() else {}
  return files.local_copy(weights), config


def check_weights(path: str, latent_channels: int | None = None) -> int:
  """Fails in seconds, with a ValueError saying what is wrong, when `path`
  is not an SD-VAE that decodes `latent_channels`-channel latents to RGB:
  reads the tensor shapes in the file's header (and its config.json), not
  the weights. Returns the file's latent channels."""
  weights, config = _weights_and_config(path)
  shapes = files.tensor_shapes(weights, "safetensors")  # as load_vae reads
  conv_in, conv_out = "decoder.conv_in.weight", "decoder.conv_out.weight"
  if conv_in not in shapes or conv_out not in shapes:
    found = ", ".join(sorted(shapes)[:3]) or "none"
    raise ValueError(f"not a diffusers AutoencoderKL: no {conv_in} or "
                     f"{conv_out} among its tensors ({found}, ...)")
  module = module_from_config(config)
  channels = shapes[conv_in][1]  # torch layout (out, in, kh, kw)
  if channels != module.latent_channels:
    raise ValueError(f"{conv_in} takes {channels} latent channels but its "
                     f"config says {module.latent_channels}")
  if shapes[conv_out][0] != module.out_channels:
    raise ValueError(f"{conv_out} makes {shapes[conv_out][0]} channels, "
                     f"not {module.out_channels}")
  if latent_channels is not None and channels != latent_channels:
    raise ValueError(f"it decodes {channels}-channel latents but the model "
                     f"makes {latent_channels} (model.in_channels)")
  return channels


def load_vae(path: str, dtype=jnp.float32):
  """(module, params) from a diffusers safetensors file or its directory,
  local or a URI.

  The architecture comes from `config.json` beside the file when present,
  else the standard SD VAE config (sd-vae-ft-mse / -ema).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  weights, config = _weights_and_config(path)
  module = module_from_config(config, dtype)
  with safe_open(weights, framework="flax") as f:
    state = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  return module, from_diffusers(state, module)


@functools.lru_cache(maxsize=1)
def load_latent_decoder(path: str):
  """(decode_fn(params, latents) -> images in [-1, 1], params) for latents
  as training sees them: stored times LATENT_SCALE, so divided by it here.
  Works inside jit (sample grids, the FID driver) and outside. Cached, so
  periodic grids and evaluations read the weights once."""
  module, params = load_vae(path)

  def decode_fn(vae_params, latents):
    return decode(module, vae_params, latents / LATENT_SCALE)

  return decode_fn, params


def _flax_path(key: str) -> tuple[str, ...]:
  """'a.down_blocks.0.to_out.0.weight' -> ('a', 'down_blocks_0', 'to_out_0',
  'weight'), with legacy attention names renamed."""
  path = []
  for part in key.split("."):
    if part.isdigit():
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(_LEGACY_ATTENTION_NAMES.get(part, part))
  return tuple(path)


def _to_flax(array: np.ndarray, want_ndim: int) -> np.ndarray:
  if want_ndim == 1:  # biases, GroupNorm weight -> scale
    return array
  if want_ndim == 2:  # Linear (out, in) -> Dense (in, out); some files store
    return array.reshape(array.shape[:2]).T  # attention as 1x1 convs
  return array.transpose(2, 3, 1, 0)  # Conv (O, I, kh, kw) -> (kh, kw, I, O)


def from_diffusers(state: dict[str, np.ndarray], module: AutoencoderKL):
  """Flax params from a diffusers state dict; any mismatch is an error."""
  expected = {tuple(k.key for k in path): leaf for path, leaf in
              jax.tree_util.tree_leaves_with_path(abstract_params(module))}
  flat = {}
  for key, array in state.items():
    *prefix, leaf = _flax_path(key)
    # A diffusers 'weight' is a Flax 'kernel' (conv, dense) or 'scale' (norm).
    names = ("bias",) if leaf == "bias" else ("kernel", "scale")
    found = [t for t in ((*prefix, n) for n in names) if t in expected]
    if not found:
      raise ValueError(f"VAE weight {key!r} has no place in the module "
                       f"(config mismatch?).")
    target = found[0]
    value = _to_flax(array, len(expected[target].shape))
    if value.shape != expected[target].shape:
      raise ValueError(f"VAE weight {key!r}: shape {array.shape} does not fit "
                       f"{expected[target].shape}.")
    flat[target] = value
  missing = sorted(".".join(p) for p in expected if p not in flat)
  if missing:
    raise ValueError(f"VAE weights file lacks {len(missing)} parameters, "
                     f"e.g. {missing[:3]}.")
  params = {}
  for path, value in flat.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(value)
  return params


def to_diffusers(params) -> dict[str, np.ndarray]:
  """The diffusers state dict (current key names) of Flax params."""
  state = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    names = [k.key for k in path]
    parts = []
    for name in names[:-1]:
      base, _, index = name.rpartition("_")
      parts.extend([base, index] if index.isdigit() and base else [name])
    value = np.asarray(value, np.float32)
    leaf = names[-1]
    if leaf == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    state[".".join(parts + ["bias" if leaf == "bias" else "weight"])] = (
        np.ascontiguousarray(value))
  return state


def save_vae(path: str, params, module: AutoencoderKL) -> str:
  """Writes `params` as a diffusers directory (safetensors + config.json).

  `path` is the directory; returns the weights file. Used by tests to make
  small random VAEs without torch.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  weights = os.path.join(path, WEIGHTS_NAME)
  save_file(to_diffusers(params), weights)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(module.config_dict(), f, indent=2)
  return weights
