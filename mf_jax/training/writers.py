"""Metric writers: clu's default (TensorBoard + log) plus a JSONL file.

Only process 0 writes files; other hosts just log.
"""

import json
import os

import jax
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per scalar write to WORKDIR/metrics.jsonl."""

  def __init__(self, path: str):
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step, scalars):
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str) -> interface.MetricWriter:
  """TensorBoard events and logs; also WORKDIR/metrics.jsonl for local (or
  NFS) workdirs. Cloud object stores cannot append, so a gs:// workdir
  keeps its scalars in the TensorBoard events only."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  writers = [metric_writers.create_default_writer(workdir, asynchronous=False)]
  if "://" not in workdir:
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  return metric_writers.MultiWriter(writers)
