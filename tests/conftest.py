"""Test setup: 8 fake CPU devices, so sharded code paths run everywhere,
and one compilation cache for the session."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# PyTorch (a test-only reference) imports triton when it is installed, and
# triton's native library segfaults when loaded after TensorFlow (which clu's
# metric writers import). CPU tests never use triton: hide it, so that torch
# reports it absent whatever order the tests run in.
sys.modules.setdefault("triton", None)


def pytest_configure(config):
  """One persistent XLA compilation cache for the session, shared by the
  xdist workers and the tools the tests start (they inherit the
  environment): the tests compile the same tiny programs many times. It
  is created by the controlling process and removed at its end."""
  if (hasattr(config, "workerinput")
      or "JAX_COMPILATION_CACHE_DIR" in os.environ):
    return
  cache_dir = tempfile.mkdtemp(prefix="mf_jax_tests_xla_cache_")
  config.mf_jax_cache_dir = cache_dir
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
  cache_dir = getattr(config, "mf_jax_cache_dir", None)
  if cache_dir:
    shutil.rmtree(cache_dir, ignore_errors=True)
