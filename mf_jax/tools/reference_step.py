"""The official MeanFlow train step, rebuilt as the yardstick for `bench`.

`bench --against=official-structure` times the project's step against this
one in the same process. It re-implements the STRUCTURE of the official JAX
code (Gsunshine/meanflow; official_meanflow.md), not its numbers (which are
the same: tests/test_bench.py checks the loss and every gradient against
the project's and the official fixture's), so a speed difference measures
how the two steps are built:

- the network: the official DiT's module layout (every Dense wrapped in a
  torch-like `_flax_linear`, `nn.Sequential` for the time MLPs, the adaLN
  modulations and the block stack; parameter paths those of an official
  checkpoint's `['net']`) and its attention math: the fused qkv output
  transposed to (3, B, heads, N, head_dim), q scaled, q @ k^T, an explicit
  softmax, @ v, transposed back;
- the loss: the official `MeanFlow.forward` (index-based r = t rows and
  dropped labels, t as (B, 1, 1, 1), `jax.jvp` over (z, t, r) with tangents
  (v_g, 1, 0), clipped t - r) and a flow-matching loss written the same
  way; the guidance velocities are SEPARATE forward passes (one for
  kappa = 0, two for kappa > 0), not one pass over a doubled batch;
- the step: the official train.py's, on one device (jit where it uses
  pmap, so no pmean or all_gather): `jax.value_and_grad` of the loss,
  `flax.training.train_state.TrainState.apply_gradients` with
  `optax.adamw`, then the EMA of the new parameters as a tree_map; float32
  throughout and no buffer donation.

It is built from the same config as the project's step (backbone sizes,
objective settings, optimizer hyperparameters, EMA decays, batch), so both
compute the same function. Guidance off (omega = 1, kappa = 0) is the
official `guidance_eq='none'`: no guidance pass (the official 'cfg' branch
would still evaluate v_uncond and discard it to rounding).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from mf_jax.models import dit
from mf_jax.models import official

OBJECTIVES = ("meanflow", "flow_matching")
LN_EPS = 1e-6
_zeros = nn.initializers.zeros
_xavier = nn.initializers.xavier_uniform()
_normal_002 = nn.initializers.normal(0.02)


# ---------------------------------------------------------------------------
# The network, in the official module layout.


class TorchLinear(nn.Module):
  """The official torch-like Linear: a Dense named `_flax_linear` inside."""
  features: int
  kernel_init: Callable = _xavier

  def setup(self):
    self._flax_linear = nn.Dense(self.features, kernel_init=self.kernel_init,
                                 bias_init=_zeros)

  def __call__(self, x):
    return self._flax_linear(x)


class TorchEmbedding(nn.Module):
  num_embeddings: int
  features: int

  def setup(self):
    self._flax_embedding = nn.Embed(self.num_embeddings, self.features,
                                    embedding_init=_normal_002)

  def __call__(self, ids):
    return self._flax_embedding(ids)


def _layer_norm():
  return nn.LayerNorm(epsilon=LN_EPS, use_bias=False, use_scale=False)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
  """[cos, sin] of t at 128 frequencies, then Linear-SiLU-Linear."""
  hidden_size: int
  frequency_size: int = 256

  def setup(self):
    self.mlp = nn.Sequential([
        TorchLinear(self.hidden_size, _normal_002), nn.silu,
        TorchLinear(self.hidden_size, _normal_002)])

  def __call__(self, t):
    half = self.frequency_size // 2
    freqs = jnp.exp(-np.log(10000.0)
                    * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None].astype(jnp.float32) * freqs[None]
    return self.mlp(jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1))


class PatchEmbed(nn.Module):
  hidden_size: int
  patch_size: int

  def setup(self):
    p = self.patch_size
    self.proj = nn.Conv(
        self.hidden_size, (p, p), strides=(p, p),
        kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2),
                                                   out_axis=-1),
        bias_init=_zeros)

  def __call__(self, x):
    y = self.proj(x)
    return y.reshape(x.shape[0], -1, y.shape[-1])


class Attention(nn.Module):
  """timm's attention as the official code writes it in JAX."""
  dim: int
  num_heads: int

  def setup(self):
    self.qkv = TorchLinear(3 * self.dim)
    self.proj = TorchLinear(self.dim)

  def __call__(self, x):
    b, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim)
    qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
    q, k, v = jnp.split(qkv, 3, axis=0)
    q = q * head_dim ** -0.5
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 2, 4, 3), axis=-1)
    out = (weights @ v)[0].transpose(0, 2, 1, 3).reshape(b, n, c)
    return self.proj(out)


class Mlp(nn.Module):
  dim: int
  hidden: int

  def setup(self):
    self.fc1 = TorchLinear(self.hidden)
    self.fc2 = TorchLinear(self.dim)

  def __call__(self, x):
    return self.fc2(nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nn.Module):
  hidden_size: int
  num_heads: int
  mlp_ratio: float

  def setup(self):
    d = self.hidden_size
    self.norm1, self.norm2 = _layer_norm(), _layer_norm()
    self.attn = Attention(d, self.num_heads)
    self.mlp = Mlp(d, int(d * self.mlp_ratio))
    self.adaLN_modulation = nn.Sequential([nn.silu,
                                           TorchLinear(6 * d, _zeros)])

  def __call__(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        jnp.split(self.adaLN_modulation(c), 6, axis=1))
    x = x + gate_msa[:, None] * self.attn(
        _modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp[:, None] * self.mlp(
        _modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
  hidden_size: int
  out_features: int

  def setup(self):
    self.norm_final = _layer_norm()
    self.linear = TorchLinear(self.out_features, _zeros)
    self.adaLN_modulation = nn.Sequential(
        [nn.silu, TorchLinear(2 * self.hidden_size, _zeros)])

  def __call__(self, x, c):
    shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=1)
    return self.linear(_modulate(self.norm_final(x), shift, scale))


class LabelEmbedder(nn.Module):
  num_classes: int
  hidden_size: int

  def setup(self):
    self.embedding_table = TorchEmbedding(self.num_classes + 1,
                                          self.hidden_size)

  def __call__(self, y):
    return self.embedding_table(y)


def _sincos_2d(dim: int, grid: int) -> np.ndarray:
  """MAE's fixed 2-D embedding in float64 (first half: column, then row)."""
  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32),
                           np.arange(grid, dtype=np.float32))
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


class ReferenceDiT(nn.Module):
  """u = net(z, t, h, y) with the official `['net']` parameter tree.

  num_classes = 0 (which the official code does not have) drops the label
  table, as the project's DiT does, so the two layouts still map 1:1.
  """
  patch_size: int
  in_channels: int
  hidden_size: int
  depth: int
  num_heads: int
  num_classes: int
  mlp_ratio: float = 4.0

  def setup(self):
    d = self.hidden_size
    self.x_embedder = PatchEmbed(d, self.patch_size)
    self.t_embedder = TimestepEmbedder(d)
    self.h_embedder = TimestepEmbedder(d)
    if self.num_classes:
      self.y_embedder = LabelEmbedder(self.num_classes, d)
    self.blocks = nn.Sequential([
        DiTBlock(d, self.num_heads, self.mlp_ratio) for _ in range(self.depth)])
    self.final_layer = FinalLayer(
        d, self.patch_size ** 2 * self.in_channels)

  def __call__(self, x, t, h, y, train=False):
    del train  # no dropout: label dropout is the loss's (official too)
    b, size, _, channels = x.shape
    p, grid = self.patch_size, size // self.patch_size
    tokens = self.x_embedder(x) + jnp.asarray(
        _sincos_2d(self.hidden_size, grid)).astype(jnp.float32)
    c = self.t_embedder(t) + self.h_embedder(h)
    if self.num_classes:
      c = c + self.y_embedder(y)
    for block in self.blocks.layers:
      tokens = block(tokens, c)
    out = self.final_layer(tokens, c)
    out = out.reshape(b, grid, grid, p, p, channels)
    out = jnp.einsum("nhwpqc->nhpwqc", out)
    return out.reshape(b, grid * p, grid * p, channels)


# ---------------------------------------------------------------------------
# The losses, as the official `MeanFlow.forward` writes them. Times are
# (B, 1, 1, 1) and reshaped to (B,) for the network.


def _time(rng, batch_size: int, settings):
  shape = (batch_size, 1, 1, 1)
  if settings.time_sampler == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(rng, shape) * settings.time_std
                          + settings.time_mean)
  return jax.random.uniform(rng, shape)


def draw(rng, shape, settings) -> dict:
  """The official draws: t >= r (the first int(B (1 - fraction_r_neq_t))
  rows with r = t), noise e, and the count of dropped labels (the first
  `num_drop` rows are dropped). Flow matching uses t, e and num_drop.
  `shape` is the batch's, (B, H, W, C)."""
  batch_size = shape[0]
  rng_t, rng_r, rng_e, rng_drop = jax.random.split(rng, 4)
  t, r = _time(rng_t, batch_size, settings), _time(rng_r, batch_size, settings)
  t, r = jnp.maximum(t, r), jnp.minimum(t, r)
  data_size = int(batch_size * (1 - settings.fraction_r_neq_t))
  r = jnp.where(jnp.arange(batch_size).reshape(t.shape) < data_size, t, r)
  drop = jax.random.uniform(rng_drop, (batch_size,)) < settings.class_dropout
  return {"t": t, "r": r,
          "e": jax.random.normal(rng_e, shape),
          "num_drop": jnp.sum(drop).astype(jnp.int32)}


def _guidance(u_fn, v, z_t, t, y, settings, num_classes):
  """v_g from separate forward passes at h = 0 (the official guidance_fn)."""
  omega, kappa = settings.guidance_omega, settings.guidance_kappa
  if omega == 1.0 and kappa == 0.0:  # guidance_eq='none'
    return v
  inside = (t >= settings.guidance_t_start) & (t <= settings.guidance_t_end)
  y_null = jnp.full_like(y, num_classes)
  v_uncond = u_fn(z_t, t, jnp.zeros_like(t), y_null)
  if kappa == 0.0:
    omega_t = jnp.where(inside, omega, 1.0)
    return v_uncond + omega_t * (v - v_uncond)
  v_cond = u_fn(z_t, t, jnp.zeros_like(t), y)
  omega_t = jnp.where(inside, omega, 1.0)
  kappa_t = jnp.where(inside, kappa, 0.0)
  return omega_t * v + (1 - omega_t - kappa_t) * v_uncond + kappa_t * v_cond


def _cond_drop(v, v_g, y, num_drop, num_classes):
  dropped = jnp.arange(y.shape[0]) < num_drop
  y_inp = jnp.where(dropped, num_classes, y) if num_classes else y
  return y_inp, jnp.where(dropped[:, None, None, None], v, v_g)


def _adaptive_loss(u, u_tgt, v, settings):
  per_sample = jnp.sum((u - u_tgt) ** 2, axis=(1, 2, 3))
  weight = (per_sample + settings.adaptive_eps) ** settings.adaptive_p
  loss = jnp.mean(per_sample / jax.lax.stop_gradient(weight))
  return loss, {"loss": loss,
                "v_loss": jnp.sum((u - v) ** 2, axis=(1, 2, 3))}


def meanflow_loss(u_fn, x, y, draws, settings, num_classes):
  """(loss, {'loss', 'v_loss'}) given the draws; u_fn(z, t, h, y)."""
  t, r, e = draws["t"], draws["r"], draws["e"]
  z_t = (1 - t) * x + t * e
  v = e - x
  v_g = _guidance(u_fn, v, z_t, t, y, settings, num_classes)
  y_inp, v_g = _cond_drop(v, v_g, y, draws["num_drop"], num_classes)
  u, du_dt = jax.jvp(lambda z, t, r: u_fn(z, t, t - r, y_inp), (z_t, t, r),
                     (v_g, jnp.ones_like(t), jnp.zeros_like(t)))
  u_tgt = jax.lax.stop_gradient(
      v_g - jnp.clip(t - r, min=0.0, max=1.0) * du_dt)
  return _adaptive_loss(u, u_tgt, v, settings)


def flow_matching_loss(u_fn, x, y, draws, settings, num_classes):
  """The same loss with h = 0 and no JVP: regress v = e - x."""
  t, e = draws["t"], draws["e"]
  z_t = (1 - t) * x + t * e
  v = e - x
  y_inp, _ = _cond_drop(v, v, y, draws["num_drop"], num_classes)
  u = u_fn(z_t, t, jnp.zeros_like(t), y_inp)
  return _adaptive_loss(u, v, v, settings)


LOSSES = {"meanflow": meanflow_loss, "flow_matching": flow_matching_loss}


# ---------------------------------------------------------------------------
# The train step, as the official train.py builds it (one device).


class TrainState(train_state.TrainState):
  """flax's TrainState plus the EMA copies, {decay key: params}."""
  ema_params: Any = None


def check_config(config):
  """One line naming what the reference cannot build, before compiling."""
  m, o = config.model, config.objective
  problems = []
  if m.name != "dit":
    problems.append(f"model.name={m.name!r} (needs 'dit')")
  else:
    for field, want in (("time_inputs", "t,h"), ("dtype", "float32"),
                        ("adaptive_weight_dim", 0)):
      if m.get(field, want) != want:
        problems.append(f"model.{field}={m.get(field)!r} (needs {want!r})")
  if o.name not in OBJECTIVES:
    problems.append(f"objective.name={o.name!r} (needs one of {OBJECTIVES})")
  if o.jvp_tangent != "v,0,1":
    problems.append(f"objective.jvp_tangent={o.jvp_tangent!r} (needs 'v,0,1')")
  if o.time_sampler not in ("logit_normal", "uniform"):
    problems.append(f"objective.time_sampler={o.time_sampler!r}")
  if o.get("teacher"):
    problems.append("objective.teacher (distillation)")
  if config.optimizer.grad_clip_norm:
    problems.append("optimizer.grad_clip_norm (the official step has none)")
  if problems:
    raise ValueError("The official-structure reference step cannot mirror "
                     f"this config: {'; '.join(problems)}.")


def network(model_config) -> ReferenceDiT:
  """The reference DiT of a project DiT config (variant or explicit sizes)."""
  arch = dit.from_config(model_config)
  return ReferenceDiT(
      patch_size=arch.patch_size, in_channels=model_config.in_channels,
      hidden_size=arch.hidden_size, depth=arch.depth,
      num_heads=arch.num_heads, num_classes=arch.num_classes,
      mlp_ratio=arch.mlp_ratio)


def to_project_params(params) -> dict:
  """Reference (official-layout) parameters -> the project DiT's."""
  return official.official_to_mf_jax(params)


class ReferenceStep:
  """The official train step structure for one config: state, step, AOT."""

  def __init__(self, config):
    check_config(config)
    self.net = network(config.model)
    size, channels = config.model.input_size, config.model.in_channels
    self.input_shape = (size, size, channels)
    self.num_classes = config.model.num_classes
    self.settings = config.objective
    self.loss = LOSSES[config.objective.name]
    opt = config.optimizer
    self.lr = opt.lr
    self.tx = optax.adamw(
        opt.lr, opt.b1, opt.b2, opt.eps,
        weight_decay=opt.weight_decay if opt.name == "adamw" else 0.0)
    self.ema_decays = tuple(float(d) for d in config.training.ema_decays)
    self.seed = config.training.seed

  def u_fn(self, params):
    """u(z, t, h, y) with (B, 1, 1, 1) or (B,) times, as the official's."""
    def u(z, t, h, y):
      b = z.shape[0]
      return self.net.apply({"params": params}, z, t.reshape(b),
                            h.reshape(b), y, train=True)
    return u

  def loss_fn(self, params, batch, draws):
    return self.loss(self.u_fn(params), batch["x"], batch["y"], draws,
                     self.settings, self.num_classes)

  def init_params(self, rng):
    x = jnp.ones((1, *self.input_shape))
    t = jnp.ones((1,))
    return self.net.init(rng, x, t, t, jnp.ones((1,), jnp.int32))["params"]

  def new_state(self, rng=None) -> TrainState:
    rng = jax.random.key(self.seed) if rng is None else rng
    params = self.init_params(rng)
    return TrainState.create(
        apply_fn=self.net.apply, params=params, tx=self.tx,
        ema_params={str(d): params for d in self.ema_decays})

  def train_step(self, state: TrainState, batch, rng):
    rng_step = jax.random.fold_in(rng, state.step)
    draws = draw(rng_step, batch["x"].shape, self.settings)
    grad_fn = jax.value_and_grad(
        functools.partial(self.loss_fn, batch=batch, draws=draws),
        has_aux=True)
    (_, metrics), grads = grad_fn(state.params)
    new_state = state.apply_gradients(grads=grads)
    ema = {key: jax.tree.map(lambda e, p, d=float(key): e * d + p * (1 - d),
                             tree, new_state.params)
           for key, tree in state.ema_params.items()}
    return new_state.replace(ema_params=ema), dict(metrics, lr=self.lr)

  def compile(self, batch_size: int):
    """The jitted step compiled ahead of time (no donation)."""
    state = jax.eval_shape(self.new_state, jax.random.key(0))
    batch = {"x": jax.ShapeDtypeStruct((batch_size, *self.input_shape),
                                       jnp.float32),
             "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    rng = jax.eval_shape(jax.random.key, 0)
    return jax.jit(self.train_step).lower(state, batch, rng).compile()
