"""The frozen teacher of the distillation objectives (`objective.teacher`).

A teacher is any exported network (`mf_jax.export`'s safetensors + JSON,
from an mf_jax run or an imported official checkpoint). Its parameters are
an argument of the jitted train step (`frozen['teacher']`), split over the
mesh like the student's, never constants baked into the program; the
objective sees only `context.teacher(z, t, h, y)`, so tests pass a
closed-form field instead.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mf_jax import export
from mf_jax import files
from mf_jax import sharding

TeacherApply = Callable[..., jax.Array]


def check(config):
  """Named teachers exist and fit the student's data: one line if not.
  `objective.teacher_weak` (autoguidance) is checked like the teacher."""
  if (config.objective.get("teacher_weak", "")
      and not config.objective.get("teacher", "")):
    raise ValueError("objective.teacher_weak is set without "
                     "objective.teacher: it guides a teacher; name one.")
  for name in ("teacher", "teacher_weak"):
    path = config.objective.get(name, "")
    if path:
      _check_file(config, name, path)


def _check_file(config, name: str, path: str):
  if not files.exists(path):
    raise FileNotFoundError(
        f"objective.{name}={path!r} does not exist; name an exported "
        "network (python -m mf_jax.tools.export ...).")
  teacher = export.model_config(export.read_meta(path))
  for field in ("in_channels", "input_size"):
    ours, theirs = config.model.get(field), teacher.get(field)
    if ours is not None and theirs is not None and ours != theirs:
      raise ValueError(
          f"objective.{name}={path!r} has model.{field}={theirs}, the "
          f"student {ours}: a teacher must take the student's inputs.")


def load(config, mesh) -> tuple[TeacherApply | None, dict]:
  """(apply(params, z, t, h, y), {'teacher': params on the mesh}), or
  (None, {}) when the config names no teacher.

  With `objective.teacher_cfg_scale` s != 1 a class-conditional teacher is
  guided: u_null + s (u_y - u_null), both at the same (z, t, h).
  With `objective.teacher_weak` (autoguidance), frozen['teacher_weak'] holds
  its parameters and `apply.weak` its apply (it may be another network).
  """
  path = config.objective.get("teacher", "")
  if not path:
    return None, {}
  scale = config.objective.get("teacher_cfg_scale", 1.0)
  apply, params = _load_one(path, scale)
  frozen = {"teacher": params}
  weak_path = config.objective.get("teacher_weak", "")
  if weak_path:
    apply.weak, frozen["teacher_weak"] = _load_one(weak_path, scale)
  min_size = config.mesh.get("fsdp_min_size", sharding.FSDP_MIN_SIZE)
  return apply, {
      name: jax.device_put(params, sharding.tree_shardings(params, mesh,
                                                           min_size))
      for name, params in frozen.items()}


def _load_one(path: str, scale: float):
  """(apply(params, z, t, h, y), host parameters) of one export."""
  model, params, meta = export.load_params(path)
  null_class = meta.get("num_classes", 0)

  def apply(params, z, t, h, y):
    def u(labels):
      return model.apply({"params": params}, z, t, h, labels, train=False)
    u_y = u(y)
    if scale == 1.0 or not null_class:
      return u_y
    u_null = u(jnp.full_like(y, null_class))
    return u_null + scale * (u_y - u_null)

  return apply, params


def abstract(frozen: dict) -> Any:
  """Shapes and shardings of `frozen`, for ahead-of-time lowering."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      frozen)
