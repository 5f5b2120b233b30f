"""Pictures of samples: image grids and 2-D point densities, saved as PNG."""

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats to uint8 by rounding, the conversion used everywhere."""
  return np.clip(np.round(127.5 * images + 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int, scale: int = 1,
               pad: int = 1) -> np.ndarray:
  """Tiles NHWC images in [-1, 1] row-major into one uint8 picture, each
  enlarged `scale` times and framed by `pad` pixels of mid-grey."""
  images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  cells = np.zeros((rows * columns, h + 2 * pad, w + 2 * pad, c), np.float32)
  cells[:n, pad:pad + h, pad:pad + w] = images
  grid = cells.reshape(rows, columns, *cells.shape[1:]).transpose(0, 2, 1, 3, 4)
  grid = to_uint8(grid.reshape(rows * cells.shape[1], columns * cells.shape[2],
                               c))
  return grid[..., 0] if c == 1 else grid


def density_image(points: np.ndarray, size: int = 256,
                  extent: float = 4.0) -> np.ndarray:
  """A 2-D histogram of points on [-extent, extent]^2 as a uint8 picture."""
  hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size,
                              range=[[-extent, extent], [-extent, extent]])
  hist = np.log1p(hist[::-1])
  return (255 * (1 - hist / max(hist.max(), 1e-9))).astype(np.uint8)


def save_png(path: str, picture: np.ndarray):
  """Writes a PNG to a local path or a cloud URI (etils.epath)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(picture).save(f, format="PNG")
