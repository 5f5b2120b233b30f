"""Files named by a local path or a URI (gs://..., any etils.epath scheme).

Every path a config or a tool takes may be a URI: on a TPU pod the data,
the weights and the workdir live in a bucket, not on each host. Readers
that stream (JSON, a latents manifest, shard listings) go through
etils.epath directly. Readers that need a local file (numpy's npz,
safetensors, torch) get one from `local_copy`: a remote file is copied
once per host into a local cache, keyed by its URI, size and modification
time, through a temporary name and a rename, so neither concurrent
processes nor an interrupted copy ever leave a partial file to be read.

The cache is `$MF_JAX_CACHE`, else `$XDG_CACHE_HOME/mf_jax` (default
`~/.cache/mf_jax`); entries are never deleted by this code.
"""

import hashlib
import json
import os
import shutil
import zipfile

import jax
import numpy as np
from absl import logging
from etils import epath

CACHE_ENV = "MF_JAX_CACHE"
_BLOCK = 1 << 24  # copy in 16 MiB pieces


def is_remote(path) -> bool:
  """Whether `path` is a URI (gs://...) rather than a local path."""
  return "://" in os.fspath(path)


def exists(path) -> bool:
  return bool(path) and epath.Path(path).exists()


def is_dir(path) -> bool:
  return epath.Path(path).is_dir()


def absolute(path: str) -> str:
  """A local path made absolute; URIs as they are. For records that say
  which files produced a result."""
  return path if is_remote(path) else os.path.abspath(path)


def read_json(path) -> dict:
  return json.loads(epath.Path(path).read_text())


def write_json(path, record: dict):
  """Writes a JSON file atomically, on process 0 only; `path` may be local
  or a cloud URI such as gs://bucket/run/eval/1000.json."""
  if jax.process_index() == 0:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def cache_dir() -> str:
  """Where remote files are copied to (see the module docstring)."""
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(base, "mf_jax")


def local_copy(path: str) -> str:
  """A local file with the contents of `path`: `path` itself when local,
  else a copy in the cache, made on first use. A changed remote file (other
  size or modification time) gets a new copy; the file name is kept, so
  readers that go by the extension still can."""
  if not is_remote(path):
    return path
  source = epath.Path(path)
  try:
    stat = source.stat()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist.") from None
  key = hashlib.sha256(
      f"{path}\n{stat.length}\n{stat.mtime}".encode()).hexdigest()[:16]
  target = os.path.join(cache_dir(), key, source.name)
  if os.path.isfile(target) and os.path.getsize(target) == stat.length:
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp{os.getpid()}"
  try:
    with source.open("rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, _BLOCK)
    if os.path.getsize(tmp) != stat.length:
      raise OSError(f"Copying {path} to {tmp} stopped at "
                    f"{os.path.getsize(tmp)} of {stat.length} bytes.")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info("Copied %s to %s.", path, target)
  return target


def publish(local_file: str, path: str):
  """Moves a finished local file to `path` (local or remote) so that
  `path` appears complete or not at all: a rename locally; remotely an
  upload to a temporary name, then a rename."""
  if not is_remote(path):
    os.replace(local_file, path)
    return
  target = epath.Path(path)
  tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
  try:
    with open(local_file, "rb") as src, tmp.open("wb") as dst:
      shutil.copyfileobj(src, dst, _BLOCK)
    tmp.replace(target)
  finally:
    if tmp.exists():
      tmp.unlink()
    os.remove(local_file)


def tensor_shapes(path: str,
                  file_format: str | None = None) -> dict[str, tuple[int, ...]]:
  """{name: shape} of the arrays in a local file, read from their headers
  only (a 50,000-image npz is not loaded). `file_format` is 'npz' or
  'safetensors', by default the file's extension says ('.npz' or not). An
  unreadable or truncated file is a ValueError saying why."""
  if file_format is None:
    file_format = "npz" if path.lower().endswith(".npz") else "safetensors"
  if file_format == "npz":
    try:
      return _npz_shapes(path)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
      raise ValueError(f"not a readable npz file ({e})") from None
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="numpy") as f:
      return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    # safetensors raises its own SafetensorError (no public base class).
    raise ValueError(f"not a readable safetensors file ({e})") from None


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  shapes = {}
  with zipfile.ZipFile(path) as archive:
    for name in archive.namelist():
      if not name.endswith(".npy"):
        continue
      with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version in readers:
          shape = readers[version](f)[0]
        else:  # rare header versions: read the array itself
          f.seek(0)
          shape = np.lib.format.read_array(f).shape
      shapes[name[:-len(".npy")]] = tuple(shape)
  return shapes
