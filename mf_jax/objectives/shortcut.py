"""Shortcut models (Frans, Hafner, Levine, Abbeel, ICLR 2025).

The network is conditioned on the step size: u(z_t, t, h) is the jump of
size h from t, z_{t-h} = z_t - h u, i.e. our flow-map backbone with h = d.
A share of each batch (`shortcut_bootstrap_fraction`) regresses the
self-consistency target, one jump of size d = two jumps of size d/2 taken
by the target network (stop-gradient):

  s1 = u_tgt(z_t, t, d/2),  z' = z_t - (d/2) s1,
  s2 = u_tgt(z', t - d/2, d/2),  target = (s1 + s2) / 2,

for d in {1, 1/2, ..., 2/M} (M = `shortcut_max_steps`, d = 2^-k, k evenly
spread over {0, ..., log2 M - 1}) and t on the d-grid {d, 2d, ..., 1}. The
other rows are flow matching, the conditional velocity v = e - x at the
smallest step (h = 1/M in the official code, h = 0 in the paper), t on the
1/M grid. The sampler is the flow map with N = 1, 2, 4, ... <= M uniform
steps, which only visits (t, h) pairs the training saw.

Conventions. The paper and code put data at t = 1: x_t = (1 - t) x0 + t x1
(x0 noise, x1 data), s(x_t, t, d) = (x_{t+d} - x_t) / d, sampling
x <- x + d s. With our time tau = 1 - t (noise at 1), the same point is
z_tau = (1 - tau) x + tau e, and the jump of size d to tau - d gives
u(z, tau, d) = (z_tau - z_{tau-d}) / d = -s(x_t, t, d): our u is minus
their s, their velocity x1 - x0 is minus our v = e - x, their grid
t in {0, d, ..., 1 - d} is our tau in {d, 2d, ..., 1}, and their second
half step at t + d/2 is ours at tau - d/2. The clip to +-4 of the midpoint
and of the target is symmetric, so it reads the same in both.

Where the paper and the official code (kvfrans/shortcut-models,
targets_shortcut.py, train.py) differ, each choice is a field and the
default is the code's:

- `shortcut_target`: the target network. "ema" (code: bootstrap_ema=1, an
  EMA at target_update_rate 0.999, `shortcut_target_ema`, which must be one
  of training.ema_decays) or "online" (paper: the current parameters).
- `shortcut_fm_step`: h of the flow-matching rows. "min" (code: d = 1/M, the
  embedded log2 index log2 M) or "zero" (paper: d = 0). With "zero" the
  half steps of size 1/M (the smallest bootstrap level) ask the network at
  h = 0, as the paper does for its smallest d; with "min" they ask at 1/M,
  which the flow-matching rows train.
- `shortcut_bootstrap_cfg_scale`: classifier-free guidance in the targets of
  the smallest bootstrap level (d = 2/M, whose half steps are the
  flow-matching level); larger d inherit it by bootstrapping. The code's
  train.py default is off (bootstrap_cfg=0, i.e. scale 1 here); its README's
  ImageNet commands turn it on with cfg_scale 1.5 (configs/
  imagenet256_shortcut_b2.py). Needs a class-conditional model.
- `shortcut_batch_split`: which examples the two parts see. "code": the
  bootstrap rows take examples [0, B_b) and the flow-matching rows [0, B -
  B_b), so the first B_b examples serve both (with their own noise and
  times) and the last B_b are unused (targets_shortcut.py slices so);
  "disjoint": [0, B_b) and [B_b, B).
- `shortcut_bootstrap_fraction`: 0.25 by default (issue 12, the paper's
  1/4); the official train.py uses bootstrap_every = 8, i.e. 1/8, which the
  ImageNet config sets.
- `shortcut_clip`: 4.0 (code, for SD-VAE latents); 0 turns it off.

Other details follow the code: bootstrap rows keep their labels (only the
flow-matching rows drop them, with class_dropout), the target network runs
in inference mode (no dropout), each bootstrap level has B_b // log2 M rows
ordered from the smallest d, the remainder at d = 1. Not copied: the code's
x_t = (1 - (1 - 1e-5) t) x0 + t x1 (we use our interpolation), its log2(1/d)
embedding of the step (our backbones embed h continuously), its mean over
dimensions (we sum, as every objective here; the adaptive weight is
`adaptive_p`, which the shortcut configs set to 0: the code's plain L2).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mf_jax import samplers
from mf_jax.objectives import common

SAMPLER = "flow_map"
TARGETS = ("ema", "online")
FM_STEPS = ("min", "zero")
BATCH_SPLITS = ("code", "disjoint")

CONFIG = dict(
    shortcut_max_steps=128,  # M: steps 1, 1/2, ..., 1/M (denoise_timesteps)
    shortcut_bootstrap_fraction=0.25,  # share of self-consistency rows
    shortcut_fm_step="min",  # flow-matching rows' h: "min" 1/M, "zero" 0
    shortcut_target="ema",  # target network: "ema" (code) or "online"
    shortcut_target_ema=0.999,  # its decay, one of training.ema_decays
    shortcut_bootstrap_cfg_scale=1.0,  # CFG on the smallest level (1: off)
    shortcut_clip=4.0,  # |midpoint| and |target| clip (0: off)
    shortcut_batch_split="code",  # or "disjoint"
)


def num_levels(max_steps: int) -> int:
  """log2 M: the number of bootstrap step sizes 1, 1/2, ..., 2/M."""
  return int(round(math.log2(max_steps)))


def bootstrap_rows(batch_size: int, settings) -> int:
  """B_b, the rows of a batch that train the self-consistency target."""
  return int(math.floor(batch_size * settings.shortcut_bootstrap_fraction
                        + 1e-9))


def bootstrap_levels(num_rows: int, max_steps: int) -> np.ndarray:
  """k of each bootstrap row (d = 2^-k): log2 M - 1 first (the smallest d),
  num_rows // log2 M rows per level, the remainder at k = 0 (d = 1)."""
  levels = num_levels(max_steps)
  per_level = np.repeat(np.arange(levels - 1, -1, -1), num_rows // levels)
  return np.concatenate([per_level,
                         np.zeros(num_rows - per_level.size, np.int64)])


def _fm_h(settings) -> float:
  return (1.0 / settings.shortcut_max_steps
          if settings.shortcut_fm_step == "min" else 0.0)


def row_grids(batch_size: int, settings) -> tuple[np.ndarray, np.ndarray]:
  """(grid spacing, h) of each row: the bootstrap rows' d (t on the d-grid,
  step d), then the flow-matching rows' 1/M grid and their h."""
  max_steps = settings.shortcut_max_steps
  num_boot = bootstrap_rows(batch_size, settings)
  d = 2.0 ** -bootstrap_levels(num_boot, max_steps).astype(np.float64)
  num_fm = batch_size - num_boot
  grid = np.concatenate([d, np.full(num_fm, 1.0 / max_steps)])
  h = np.concatenate([d, np.full(num_fm, _fm_h(settings))])
  return grid.astype(np.float32), h.astype(np.float32)


def _is_power_of_two_step(h: float, max_steps: int) -> bool:
  k = math.log2(1.0 / h) if h > 0 else -1.0
  return abs(k - round(k)) < 1e-6 and 0 <= round(k) <= num_levels(max_steps)


def _schedule_problem(spec, max_steps: int) -> str | None:
  """Why a shortcut model cannot sample with schedule `spec`, or None.
  Solvers of the instantaneous velocity ('ode', 'eulerN', 'heunN') ask for
  h = 0 at any time: trained with shortcut_fm_step='zero', and next to the
  trained h = 1/M with 'min'."""
  parsed = samplers.parse_schedule(spec)
  if isinstance(parsed, samplers.Solver):
    return None
  if isinstance(parsed, int):
    if parsed & (parsed - 1) or parsed > max_steps:
      return (f"{parsed} steps (a shortcut model is trained on steps "
              f"1/2^k only: use a power of two <= shortcut_max_steps="
              f"{max_steps})")
    return None
  for t, r in zip(parsed, parsed[1:]):
    h = t - r
    on_grid = abs(t / h - round(t / h)) < 1e-6 if h > 0 else False
    if not (_is_power_of_two_step(h, max_steps) and on_grid):
      return (f"{spec!r} (every step of an explicit schedule must be a power "
              f"of two 1/2^k >= 1/{max_steps} starting on its own grid, t a "
              f"multiple of the step; the step {t:g} -> {r:g} is not)")
  return None


def validate(config):
  """One-line errors for settings a shortcut run cannot train or sample."""
  settings = config.objective
  max_steps = settings.shortcut_max_steps
  if (not isinstance(max_steps, int) or max_steps < 2
      or max_steps & (max_steps - 1)):
    raise ValueError(f"objective.shortcut_max_steps={max_steps!r} must be a "
                     "power of two >= 2 (e.g. 128, the official M).")
  for field, valid in (("shortcut_target", TARGETS),
                       ("shortcut_fm_step", FM_STEPS),
                       ("shortcut_batch_split", BATCH_SPLITS)):
    if settings[field] not in valid:
      raise ValueError(f"Unknown objective.{field} {settings[field]!r}; "
                       f"valid: {valid}.")
  fraction = settings.shortcut_bootstrap_fraction
  if not 0 <= fraction < 1:
    raise ValueError(f"objective.shortcut_bootstrap_fraction={fraction} must "
                     "be in [0, 1) (the rest of the batch is flow matching).")
  num_boot = bootstrap_rows(config.training.batch_size, settings)
  if fraction > 0 and num_boot < num_levels(max_steps):
    raise ValueError(
        f"objective.shortcut_bootstrap_fraction={fraction} of "
        f"training.batch_size={config.training.batch_size} gives {num_boot} "
        f"bootstrap rows, fewer than the {num_levels(max_steps)} step sizes "
        f"of shortcut_max_steps={max_steps}; raise the fraction or batch.")
  decays = tuple(float(d) for d in config.training.ema_decays)
  if (settings.shortcut_target == "ema"
      and float(settings.shortcut_target_ema) not in decays):
    raise ValueError(
        f"objective.shortcut_target_ema={settings.shortcut_target_ema} must "
        f"be one of training.ema_decays={decays} (the target network is that "
        "EMA), or set objective.shortcut_target='online'.")
  if (settings.shortcut_bootstrap_cfg_scale != 1.0
      and not config.model.num_classes):
    raise ValueError(
        f"objective.shortcut_bootstrap_cfg_scale="
        f"{settings.shortcut_bootstrap_cfg_scale} needs a class-conditional "
        "model (model.num_classes > 0); use 1.0 (off).")
  if settings.shortcut_clip < 0:
    raise ValueError(f"objective.shortcut_clip={settings.shortcut_clip} must "
                     "be >= 0 (0: off).")
  schedules = [("eval.nfe", s) for s in config.eval.nfe]
  if config.sample.get("timesteps"):  # the grids' schedule, else sample.nfe
    schedules.append(("sample.timesteps", config.sample.timesteps))
  else:
    schedules.append(("sample.nfe", config.sample.nfe))
  for field, spec in schedules:
    problem = _schedule_problem(spec, max_steps)
    if problem:
      raise ValueError(f"{field} has {problem}.")


def draw(rng, batch, config, num_classes, context=None):
  """Per row: time t on its grid, step h, noise e, dropped label (flow-
  matching rows only) and the dropout key. Rows [0, B_b) are bootstrap rows,
  the rest flow matching (see `row_grids`)."""
  del context
  x = batch["x"]
  batch_size = x.shape[0]
  grid, h = row_grids(batch_size, config)
  rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
  cells = np.round(1.0 / grid).astype(np.int32)
  index = jax.random.randint(rng_t, (batch_size,), 1, cells + 1)
  is_fm = np.arange(batch_size) >= bootstrap_rows(batch_size, config)
  dropped = common.draw_dropped(rng_drop, batch["y"], num_classes,
                                config.class_dropout)
  return {"t": index.astype(jnp.float32) * grid,
          "h": jnp.asarray(h),
          "e": jax.random.normal(rng_e, x.shape, x.dtype),
          "dropped": dropped & is_fm,
          "dropout": common.dropout_rng(rng)}


def target_params(params, settings, context):
  """The parameters of the target network: an EMA copy of the train state
  (found by its decay, whatever the key's format) or sg(params)."""
  if settings.shortcut_target == "online":
    return jax.lax.stop_gradient(params)
  decay = float(settings.shortcut_target_ema)
  ema_params = context.ema_params if context is not None else {}
  for key, copy in ema_params.items():
    if float(key) == decay:
      return copy
  raise ValueError(f"objective.shortcut_target_ema={decay} is not among the "
                   f"EMA copies of the train state ({sorted(ema_params)}); "
                   "add it to training.ema_decays.")


def _clip(a, bound: float):
  return jnp.clip(a, -bound, bound) if bound > 0 else a


def bootstrap_target(u_fn, params, z, t, h, y, settings, num_classes,
                     **extras):
  """sg((s1 + s2) / 2) for bootstrap rows ordered as `bootstrap_levels`.

  With a guidance scale w != 1 the rows of the smallest level (the first
  ones) use s = s_null + w (s_y - s_null), their null-label copies appended
  to the same forward pass, as the official code does.
  """
  max_steps = settings.shortcut_max_steps
  scale = settings.shortcut_bootstrap_cfg_scale
  levels = bootstrap_levels(z.shape[0], max_steps)
  num_guided = 0
  if scale != 1.0 and num_classes:
    num_guided = int(np.sum(levels == num_levels(max_steps) - 1))
  half = h / 2
  # The smallest half step is the flow-matching level (1/M or 0).
  half_in = jnp.where(half * max_steps < 1.5, _fm_h(settings), half)
  extras_guided = {k: jnp.concatenate([v, v[:num_guided]])
                   for k, v in extras.items()}

  def jump(z, t):
    if not num_guided:
      return u_fn(params, z, t, half_in, y, False, **extras)
    null = jnp.full((num_guided,), num_classes, y.dtype)
    both = u_fn(params, jnp.concatenate([z, z[:num_guided]]),
                jnp.concatenate([t, t[:num_guided]]),
                jnp.concatenate([half_in, half_in[:num_guided]]),
                jnp.concatenate([y, null]), False, **extras_guided)
    cond, uncond = both[:z.shape[0]], both[z.shape[0]:]
    guided = uncond + scale * (cond[:num_guided] - uncond)
    return jnp.concatenate([guided, cond[num_guided:]])

  clip = settings.shortcut_clip
  s1 = jump(z, t)
  z_mid = _clip(z - common.broadcast_to(half, z) * s1, clip)
  s2 = jump(z_mid, t - half)
  return jax.lax.stop_gradient(_clip((s1 + s2) / 2, clip))


def _rows(a, num_boot: int, split: str):
  """Per-example arrays in row order: bootstrap rows take examples
  [0, B_b), flow-matching rows [B_b, B) ("disjoint") or [0, B - B_b)
  ("code")."""
  if split == "disjoint" or num_boot == 0:
    return a
  return jnp.concatenate([a[:num_boot], a[:a.shape[0] - num_boot]])


def terms(u_fn, params, batch, draws, config, num_classes, context=None):
  """Every intermediate of the loss, deterministic given `draws`."""
  batch_size = batch["x"].shape[0]
  num_boot = bootstrap_rows(batch_size, config)
  rows = {k: _rows(v, num_boot, config.shortcut_batch_split)
          for k, v in batch.items() if k in ("x", "y", "augment_labels")}
  t, h = draws["t"], draws["h"]
  z, v = common.interpolate(rows["x"], draws["e"], t)
  u_target = v
  if num_boot:
    extras = {k: rows[k][:num_boot] for k in rows if k == "augment_labels"}
    boot = bootstrap_target(
        u_fn, target_params(params, config, context), z[:num_boot],
        t[:num_boot], h[:num_boot], rows["y"][:num_boot], config,
        num_classes, **extras)
    u_target = jnp.concatenate([boot, v[num_boot:]])
  y = common.drop_labels(rows["y"], draws["dropped"], num_classes)
  u = u_fn(params, z, t, h, y, True,
           **common.model_extras(u_fn, rows, draws))
  return {"z": z, "v": v, "y": y, "u": u, "u_target": u_target,
          "num_bootstrap": num_boot,
          "sq_error": common.per_sample_sq_error(u, u_target)}


def loss(u_fn, params, batch, draws, config, num_classes, context=None):
  """Returns (scalar loss, metrics) for one batch {'x', 'y'}."""
  out = terms(u_fn, params, batch, draws, config, num_classes, context)
  num_boot, sq_error = out["num_bootstrap"], out["sq_error"]
  value, weight_b = common.adaptive_weighted_loss(
      sq_error, config.adaptive_p, config.adaptive_eps)
  metrics = {"loss": value, "mse": jnp.mean(sq_error),
             "v_mse": jnp.mean(sq_error[num_boot:]),
             "weight": jnp.mean(weight_b)}
  if num_boot:
    metrics["bootstrap_mse"] = jnp.mean(sq_error[:num_boot])
  return value, metrics
