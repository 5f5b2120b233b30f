r"""alpha-Flow-B/2 on ImageNet 256 latents, without guidance (400k steps).

The official run `alphaflow-sigmoid-latentspace-B-2` (snap-research/
alphaflow, infra/experiments/experiments-alphaflow.yaml), whose values
differ from MeanFlow's ImageNet setting only where set below:
- alpha: sigmoid curriculum 1 -> 0 over steps 0 -> 400,000 (all of
  training), gamma 25, snapped to 0 below 0.005 (then MeanFlow's exact
  target); `ratio_fm` 0.5 (half the rows r = t: fraction_r_neq_t = 0.5).
- No training-time guidance (omega 1, kappa 0) and no label dropout.
- Adam (0.9, 0.95), lr 1e-4, no weight decay (the optimizer here is AdamW
  with weight decay 0, the same update), batch 256, DiT-B/2.
Not taken from the official files: the logit-normal time parameters and
the EMA decay (MeanFlow's -0.4, 1.0 and 0.9999 are kept). The alpha-Flow
README reports 1-NFE FID 40.2 for alpha-Flow-B/2 against 43.1 for its
MeanFlow-B/2 baseline.

  python -m mf_jax.main --config=configs/imagenet256_alpha_flow_b2.py \
      --workdir=DIR --config.data.latents_dir=LATENTS
"""

from mf_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.imagenet256_config("B/2", omega=1.0, kappa=0.0,
                                    t_start=0.0, t_end=1.0)
  c.training.num_steps = 400_000
  c.objective.update(name="alpha_flow", fraction_r_neq_t=0.5,
                     class_dropout=0.0, alpha_schedule="sigmoid",
                     alpha_start_step=0, alpha_end_step=400_000,
                     alpha_gamma=25.0, alpha_clamp=0.005)
  return c
