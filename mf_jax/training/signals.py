"""Stop signals: save at one step on every host, then exit."""

import os
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StopSignals:
  """Turns SIGTERM, SIGINT and SIGHUP into "save at one step, then exit".

  SIGTERM is preemption; SIGINT is Ctrl-C (a second one exits at once);
  SIGHUP is a dropped ssh session or terminal, which must not kill a run
  without its checkpoint.

  One process: each signal sets a flag the loop reads after every step.
  Several processes: `jax.distributed.initialize` starts JAX's preemption
  sync manager, which catches SIGTERM itself, passes the notice through the
  coordination service to every host and fixes one step for all of them;
  asking `reached_preemption_sync_point(step)` every step is a local check
  until a notice arrives. SIGINT and SIGHUP are forwarded to it as SIGTERM.
  If that service is off (jax_enable_preemption_service=False), each host's
  flag is gathered from all hosts every step, a small collective per step.
  Used as a context manager: the previous handlers come back afterwards.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

  def __init__(self):
    self.received = None
    self._multi_host = jax.process_count() > 1
    self._sync_manager = self._multi_host and (
        jax.config.jax_enable_preemption_service)
    self._previous = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      if signum == signal.SIGTERM and self._sync_manager:
        continue  # JAX's handler
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: out now, no save
    self.received = signum
    logging.warning("%s received: saving a checkpoint, then exiting (Ctrl-C "
                    "again exits at once).", signal.Signals(signum).name)
    if self._sync_manager:
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_at(self, step: int) -> bool:
    """Whether to save at `step` and stop; call it once for every step."""
    if self._sync_manager:
      return multihost_utils.reached_preemption_sync_point(step)
    if self._multi_host:
      flags = multihost_utils.process_allgather(
          np.int32(self.received is not None))
      return bool(np.any(flags))
    return self.received is not None
