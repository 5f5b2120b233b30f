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

    u_fn, meta = export.load("mf_b4.safetensors")
    x = e - u_fn(e, t=1.0, r=0.0, y=labels)  # one MeanFlow step
"""

import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from mf_jax import models
from mf_jax.training import state as state_lib

FORMAT = "mf_jax.export.v1"
METADATA_KEYS = ("format", "source", "step", "ema_decay", "objective",
                 "sampler")
_HEADER_KEY = "mf_jax"  # safetensors header entry holding the JSON text


def config_path(path: str) -> str:
  """The JSON beside an export: NAME.safetensors -> NAME.json."""
  root, ext = os.path.splitext(path)
  return (root if ext == ".safetensors" else path) + ".json"


def _atomic_write(path: str, write):
  """Writes through a temporary file so a reader never sees half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def flatten_params(params) -> dict[str, np.ndarray]:
  """{'a/b/kernel': float32 array}, the safetensors layout."""
  flat = flax.traverse_util.flatten_dict(dict(params))
  bad = ["/".join(k) for k in flat if any("/" in part for part in k)]
  if bad:
    raise ValueError(f"Parameter names contain '/': {bad}.")
  return {"/".join(k): np.ascontiguousarray(jax.device_get(v), np.float32)
          for k, v in flat.items()}


def save(path: str, params, model_config, **metadata) -> dict:
  """Writes `path` (safetensors) and its JSON; returns the JSON record.

  `metadata` are JSON values such as source, step, ema_decay, objective and
  sampler; they sit beside the model config's fields, so their names must
  not collide with them.
  """
  config = (model_config.to_dict()
            if isinstance(model_config, ml_collections.ConfigDict)
            else dict(model_config))
  clash = sorted(set(config) & (set(metadata) | {"format"}))
  if clash:
    raise ValueError(f"Metadata keys {clash} collide with model config "
                     "fields.")
  record = {**config, **metadata, "format": FORMAT}
  text = json.dumps(record, indent=1, sort_keys=True)
  tensors = flatten_params(params)

  def write_tensors(tmp):
    safetensors.numpy.save_file(tensors, tmp, metadata={_HEADER_KEY: text})
    os.chmod(tmp, 0o644)  # safetensors creates 0600; exports are for sharing
  _atomic_write(path, write_tensors)

  def write_json(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  _atomic_write(config_path(path), write_json)
  return record


def read_meta(path: str) -> ml_collections.ConfigDict:
  """The JSON record of an export (the header's copy if the JSON is gone)."""
  json_path = config_path(path)
  if os.path.exists(json_path):
    with open(json_path, encoding="utf-8") as f:
      record = json.load(f)
  else:
    with safetensors.safe_open(path, framework="np") as f:
      header = (f.metadata() or {}).get(_HEADER_KEY)
    if header is None:
      raise FileNotFoundError(f"{json_path} is missing and {path} carries no "
                              "mf_jax config: not an mf_jax export.")
    record = json.loads(header)
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
  params = flax.traverse_util.unflatten_dict(
      safetensors.numpy.load_file(path), sep="/")
  _check_shapes(model, config, params)
  return model, params, meta


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
