r"""Class-conditional MeanFlow on scikit-learn's 8x8 digits, with a small DiT.

The README's main job: about 15 minutes on a 2-core CPU, then
WORKDIR/samples/*_nfe1.png shows one column per class (1-NFE samples) and
WORKDIR/eval/<step>.json the Fréchet distance in the digits classifier's
feature space (nfe1/fd_digits) and the classifier's agreement with the
conditioning labels.

  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits

Argument keys: objective (meanflow | flow_matching), fraction_r_neq_t.
"""

from mf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="meanflow", fraction_r_neq_t=0.25)
  c = config_lib.base_config()
  c.model.update(name="dit", variant="", input_size=8, in_channels=1,
                 patch_size=4, hidden_size=128, depth=4, num_heads=4,
                 num_classes=10)
  c.objective.update(name=arg.objective, fraction_r_neq_t=arg.fraction_r_neq_t)
  if arg.objective == "flow_matching":
    c.objective.adaptive_p = 0.0
  c.data.name = "digits"
  c.optimizer.update(lr=1e-3, b2=0.99, warmup_steps=200)
  c.training.update(num_steps=6000, batch_size=128, log_every_steps=200,
                    ema_decays=(0.999,))
  c.checkpoint.every_steps = 1000
  c.eval.update(every_steps=2000, nfe=(1, 2), num_samples=1000,
                batch_size=500)
  c.sample.update(every_steps=2000, nfe=1)
  return c
