r"""alpha-Flow-XL/2 on ImageNet 256 latents, with training-time guidance.

The official run `alphaflow-sigmoid-latentspace-XL-2-cfg-training`
(snap-research/alphaflow, infra/experiments/experiments-alphaflow.yaml):
- 1,200,000 steps; alpha = 1 (trajectory flow matching) until step
  600,000, the sigmoid transition 600,000 -> 1,000,000 (gamma 25, snapped
  to 0 below 0.005), then MeanFlow's exact target for the last 200,000.
- `ratio_fm` 0.5 (fraction_r_neq_t = 0.5); targets clipped to +-4
  (`clamp_utgt`).
- Guidance omega 0.2, kappa 0.92 on t in [0, 0.75] (effective scale 2.5),
  label dropout 0.1, as MeanFlow-XL/2's; the official gate is strict
  (0 < t < 0.75), ours inclusive (guidance.py).
- Adam (0.9, 0.95), lr 1e-4, no weight decay, batch 256, DiT-XL/2.
Not taken from the official files: the logit-normal time parameters and
the EMA decay (MeanFlow's are kept). The alpha-Flow README reports FID
2.95 (1 NFE) and 2.34 (2 NFE) for alpha-Flow-XL/2-cfg, against 3.47 and
2.46 for its MeanFlow-XL/2 baseline.

  python -m mf_jax.main --config=configs/imagenet256_alpha_flow_xl2.py \
      --workdir=DIR --config.data.latents_dir=LATENTS
"""

from mf_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.imagenet256_config("XL/2", omega=0.2, kappa=0.92,
                                    t_start=0.0, t_end=0.75)
  c.training.num_steps = 1_200_000
  c.objective.update(name="alpha_flow", fraction_r_neq_t=0.5,
                     class_dropout=0.1, alpha_schedule="sigmoid",
                     alpha_start_step=600_000, alpha_end_step=1_000_000,
                     alpha_gamma=25.0, alpha_clamp=0.005,
                     alpha_clip_target=4.0)
  return c
