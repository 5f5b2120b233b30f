r"""Class-conditional MeanFlow on scikit-learn's 8x8 digits, with a small DiT.

The README's main job: about 10 minutes on a 2-core CPU, then
WORKDIR/samples/*_nfe1.png shows one column per class (1-NFE samples) and
WORKDIR/eval/<step>.json the Fréchet distance in the digits classifier's
feature space (nfe1/fd_digits) and the classifier's agreement with the
conditioning labels.

  python -m mf_jax.main --config=configs/digits.py --workdir=/tmp/digits

Argument keys: objective (meanflow | flow_matching | shortcut | ...),
fraction_r_neq_t.
"""

from mf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="meanflow", fraction_r_neq_t=0.25)
  c = config_lib.digits_config(arg.objective, arg.fraction_r_neq_t)
  if arg.objective == "shortcut":
    c.objective.adaptive_p = 0.0  # the official plain L2
  if arg.objective == "ct":  # online target: mu0 = 0.9 is for 800k steps
    c.objective.ct_mu0 = 0.0  # (objectives/ct.py)
  if arg.objective in ("sct", "scd"):  # their learned weight w(t)
    c.model.adaptive_weight_dim = 128
  if arg.objective in ("sct", "scd", "ayf"):  # a 10 % tangent warm-up
    c.objective[f"{arg.objective}_warmup_steps"] = 600
  if arg.objective == "score_sde":  # its three samplers, 100 steps each
    c.eval.nfe = ("em100", "pc100", "ode")
    c.sample.nfe = 100  # Euler-Maruyama
  c.model.update(name="dit", variant="", patch_size=4, hidden_size=128,
                 depth=4, num_heads=4)
  return c
