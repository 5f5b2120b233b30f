"""Starting a run from an exported network (`objective.init_from`).

ECT tunes a pretrained diffusion model into a consistency model; any
objective may start from an mf_jax export the same way (a flow-matching
run's, an imported official checkpoint): `--config.objective.init_from=
EXPORT.safetensors`. Only a fresh run reads it: the parameters, every EMA
copy and the target copy (if the objective keeps one) start at the
export's weights, the optimizer state stays fresh, and a resumed run
ignores the setting (its checkpoint already holds what it started from).

An objective that knows its own starting point defines
`init_source(config) -> path` (reflow starts from the teacher that made
its pairs); it takes precedence over `objective.init_from`.

The export's own record says which network it holds; it must build the
run's parameter tree exactly (same backbone, sizes and number of classes),
or the run stops with one line naming the differing entries.
"""

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mf_jax import export
from mf_jax import objectives


def path_of(config) -> str:
  """The export a fresh run starts from, '' for none."""
  objective = objectives.get(config.objective.name)
  if hasattr(objective, "init_source"):
    return objective.init_source(config) or ""
  return config.objective.get("init_from", "") or ""


def _shapes(tree) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(dict(tree), sep="/").items()}


def check_fits(path: str, params, abstract_params):
  """One line naming the entries where the export's tree differs from
  the run's (first 5: name, export's shape, run's shape)."""
  theirs, ours = _shapes(params), _shapes(abstract_params)
  if theirs != ours:
    diff = sorted(k for k in set(theirs) | set(ours)
                  if theirs.get(k) != ours.get(k))
    shown = [(k, theirs.get(k), ours.get(k)) for k in diff[:5]]
    raise ValueError(
        f"objective.init_from={path!r} does not fit this run's model: "
        f"{len(diff)} parameters differ (name, export, run): {shown}; "
        "start from an export of the same model config.")


def load_init_params(config, abstract_params):
  """The export's parameters (numpy float32), checksum verified and
  checked against the run's tree (`abstract_params`: arrays or shapes)."""
  path = path_of(config)
  _, params, _ = export.load_params(path)
  check_fits(path, params, abstract_params)
  return params


def _put(value: np.ndarray, like: jax.Array) -> jax.Array:
  """A host array laid out as `like` (its sharding), on every process."""
  value = np.asarray(value, like.dtype)
  return jax.make_array_from_callback(value.shape, like.sharding,
                                      lambda index: value[index])


def initial_state(state, config):
  """`state` (fresh) with params, EMA copies and target copy set to the
  export of `objective.init_from`; unchanged when it is empty."""
  if not path_of(config):
    return state
  loaded = load_init_params(config, state.params)
  params = jax.tree.map(_put, loaded, state.params)
  # Each copy in buffers of its own, made on device: the train step
  # donates the state, and a buffer (or host memory that a CPU device
  # array may share with numpy) under two leaves cannot be donated twice.
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                 out_shardings=jax.tree.map(lambda a: a.sharding, params))
  return state.replace(
      params=copy(params),
      ema_params={key: copy(params) for key in state.ema_params},
      target_params=(copy(params) if state.target_params
                     else state.target_params))
