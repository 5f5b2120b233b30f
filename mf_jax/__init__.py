"""mf_jax: one-step generative models (MeanFlow and its family) in JAX."""

import os

# TensorFlow (behind clu's TensorBoard writer and TFDS) logs its CPU set-up
# when imported; keep its warnings and errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
