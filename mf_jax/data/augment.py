"""EDM's geometric augmentation with its labels, per example in numpy.

MeanFlow's CIFAR-10 runs (py-meanflow) augment with EDM's AugmentPipe at
p = 0.12 with x-flips, isotropic scaling, anisotropic scaling and fractional
translation (no y-flips, no rotations) and feed the network the 6 numbers
that describe each transform, so it learns the augmented images as their own
conditional distribution and samples with zero labels are not augmented
("non-leaking" augmentation, EDM appendix). The labels, in order:

  [x-flip (0/1), log2 scale / 0.2, aniso w cos(r), aniso w sin(r),
   translate x / (0.125 W), translate y / (0.125 H)]

As in EDM, each transform is active with probability `p` times its
multiplier; the x-flip multiplier is 1e8, so at any p > 0 half of the images
are flipped (and labelled so). `p = 0` returns the image unchanged with zero
labels.

Simplification: EDM resamples through a 2x sym6-wavelet upsampling for
anti-aliasing; here the affine warp is one bilinear lookup with mirror
(reflect) boundaries at the image's own resolution. The distribution of
transforms and the labels are EDM's.

Deterministic: grain's `random_map` hands each element an rng derived from
the seed and the element's index, so a resumed pipeline repeats itself.
"""

import grain
import numpy as np

AUGMENT_DIM = 6
XFLIP_MULTIPLIER = 1e8  # the official AugmentPipe(xflip=1e8, ...)
SCALE_STD = 0.2  # log2 std of isotropic scaling
ANISO_STD = 0.2  # log2 std of anisotropic scaling
ANISO_ROTATE_PROB = 0.5  # anisotropy along a random axis instead of x/y
TRANSLATE_STD = 0.125  # std of translation, relative to the image size


def _scale(sx, sy):
  return np.diag([sx, sy, 1.0])


def _rotate(theta):
  c, s = np.cos(theta), np.sin(theta)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _translate(tx, ty):
  return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def sample_transform(rng: np.random.Generator, p: float, height: int,
                     width: int):
  """EDM's draw: (flip, G_inv, labels).

  G_inv maps output pixel coordinates (centred on the image) to input ones.
  Every random number is drawn whatever p is, so the stream has a fixed
  length per example.
  """
  flip = rng.integers(2) * float(rng.random() < XFLIP_MULTIPLIER * p)

  w_scale = rng.standard_normal() * float(rng.random() < p)
  s = 2.0 ** (w_scale * SCALE_STD)
  g_inv = _scale(1 / s, 1 / s)

  w_aniso = rng.standard_normal()
  r = (rng.random() * 2 - 1) * np.pi
  w_aniso *= float(rng.random() < p)
  r *= float(rng.random() < ANISO_ROTATE_PROB)
  s = 2.0 ** (w_aniso * ANISO_STD)
  g_inv = g_inv @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)

  w_tx, w_ty = rng.standard_normal(2) * float(rng.random() < p)
  g_inv = g_inv @ _translate(-w_tx * width * TRANSLATE_STD,
                             -w_ty * height * TRANSLATE_STD)

  labels = np.array([flip, w_scale, w_aniso * np.cos(r), w_aniso * np.sin(r),
                     w_tx, w_ty], np.float32)
  return bool(flip), g_inv, labels


def _reflect(coord, size: int):
  """Mirrors coordinates into [0, size - 1] (numpy's 'reflect' padding)."""
  if size == 1:
    return np.zeros_like(coord)
  period = 2 * (size - 1)
  return (size - 1) - np.abs((size - 1) - np.mod(coord, period))


def warp(image, g_inv):
  """Bilinear resampling of an HWC image at G_inv (output -> input)."""
  height, width = image.shape[:2]
  cx, cy = (width - 1) / 2, (height - 1) / 2
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
  out = np.stack([xs - cx, ys - cy, np.ones_like(xs)]).reshape(3, -1)
  src_x, src_y, _ = g_inv @ out
  src_x = _reflect(src_x + cx, width)
  src_y = _reflect(src_y + cy, height)
  x0 = np.floor(src_x).astype(np.int64)
  y0 = np.floor(src_y).astype(np.int64)
  x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
  fx, fy = (src_x - x0)[:, None], (src_y - y0)[:, None]
  top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
  bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
  pixels = top * (1 - fy) + bottom * fy
  return pixels.reshape(image.shape).astype(image.dtype)


def augment(image, rng: np.random.Generator, p: float):
  """One HWC image -> (augmented image, float32 labels of AUGMENT_DIM)."""
  height, width = image.shape[:2]
  flip, g_inv, labels = sample_transform(rng, p, height, width)
  if flip:
    image = image[:, ::-1]
  if not np.allclose(g_inv, np.eye(3), rtol=0, atol=1e-12):
    image = warp(image, g_inv)
  return np.ascontiguousarray(image), labels


def labels_enabled(config) -> bool:
  """Whether batches carry 'augment_labels': the model is told them.

  Augmenting without telling the model would teach it to generate the
  augmented images, so augment_p > 0 needs model.augment_dim = 6.
  """
  p = config.data.get("augment_p", 0.0)
  dim = config.model.get("augment_dim", 0)
  if dim not in (0, AUGMENT_DIM):
    raise ValueError(f"model.augment_dim is {dim}; the augmentation pipeline "
                     f"makes {AUGMENT_DIM} labels (or 0 for none).")
  if not 0 <= p <= 1:
    raise ValueError(f"data.augment_p must be in [0, 1], got {p}.")
  if p > 0 and not dim:
    raise ValueError(f"data.augment_p={p} needs a model with augment_dim="
                     f"{AUGMENT_DIM} (e.g. the U-Net); without the labels the "
                     "augmentations leak into the samples.")
  return bool(dim)


def add_to_dataset(ds: grain.MapDataset, config, seed: int):
  """Adds augmentation and 'augment_labels' to a dataset of {'x', 'y'}
  elements when the model takes the labels (zeros when augment_p is 0)."""
  if not labels_enabled(config):
    return ds
  p = float(config.data.augment_p)

  def apply(element, rng):
    image, labels = augment(element["x"], rng, p)
    return dict(element, x=image, augment_labels=labels)

  return ds.random_map(apply, seed=seed)
