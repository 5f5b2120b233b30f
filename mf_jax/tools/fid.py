r"""FID-50K and Inception Score of a run's checkpoint; weights are named, never
downloaded (local files or gs:// URIs).

  python -m mf_jax.tools.fid --config=configs/imagenet256_b4.py --workdir=DIR \
      --inception=pt_inception-2015-12-05-6726825d.pth \
      --ref_stats=VIRTUAL_imagenet256_labeled.npz --vae=VAE_WEIGHTS \
      [--step=N] [--nfe=1] [--num_samples=50000] [--npz_out=samples.npz] \
      [--fid_protocol=adm] [--labels=random]

Writes DIR/eval/fid_<step>_nfe<N>.json (FID, IS, and which protocol,
Inception, reference statistics, VAE, labels and sample count produced them)
and prints it. --fid_protocol (default: the config's eval.fid_protocol) is
how images reach the network: adm (ADM's evaluator and the official MeanFlow
JAX evaluator: TF 1.x resize, (x - 128) / 128), pytorch_fid, torchmetrics
(py-meanflow's CIFAR-10 FID) or torchmetrics_antialias (torchmetrics >= 1.8);
see mf_jax/evaluation/inception.py. --inception takes pytorch-fid's .pth or
torch-fidelity's (the same weights; needs torch) or its .npz/.safetensors
conversion:

  python -c "from mf_jax.evaluation import inception; \
      inception.convert_weights('pt_inception-2015-12-05-6726825d.pth', \
      'inception_fid.npz')"

--ref_stats is an npz with mu/sigma (ADM reference batch, pytorch-fid or the
official MeanFlow code's ref_mu/ref_sigma); one holding only images `arr_0`
gets its statistics computed. To compute and save reference statistics once
(no checkpoint needed) from an npz of uint8 images, or from the train split
of a TFDS dataset prepared locally (CIFAR-10 FID uses its 50,000 training
images):

  python -m mf_jax.tools.fid --compute_ref_from=IMAGES.npz \
      --inception=inception_fid.npz --ref_stats=OUT_STATS.npz --fid_protocol=adm
  python -m mf_jax.tools.fid --compute_ref_from=tfds:cifar10 \
      --tfds_data_dir=DIR --inception=inception_fid.npz \
      --ref_stats=cifar10_train_stats.npz --config=configs/cifar10_unet.py

The statistics file records its protocol (--fid_protocol, else the
--config's eval.fid_protocol, else pytorch_fid), and scoring with another
protocol against it fails. Flags left out fall back to the config:
--inception and --ref_stats to eval.inception and eval.ref_stats, --vae to
data.vae, --fid_protocol and --labels to eval.fid_protocol and eval.labels.
"""

import json

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from mf_jax import distributed
from mf_jax import samplers
from mf_jax.evaluation import fid_eval
from mf_jax.evaluation import inception
from mf_jax.training import trainer


def evaluate_fid(config, workdir: str, *, step: int | None = None,
                 **kwargs) -> dict:
  """Scores a checkpoint's eval (EMA) parameters (latest by default); the
  keyword arguments are `fid_eval.score_params`'s. Writes and returns
  WORKDIR/eval/fid_<step>_nfe<nfe>.json."""
  fid_eval.check_vae(config, kwargs.get("vae_path"))
  exp = trainer.Experiment(config, workdir)
  state, step = exp.restore(step=step)
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  try:
    return fid_eval.score_params(
        exp.config, exp.u_fn, exp.mesh, exp.input_shape,
        exp.eval_params(state), step, workdir=workdir, **kwargs)
  finally:
    exp.checkpointer.close()


def _check_flag_files(config, protocol=None, **paths):
  """The files named by flags (which override the config's), checked as
  the trainer checks the config's: one-line errors before any work."""
  channels = None
  if config is not None and fid_eval.is_latent(config):
    channels = config.model.in_channels
  for kind, path in paths.items():
    if path:
      fid_eval.check_file(kind, path, f"--{kind}", channels, protocol)


def _protocol(config, flag_values) -> str:
  """--fid_protocol, else the config's, else pytorch-fid's; checked."""
  name = flag_values.fid_protocol or (
      fid_eval.fid_protocol(config) if config is not None else "pytorch_fid")
  if name not in inception.PROTOCOLS:
    raise app.UsageError(f"--fid_protocol={name!r}: must be one of "
                         f"{tuple(inception.PROTOCOLS)}.")
  return name


def run(config, flag_values) -> dict:
  """The tool's work for parsed flag values (a namespace with flag names)."""
  f = flag_values
  if f.compute_ref_from:
    if not (f.inception and f.ref_stats):
      raise app.UsageError("--compute_ref_from needs --inception and "
                           "--ref_stats (the output).")
    _check_flag_files(None, inception=f.inception)
    return fid_eval.reference_stats(
        f.compute_ref_from, f.inception, f.ref_stats,
        batch_size=f.batch_size or 200, tfds_data_dir=f.tfds_data_dir,
        protocol=_protocol(config, f))
  if config is None or not f.workdir:
    raise app.UsageError("--config and --workdir are required (or use "
                         "--compute_ref_from).")
  # Unset flags fall back to the config's eval.inception, eval.ref_stats
  # and data.vae.
  inception_path = f.inception or config.eval.inception
  ref_stats = f.ref_stats or config.eval.ref_stats
  if not (inception_path and ref_stats):
    raise app.UsageError("Name the Inception weights and reference "
                         "statistics: --inception and --ref_stats.")
  vae_path = f.vae or config.data.vae or None
  protocol = _protocol(config, f)
  labels = f.labels or config.eval.labels
  if labels not in samplers.LABEL_MODES:
    raise app.UsageError(f"--labels={labels!r}: must be one of "
                         f"{samplers.LABEL_MODES}.")
  _check_flag_files(config, protocol, inception=inception_path,
                    ref_stats=ref_stats, vae=vae_path)
  return evaluate_fid(
      config, f.workdir, inception_path=inception_path,
      ref_stats_path=ref_stats, step=f.step, num_samples=f.num_samples,
      nfe=f.nfe, vae_path=vae_path,
      npz_out=f.npz_out, batch_size=f.batch_size, seed=f.seed,
      stats_out=f.stats_out, protocol=protocol, labels=labels)


def main(argv):
  del argv
  distributed.initialize()
  result = run(_CONFIG.value, flags.FLAGS)
  if jax.process_index() == 0:
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                            lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("num_samples", 50_000, "Samples to score.")
  flags.DEFINE_integer("nfe", 1, "Sampling steps.")
  flags.DEFINE_string("inception", None, "pytorch-fid Inception weights "
                      "(.pth, or .npz/.safetensors from convert_weights; "
                      "default: config.eval.inception).")
  flags.DEFINE_string("ref_stats", None, "Reference statistics npz (mu, "
                      "sigma), or images arr_0 to compute them from "
                      "(default: config.eval.ref_stats).")
  flags.DEFINE_string("vae", None, "VAE weights, for latent-space models "
                      "(default: config.data.vae).")
  flags.DEFINE_string("npz_out", None, "Optional ADM-style sample npz "
                      "(uint8 arr_0, labels arr_1).")
  flags.DEFINE_string("stats_out", None, "Optional npz for the samples' "
                      "mu/sigma.")
  flags.DEFINE_integer("batch_size", None, "Global batch (default: "
                       "config.eval.batch_size).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("compute_ref_from", None, "Images npz, or tfds:NAME "
                      "(its train split): write their statistics to "
                      "--ref_stats and exit.")
  flags.DEFINE_string("tfds_data_dir", "", "TFDS data dir for tfds:NAME.")
  flags.DEFINE_enum("fid_protocol", None, list(inception.PROTOCOLS),
                    "How images reach the Inception network (default: "
                    "config.eval.fid_protocol, else pytorch_fid).")
  flags.DEFINE_enum("labels", None, list(samplers.LABEL_MODES),
                    "Sample labels (default: config.eval.labels).")
  app.run(main)
