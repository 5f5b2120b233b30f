"""Sample batches as ADM-compatible .npz files, written and read in a stream.

ADM's evaluator (guided-diffusion/evaluations/evaluator.py) reads a sample
batch as the uint8 NHWC array `arr_0`; ADM's sampling script stores the class
labels beside it as `arr_1` (what `np.savez(path, images, labels)` names
them), and so does this module. The file is an ordinary uncompressed npz:
`np.load(path)['arr_0']` reads it, and ADM's evaluator streams it.

50k ImageNet samples are 9.8 GB of uint8, so `NpzWriter` writes images into
the zip entry as they arrive instead of holding them: it needs the number of
images up front (the .npy header states the shape), and it keeps only the
labels (a few hundred KB) until `close`.
"""

import contextlib
import os
import zipfile

import numpy as np

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"


def to_uint8(images, xp=np):
  """[-1, 1] floats -> uint8 with rounding to nearest: floor(127.5 x + 128).

  This is the official MeanFlow code's conversion. ADM's sampler truncates
  instead ((x + 1) * 127.5 cast to uint8), which shifts pixels by half a
  level on average; rounding is the unbiased choice. `xp` is the array
  module (numpy, or jax.numpy to quantise on the device).
  """
  images = xp.asarray(images).astype(xp.float32)
  return xp.clip(xp.floor(127.5 * images + 128.0), 0, 255).astype(xp.uint8)


def _write_npy_header(stream, shape, dtype):
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False, "shape": tuple(shape)}
  np.lib.format.write_array_header_2_0(stream, header)


class NpzWriter:
  """Streams `num` uint8 NHWC images (and labels) into an ADM-style npz.

    with NpzWriter(path, num, (256, 256, 3)) as writer:
      for images, labels in batches:
        writer.write(images, labels)

  The file appears under its name only once complete (written to a
  temporary name, renamed on close); writing more or fewer than `num`
  images is an error.
  """

  def __init__(self, path: str, num: int, image_shape, with_labels=True):
    self.path = path
    self.num = num
    self.image_shape = tuple(image_shape)
    self._labels = [] if with_labels else None
    self._written = 0
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self._tmp = path + ".tmp"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED,
                                allowZip64=True)
    self._entry = self._zip.open(IMAGES_KEY + ".npy", "w", force_zip64=True)
    _write_npy_header(self._entry, (num, *self.image_shape), np.uint8)

  def write(self, images, labels=None):
    images = np.asarray(images)
    if images.dtype != np.uint8:
      images = to_uint8(images)
    if images.shape[1:] != self.image_shape:
      raise ValueError(f"Images of shape {images.shape[1:]}, expected "
                       f"{self.image_shape}.")
    if self._written + len(images) > self.num:
      raise ValueError(f"More than the {self.num} images declared.")
    self._entry.write(np.ascontiguousarray(images).tobytes())
    self._written += len(images)
    if self._labels is not None:
      if labels is None or len(labels) != len(images):
        raise ValueError("Each image needs a label (or with_labels=False).")
      self._labels.append(np.asarray(labels, np.int64))

  def close(self):
    """Finishes the file; incomplete files are removed, not left behind."""
    if self._zip is None:
      return
    self._entry.close()
    complete = self._written == self.num
    if complete and self._labels is not None:
      labels = (np.concatenate(self._labels) if self._labels
                else np.zeros((0,), np.int64))
      with self._zip.open(LABELS_KEY + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, labels)
    self._zip.close()
    self._zip = None
    if not complete:
      os.remove(self._tmp)
      raise ValueError(f"Wrote {self._written} of {self.num} images; "
                       f"{self.path} not written.")
    os.replace(self._tmp, self.path)

  def abort(self):
    """Drops a partly written file (after an error elsewhere)."""
    if self._zip is not None:
      self._entry.close()
      self._zip.close()
      self._zip = None
      os.remove(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def save_npz(path: str, images, labels=None):
  """Writes a whole batch at once (small sets); same layout as NpzWriter."""
  images = np.asarray(images)
  with NpzWriter(path, len(images), images.shape[1:],
                 with_labels=labels is not None) as writer:
    writer.write(images, labels)


@contextlib.contextmanager
def _open_entry(path: str, key: str):
  with zipfile.ZipFile(path) as archive:
    name = key + ".npy"
    if name not in archive.namelist():
      raise KeyError(f"{path} has no {key!r}; it holds {archive.namelist()}.")
    with archive.open(name) as entry:
      yield entry


def _read_header(entry):
  """(shape, fortran_order, dtype) of a .npy stream, left at its data."""
  version = np.lib.format.read_magic(entry)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(entry)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(entry)
  raise ValueError(f"Unsupported .npy format version {version}.")


def num_images(path: str, key: str = IMAGES_KEY) -> int:
  with _open_entry(path, key) as entry:
    return _read_header(entry)[0][0]


def iterate_npz(path: str, batch_size: int, key: str = IMAGES_KEY):
  """Yields batches of `key` from an (uncompressed or compressed) npz
  without loading the whole array: e.g. ADM's 10k-image reference batch or
  a 50k-sample file."""
  with _open_entry(path, key) as entry:
    shape, fortran, dtype = _read_header(entry)
    if fortran:
      raise ValueError(f"{path}:{key} is Fortran-ordered; write it in C "
                       "order.")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      count = min(batch_size, shape[0] - start)
      data = entry.read(count * row_bytes)
      if len(data) != count * row_bytes:
        raise ValueError(f"{path}:{key} ends early at row {start}.")
      yield np.frombuffer(data, dtype).reshape(count, *shape[1:])
