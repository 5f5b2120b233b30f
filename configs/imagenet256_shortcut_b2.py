r"""Shortcut model, DiT-B/2 on ImageNet 256 latents: the paper's setting.

  python -m mf_jax.main --config=configs/imagenet256_shortcut_b2.py \
      --workdir=DIR --config.data.latents_dir=LATENTS

Sources: the official code kvfrans/shortcut-models, train.py's defaults
(`model_config`) and its README's ImageNet-256 DiT-B command (read from
forks that keep them unchanged), and shared/research/method_family.md §7.

- DiT-B/2 (hidden 768, depth 12, 12 heads, patch 2, mlp ratio 4): README
  command (--model.hidden_size 768 --model.patch_size 2 --model.depth 12
  --model.num_heads 12 --model.mlp_ratio 4). Dropout 0: train.py default.
- Batch 256, 810,000 steps: README command (--batch_size 256
  --max_steps 810_000). Not a whole number of our 5004-step epochs
  (161.9 epochs).
- AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.1, constant, no warmup,
  no gradient clipping: train.py defaults (lr, beta1, beta2, weight_decay,
  use_cosine 0, warmup 0).
- M = 128 (denoise_timesteps), 1/8 of each batch bootstrap rows
  (bootstrap_every 8), EMA target (bootstrap_ema 1) at decay 0.999
  (target_update_rate), flow-matching rows at d = 1/M, clip 4: train.py
  defaults and targets_shortcut.py.
- Guidance in the bootstrap targets, scale 1.5 on the smallest level:
  README command (--model.bootstrap_cfg 1 --model.cfg_scale 1.5); train.py's
  own default is off. Label dropout 0.1: --model.class_dropout_prob 0.1.
- Loss: plain mean squared error (adaptive_p = 0), train.py's loss_fn.
- Evaluation: the online parameters (eval.ema_decay = 0), since the
  official evaluation calls the EMA only with --model.use_ema 1 (train.py
  default 0, not set by the README command); the EMA 0.999 is kept as the
  target. Set --config.eval.ema_decay=0.999 to score the EMA instead.
  Steps 1, 4 and 128, no sampling-time guidance: the official FIDs at
  1/4/32/128 steps use cfg 1 (guided FID only at 128 steps). The README's
  sanity figures for DiT-B: FID 40.3 (1 step), 28.3 (4), 15.5 (128), on
  the official JAX FID of 4096 samples and its own reference statistics,
  not comparable to our 50k-sample ADM protocol.
- Data: random horizontal flips as the official pipeline
  (utils/datasets.py, tf.image.random_flip_left_right), a posterior sample
  of the SD-VAE latent per step (the official encodes images on the fly).
  The official crop is a centre crop to the short side, then an antialiased
  resize; our latents use ADM's centre crop.

Differences that remain: our DiT embeds the step h continuously (a
sinusoid of h, like t) where the official embeds the integer log2(1/d)
with a second timestep embedder; the official noising is
x_t = (1 - (1 - 1e-5) t) x0 + t x1 (data at t = 1), ours the plain
interpolation; the official loss is a mean over dimensions, ours a sum
(a constant factor; AdamW is invariant to it up to its eps).
"""

from mf_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.imagenet256_config("B/2", omega=1.0, kappa=0.0,
                                    t_start=0.0, t_end=1.0)
  c.objective.update(
      name="shortcut", adaptive_p=0.0, class_dropout=0.1,
      shortcut_max_steps=128, shortcut_bootstrap_fraction=1 / 8,
      shortcut_fm_step="min", shortcut_target="ema",
      shortcut_target_ema=0.999, shortcut_bootstrap_cfg_scale=1.5,
      shortcut_clip=4.0, shortcut_batch_split="code")
  c.optimizer.update(name="adamw", lr=1e-4, b1=0.9, b2=0.999,
                     weight_decay=0.1, warmup_steps=0, schedule="constant",
                     grad_clip_norm=0.0)
  c.training.update(num_steps=810_000, batch_size=256, ema_decays=(0.999,))
  c.eval.update(nfe=(1, 4, 128), ema_decay=0.0)
  return c
