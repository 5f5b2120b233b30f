"""InceptionV3 as FID uses it (pytorch-fid's port of the 2015 TF graph), Flax.

The network is the torchvision InceptionV3 trunk with pytorch-fid's patches,
which make it compute what TensorFlow's FID graph computes:

- the Mixed_5* (A), Mixed_6b-e (C) and Mixed_7b (E_1) blocks average-pool
  without counting the zero padding (TF's average pool),
- the last block, Mixed_7c (E_2), max-pools in its pool branch (a quirk of
  the TF graph that FID numbers depend on),
- the classifier has 1008 outputs (the TF graph's label set).

Outputs are the 2048-d pool3 features (FID) and the 1008 logits (Inception
Score). The logits are `pool3 @ W` without the bias by default: the logits
that OpenAI's improved-GAN IS code, ADM's evaluator (`softmax/logits/MatMul`)
and torch-fidelity's `logits_unbiased` feed their softmax.

One network serves every published protocol (`PROTOCOLS`); they differ only
before it, in how uint8 pixels become its 299x299 input (and, for samples,
in how floats became uint8 pixels):

- `adm`: ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py)
  feeds pixels as floats in [0, 255] to the TF graph, whose first ops are a
  TF 1.x `ResizeBilinear` to 299 (align_corners=False: source coordinate
  dst * in / out, no half-pixel offset, the last row/column repeated) and
  then (x - 128) / 128. The official MeanFlow JAX evaluator resizes with
  the StyleGAN2-ADA TorchScript Inception's affine_grid/grid_sample (theta
  shifted by 1/in - 1/out, border padding), which lands on the same source
  coordinates, then (x - 128) / 128.
- `pytorch_fid`: pytorch-fid's InceptionV3(resize_input, normalize_input):
  pixels / 255, `F.interpolate(bilinear, align_corners=False)` (half-pixel
  centres, no antialiasing), then 2x - 1, i.e. (x - 127.5) / 127.5.
- `torchmetrics`: torchmetrics' FrechetInceptionDistance up to 1.7 (and
  torch-fidelity itself): torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x` (the TF 1.x resize above)
  and (x - 128) / 128, i.e. the `adm` input.
- `torchmetrics_antialias`: torchmetrics >= 1.8, whose default
  `antialias=True` resizes with `F.interpolate(bilinear,
  align_corners=False, antialias=True)` instead (on upsampling, e.g.
  CIFAR-10's 32 -> 299, the same as pytorch-fid's resize).

The weights are one file for all: pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's (torchmetrics')
`weights-inception-2015-12-05-6726825d.pth` are both the TF graph's
weights in torchvision's layout, and carry the same sha256 prefix, which
torch.hub checks. The user names the file (local, or a gs:// URI copied to
a local cache once), never a download: either .pth (read with torch when it
is installed), or its conversion by `convert_weights` to `.npz` or
`.safetensors`, which needs no torch at evaluation time.

Everything is NHWC. BatchNorm runs in inference form from stored statistics
kept in the 'params' collection: the network is never trained here.
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mf_jax import files

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPSILON = 1e-3  # torchvision's BasicConv2d BatchNorm epsilon.


class ConvBN(nn.Module):
  """Conv (no bias), inference BatchNorm, ReLU: torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False,
                precision=self.precision, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


class FrozenBatchNorm(nn.Module):
  """BatchNorm from stored running statistics (all four arrays are params)."""

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, shape)
    bias = self.param("bias", nn.initializers.zeros, shape)
    mean = self.param("mean", nn.initializers.zeros, shape)
    var = self.param("var", nn.initializers.ones, shape)
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPSILON)) + bias


def _avg_pool_same(x):
  """3x3 stride-1 average pool that ignores the padding, as TF's does."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """Mixed_5b/c/d (pytorch-fid's FIDInceptionA)."""
  pool_features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(
        _avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: the 35x35 -> 17x17 reduction (unpatched torchvision block)."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1),
                                                         padding=(3, 0))
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: the 17x17 -> 8x8 reduction (unpatched torchvision block)."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (E_2, max pool)."""
  max_pool: bool
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1),
                                                         padding=(1, 0))
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3),
                          conv(384, **col, name="branch3x3_2b")(b3)], -1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, **row, name="branch3x3dbl_3a")(bd),
                          conv(384, **col, name="branch3x3dbl_3b")(bd)], -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1),
                           padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Preprocessed NHWC images in [-1, 1] -> (pool3 (N, 2048), logits (N, 1008)).

  Module and parameter names follow torchvision's, so the torch state dict
  maps onto the parameter tree key by key (see `torch_to_flax`).
  """
  logits_with_bias: bool = False
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    p = dict(precision=self.precision)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, **p, name="Mixed_5b")(x)
    x = InceptionA(64, **p, name="Mixed_5c")(x)
    x = InceptionA(64, **p, name="Mixed_5d")(x)
    x = InceptionB(**p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(c7, **p, name=name)(x)
    x = InceptionD(**p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, **p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, **p, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")
    logits = fc(pool3)
    if not self.logits_with_bias:
      logits = jnp.dot(pool3, fc.variables["params"]["kernel"],
                       precision=self.precision)
    return pool3, logits


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a published FID implementation feeds the Inception network.

  resize: 'tf1' (TF 1.x ResizeBilinear, align_corners=False), 'half_pixel'
    (torch bilinear, align_corners=False) or 'antialias' (the same with
    torch's antialias=True).
  center: the network sees (pixel - center) / center.
  uint8: how float samples x in [-1, 1] become pixels: 'round' is
    floor(127.5 x + 128) (the official MeanFlow evaluator's clip(127.5 x +
    128) cast), 'floor' is floor(255 clip(x / 2 + 1/2, 0, 1)) (py-meanflow's
    eval loop, whose floats torchmetrics' normalize=True turns back into
    the same bytes with `(x * 255).byte()`).
  num_samples: the sample count its published numbers use.
  """
  name: str
  resize: str
  center: float
  uint8: str
  num_samples: int = 50_000


PROTOCOLS = {p.name: p for p in (
    Protocol("adm", "tf1", 128.0, "round"),
    Protocol("pytorch_fid", "half_pixel", 127.5, "round"),
    Protocol("torchmetrics", "tf1", 128.0, "floor"),
    Protocol("torchmetrics_antialias", "antialias", 128.0, "floor"),
)}


def get_protocol(protocol: "str | Protocol") -> Protocol:
  if isinstance(protocol, Protocol):
    return protocol
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown FID protocol {protocol!r}; valid: "
                     f"{tuple(PROTOCOLS)}.")
  return PROTOCOLS[protocol]


def _tf1_resize_axis(x, axis: int, out: int):
  """TF 1.x bilinear resize (align_corners=False) along one axis.

  Output index j samples the input at j * (in / out) with the scale and
  the product rounded to x's float type, as TF's kernel (and torch-
  fidelity's bit-exact replica) computes them: the grid starts at the
  first pixel's corner, not its centre, and the last pixel is repeated.
  """
  size = x.shape[axis]
  dtype = np.dtype(x.dtype)
  scale = np.float64(np.float32(size / out))
  source = (np.arange(out) * scale).astype(dtype)  # exact product, rounded
  low = np.floor(source).astype(np.int32)
  high = np.minimum(low + 1, size - 1)
  shape = [1] * x.ndim
  shape[axis] = out
  frac = jnp.asarray((source - low).reshape(shape), x.dtype)
  a = jnp.take(x, low, axis=axis)
  b = jnp.take(x, high, axis=axis)
  return a + (b - a) * frac


def _resize(x, size: int, kind: str):
  if kind == "tf1":  # width first, then height, as TF's kernel
    return _tf1_resize_axis(_tf1_resize_axis(x, 2, size), 1, size)
  # jax.image.resize samples at half-pixel centres as torch's
  # align_corners=False does; its antialiasing (a triangle filter widened
  # by the downscale factor, weights renormalised at the borders) is
  # torch's antialias=True, and off gives plain bilinear downsampling too.
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]),
                          "bilinear", antialias=kind == "antialias")


def preprocess(images, protocol: "str | Protocol" = "pytorch_fid",
               size: int = INPUT_SIZE) -> jax.Array:
  """uint8 NHWC pixels (or floats in [0, 255]) -> the network's input.

  Follows the protocol's reference step by step, in its order (the steps
  are affine per pixel, so only rounding would differ otherwise):
  pytorch-fid scales to [0, 1], resizes, then maps to 2x - 1; torch-
  fidelity, torchmetrics and the TF graph resize the [0, 255] values and
  then compute (x - 128) / 128. Grayscale (C = 1) is repeated to three
  channels. Floats keep their type (float64 under x64, for exact tests).
  """
  protocol = get_protocol(protocol)
  images = jnp.asarray(images)
  dtype = (jnp.promote_types(images.dtype, jnp.float32)
           if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32)
  x = images.astype(dtype)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  resize = x.shape[1:3] != (size, size)
  if protocol.resize == "half_pixel":  # pytorch-fid
    x = x / 255.0
    x = _resize(x, size, protocol.resize) if resize else x
    return 2.0 * x - 1.0
  x = _resize(x, size, protocol.resize) if resize else x
  return (x - protocol.center) / protocol.center


def features_and_logits(module, params, images, size: int = INPUT_SIZE,
                        protocol: "str | Protocol" = "pytorch_fid"):
  """(pool3 (N, 2048), logits (N, 1008)) of uint8 NHWC images, fed to the
  network as `protocol` feeds it.

  `size` is 299 for FID; smaller sizes (>= 75) only serve fast tests.
  """
  return module.apply({"params": params}, preprocess(images, protocol, size))


# ------------------------------------------------------------------- weights


def random_params(module, size: int = INPUT_SIZE, seed: int = 0) -> dict:
  """He-scaled random weights with identity BatchNorm, for tests and trials
  without the real file. Drawn in numpy: a jitted `module.init` of 24M
  parameters takes minutes to compile on a small CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))["params"]

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
    if name in ("scale", "var"):
      return np.ones(leaf.shape)
    return np.zeros(leaf.shape)

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: draw(path, leaf).astype(np.float32), shapes)


def torch_to_flax(state_dict) -> dict:
  """pytorch-fid state dict (name -> array) -> nested Flax params (numpy).

  Conv weights go OIHW -> HWIO, the fc weight (out, in) -> (in, out); the
  BatchNorm's weight/bias/running_mean/running_var become
  scale/bias/mean/var; `num_batches_tracked` and the unused AuxLogits are
  dropped.
  """
  rename = {"weight": "scale", "bias": "bias", "running_mean": "mean",
            "running_var": "var"}
  params = {}
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    parts = key.split(".")
    if parts[0] == "AuxLogits" or parts[-1] == "num_batches_tracked":
      continue
    leaf = parts[-1]
    if parts[-2] == "conv":
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif parts[-2] == "bn":
      leaf = rename[leaf]
    elif parts[0] == "fc":
      if leaf == "weight":
        leaf, value = "kernel", value.T
    else:
      raise ValueError(f"Unexpected Inception weight {key!r}.")
    node = params
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[leaf] = value
  return params


def _flatten(tree, prefix=""):
  """Nested dict -> {'a/b/leaf': leaf}; leaves are kept as they are."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      flat.update(_flatten(value, name))
    else:
      flat[name] = value
  return flat


def _unflatten(flat) -> dict:
  tree = {}
  for name, value in flat.items():
    *path, leaf = name.split("/")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value, np.float32)
  return tree


def _read_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs torch; convert it once where torch is "
        "installed: mf_jax.evaluation.inception.convert_weights(pth, "
        "'x.npz').") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return torch_to_flax({k: v.numpy() for k, v in state_dict.items()})


def read_weights(path: str) -> dict:
  """Flax params from a .pth/.pt (torch), .npz or .safetensors file, local
  or a URI."""
  ext = os.path.splitext(path)[1].lower()
  path = files.local_copy(path)
  if ext in (".pth", ".pt"):
    return _read_torch(path)
  if ext == ".npz":
    with np.load(path) as data:
      return _unflatten({k: data[k] for k in data.files})
  if ext == ".safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    return _unflatten(st_numpy.load_file(path))
  raise ValueError(f"Unknown Inception weight format {path!r}; expected "
                   ".pth, .npz or .safetensors.")


def save_weights(params, out_path: str) -> str:
  """Writes Flax params as .npz or .safetensors (by extension), flat keys
  like 'Mixed_5b/branch1x1/conv/kernel'."""
  flat = {k: np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in _flatten(params).items()}
  if out_path.lower().endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    st_numpy.save_file(flat, out_path)
  else:
    np.savez(out_path, **flat)
  return out_path


def convert_weights(pth_path: str, out_path: str) -> str:
  """pytorch-fid's .pth -> .npz or .safetensors: evaluation needs no torch."""
  return save_weights(_read_torch(pth_path), out_path)


def _check_shapes(params, abstract):
  """Fails with the offending names when a file does not fit the network."""
  got = {k: tuple(v.shape) for k, v in _flatten(params).items()}
  want = {k: tuple(v.shape) for k, v in _flatten(abstract).items()}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    raise ValueError(f"Inception weights do not fit: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}.")


# A few tensors whose shapes tell pytorch-fid's network from anything else:
# the stem, the last block and the 1008-class classifier.
_SIGNATURE = {"Conv2d_1a_3x3/conv/kernel": (3, 3, 3, 32),
              "Mixed_7c/branch_pool/conv/kernel": (1, 1, FEATURE_DIM, 192),
              "fc/kernel": (FEATURE_DIM, NUM_CLASSES)}


def check_weights(path: str):
  """Fails in seconds, with a ValueError saying what is wrong, when `path`
  is not FID's Inception: reads only the headers of .npz/.safetensors files
  (a .pth is read in full, with torch)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".pth", ".pt", ".npz", ".safetensors"):
    raise ValueError(f"unknown Inception weight format {ext!r}; expected "
                     ".pth, .npz or .safetensors")
  local = files.local_copy(path)
  if ext in (".pth", ".pt"):
    shapes = {k: tuple(v.shape)
              for k, v in _flatten(_read_torch(local)).items()}
  else:
    shapes = files.tensor_shapes(local)
  for name, want in _SIGNATURE.items():
    if name not in shapes:
      found = ", ".join(sorted(shapes)[:3]) or "none"
      raise ValueError(f"not pytorch-fid's Inception: no {name} among its "
                       f"tensors ({found}, ...)")
    if shapes[name] != want:
      raise ValueError(f"{name} has shape {shapes[name]}, not {want}")


def load_inception(path: str, logits_with_bias: bool = False):
  """(module, params) from a weight file, local or a URI (see
  `read_weights`)."""
  module = FIDInceptionV3(logits_with_bias=logits_with_bias)
  params = read_weights(path)
  abstract = jax.eval_shape(
      module.init, jax.random.key(0),
      jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
  _check_shapes(params, abstract)
  return module, jax.tree.map(jnp.asarray, params)
