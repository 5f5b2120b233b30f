"""Test setup: 8 fake CPU devices, so sharded code paths run everywhere."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# PyTorch (a test-only reference) imports triton when it is installed, and
# triton's native library segfaults when loaded after TensorFlow (which clu's
# metric writers import). CPU tests never use triton: hide it, so that torch
# reports it absent whatever order the tests run in.
sys.modules.setdefault("triton", None)
