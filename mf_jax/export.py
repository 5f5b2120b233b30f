"""Exported networks: parameters in safetensors, model config in JSON.

An export is two files side by side. `NAME.safetensors` holds one parameter
tree (flattened key paths joined with '/', float32) and `NAME.json` holds the
model config (`ConfigDict.to_dict()`) with a few metadata keys added at the
top level (`METADATA_KEYS`: where the weights came from, the step, the EMA
decay, the objective and the sampler that fits it). No optimizer state, no
data position and no training config travel: a run's checkpoint and an
official MeanFlow checkpoint become the same small artefact, which needs
only this module and `mf_jax.models` to evaluate.

Safetensors rather than msgpack or orbax because it is flat, memory-mappable
and read by numpy and torch without JAX; the JSON is also stored in the
safetensors header, so the weights file alone still describes itself.

Integrity: the JSON records `weights_sha256`, a SHA-256 of the tensors
(`weights_checksum`: names, shapes and little-endian float32 bytes, in
sorted key order), and `load` refuses weights that do not match it, so a
damaged or altered file fails loudly instead of sampling garbage. It hashes
the tensors, not the file's bytes, because the file's header holds the JSON
record itself (a hash of the file cannot be stored inside it), and because
what must be right is the arrays the model gets, however the header was
serialized. Exports from before the checksum load with a warning. Weights
with a NaN or an infinity are refused at export, before anything is written.

    u_fn, meta = export.load("mf_b4.safetensors")
    x = e - u_fn(e, t=1.0, r=0.0, y=labels)  # one MeanFlow step
"""

import hashlib
import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

from mf_jax import models
from mf_jax.training import state as state_lib

FORMAT = "mf_jax.export.v1"
CHECKSUM_KEY = "weights_sha256"
METADATA_KEYS = ("format", "source", "step", "ema_decay", "objective",
                 "sampler", CHECKSUM_KEY)
_HEADER_KEY = "mf_jax"  # safetensors header entry holding the JSON text
_EXPECTED = ("expected an mf_jax export NAME.safetensors (from "
             "mf_jax.tools.export or mf_jax.tools.import_official)")


def config_path(path: str) -> str:
  """The JSON beside an export: NAME.safetensors -> NAME.json."""
  root, ext = os.path.splitext(path)
  return (root if ext == ".safetensors" else path) + ".json"


def _write_all(writers: dict):
  """Writes every {path: write(tmp_path)} to a temporary file first and
  renames them only once all are written, so a failure (a full disk) leaves
  no partial file and no new weights without their JSON."""
  tmps = {path: f"{path}.tmp{os.getpid()}" for path in writers}
  try:
    for path, write in writers.items():
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      write(tmps[path])
    for path, tmp in tmps.items():
      os.replace(tmp, path)
  finally:
    for tmp in tmps.values():
      if os.path.exists(tmp):
        os.remove(tmp)


def flatten_params(params) -> dict[str, np.ndarray]:
  """{'a/b/kernel': float32 array}, the safetensors layout."""
  flat = flax.traverse_util.flatten_dict(dict(params))
  bad = ["/".join(k) for k in flat if any("/" in part for part in k)]
  if bad:
    raise ValueError(f"Parameter names contain '/': {bad}.")
  return {"/".join(k): np.ascontiguousarray(jax.device_get(v), np.float32)
          for k, v in flat.items()}


def weights_checksum(tensors: dict[str, np.ndarray]) -> str:
  """SHA-256 (hex) of flat float32 tensors: each key, shape and the
  little-endian bytes, in sorted key order (see the module docstring)."""
  digest = hashlib.sha256()
  for key in sorted(tensors):
    value = np.ascontiguousarray(tensors[key], "<f4")
    digest.update(f"{key}\0{value.shape}\0".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def check_finite(tensors: dict[str, np.ndarray], what: str):
  """Fails, naming the first parameter (in key order) with a NaN or an
  infinity and how many values are bad, when any value is not finite."""
  bad = {k: int(np.size(v) - np.count_nonzero(np.isfinite(v)))
         for k, v in sorted(tensors.items())}
  bad = {k: n for k, n in bad.items() if n}
  if bad:
    first, count = next(iter(bad.items()))
    raise FloatingPointError(
        f"{what}: parameter {first!r} has {count} non-finite values (NaN or "
        f"Inf) of {np.size(tensors[first])}; {sum(bad.values())} in "
        f"{len(bad)} parameters in all. Nothing was written.")


def save(path: str, params, model_config, **metadata) -> dict:
  """Writes `path` (safetensors) and its JSON; returns the JSON record.

  `metadata` are JSON values such as source, step, ema_decay, objective and
  sampler; they sit beside the model config's fields, so their names must
  not collide with them.
  """
  config = (model_config.to_dict()
            if isinstance(model_config, ml_collections.ConfigDict)
            else dict(model_config))
  clash = sorted(set(config) & (set(metadata) | {"format", CHECKSUM_KEY}))
  if clash:
    raise ValueError(f"Metadata keys {clash} collide with model config "
                     "fields.")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; an export is written "
                            "to a file, NAME.safetensors.")
  tensors = flatten_params(params)
  check_finite(tensors, f"Refusing to export {path}")
  record = {**config, **metadata, "format": FORMAT,
            CHECKSUM_KEY: weights_checksum(tensors)}
  text = json.dumps(record, indent=1, sort_keys=True)

  def write_tensors(tmp):
    safetensors.numpy.save_file(tensors, tmp, metadata={_HEADER_KEY: text})
    os.chmod(tmp, 0o644)  # safetensors creates 0600; exports are for sharing

  def write_json(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  _write_all({path: write_tensors, config_path(path): write_json})
  return record


def _check_is_file(path: str):
  """One-line errors for a path that cannot be an export at all."""
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; {_EXPECTED}.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; {_EXPECTED}.")


def _not_safetensors(path: str, error: Exception) -> ValueError:
  return ValueError(f"{path} is not a readable safetensors file ({error}); "
                    f"{_EXPECTED}.")


def _read_header(path: str) -> str | None:
  """The JSON text the safetensors header carries, if any."""
  try:
    with safetensors.safe_open(path, framework="np") as f:
      return (f.metadata() or {}).get(_HEADER_KEY)
  except (safetensors.SafetensorError, OSError) as e:
    raise _not_safetensors(path, e) from e


def read_meta(path: str) -> ml_collections.ConfigDict:
  """The JSON record of an export (the header's copy if the JSON is gone)."""
  _check_is_file(path)
  json_path = config_path(path)
  if os.path.isfile(json_path):
    source = json_path
    with open(json_path, encoding="utf-8") as f:
      text = f.read()
  else:
    source, text = f"{path}'s header", _read_header(path)
    if text is None:
      raise FileNotFoundError(f"{json_path} is missing and {path} carries no "
                              "mf_jax config: not an mf_jax export.")
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{source} is not valid JSON ({e}): the export's record "
                     "is damaged.") from e
  if not isinstance(record, dict):
    raise ValueError(f"{source} holds no JSON object: not an mf_jax export.")
  if record.get("format") != FORMAT:
    raise ValueError(f"{path}: export format {record.get('format')!r}, this "
                     f"code reads {FORMAT!r}.")
  return ml_collections.ConfigDict(record)


def model_config(meta) -> ml_collections.ConfigDict:
  """The model config alone: the record without its metadata keys."""
  fields = meta.to_dict() if hasattr(meta, "to_dict") else dict(meta)
  return ml_collections.ConfigDict(
      {k: v for k, v in fields.items() if k not in METADATA_KEYS})


def _check_shapes(model, config, params):
  """Fails loudly when the config does not build the stored tree."""
  expected = models.abstract_params(model,
                                    state_lib.model_input_shape(config))
  want = {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(expected, sep="/").items()}
  got = {k: tuple(v.shape) for k, v in
         flax.traverse_util.flatten_dict(params, sep="/").items()}
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise ValueError(f"The exported parameters do not fit the model config; "
                     f"differing entries (first 10): "
                     f"{[(k, got.get(k), want.get(k)) for k in diff[:10]]}.")


def load_params(path: str):
  """(model, params, meta): the Flax module, its parameter tree (numpy
  float32) and the JSON record as a ConfigDict."""
  meta = read_meta(path)
  config = model_config(meta)
  model = models.build_model(config)
  try:
    tensors = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as e:
    raise _not_safetensors(path, e) from e
  verify_checksum(path, tensors, meta)
  params = flax.traverse_util.unflatten_dict(tensors, sep="/")
  _check_shapes(model, config, params)
  return model, params, meta


def verify_checksum(path: str, tensors: dict[str, np.ndarray], meta):
  """Fails when the weights are not the ones exported; warns when the
  export predates checksums (nothing to verify against)."""
  recorded = meta.get(CHECKSUM_KEY)
  if recorded is None:
    logging.warning("%s records no %s (exported before checksums were "
                    "added): its weights are loaded unverified.", path,
                    CHECKSUM_KEY)
    return
  actual = weights_checksum(tensors)
  if actual != recorded:
    raise ValueError(
        f"{path}: weights checksum mismatch (sha256 {actual[:16]}..., the "
        f"export recorded {recorded[:16]}...): the file is damaged or was "
        "changed after export; export it again.")


def load(path: str):
  """(u_fn, meta) with u = u_fn(z, t, r, y) the exported average velocity.

  z is NHWC (or (B, D) for the MLP); t and r are scalars or (B,) arrays and
  the network is fed h = t - r, as every mf_jax backbone is; y is (B,) class
  indices, None meaning the null class `num_classes`. Inference mode
  (train=False), jitted; the parameters are put on the default device once.
  """
  model, params, meta = load_params(path)
  params = jax.device_put(params)
  null_class = meta.get("num_classes", 0)

  @jax.jit
  def apply(params, z, t, r, y):
    return model.apply({"params": params}, z, t, t - r, y, train=False)

  def u_fn(z, t, r, y=None):
    z = jnp.asarray(z, jnp.float32)
    batch = (z.shape[0],)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), batch)
    r = jnp.broadcast_to(jnp.asarray(r, jnp.float32), batch)
    y = jnp.broadcast_to(
        jnp.asarray(null_class if y is None else y, jnp.int32), batch)
    return apply(params, z, t, r, y)

  return u_fn, meta
