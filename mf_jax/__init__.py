"""mf_jax: one-step generative models (MeanFlow and its family) in JAX."""

import os
import sys

# The oldest interpreter the tested stacks cover (README, "Tested stacks").
# Checked before anything imports jax: on an older Python pip quietly
# resolves an older, untested jax/orbax pair that crashes at the first
# checkpoint, hours into a run, so refuse at once with one line instead.
# (Kept to syntax any Python 3 parses, so the message is what an old one shows.)
MIN_PYTHON = (3, 11)

if sys.version_info[:2] < MIN_PYTHON:
  raise SystemExit(
      "mf_jax needs Python %d.%d or newer, found Python %s (%s): create a "
      "virtual environment with a newer Python and install requirements.txt "
      "there." % (MIN_PYTHON + (sys.version.split()[0], sys.executable)))

# TensorFlow (behind clu's TensorBoard writer and TFDS) logs its CPU set-up
# when imported; keep its warnings and errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
