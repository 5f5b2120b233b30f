"""The grain pipelines: shapes, host sharding, exact resume, clear errors."""

import numpy as np
import pytest

from mf_jax import config_lib
from mf_jax.data import pipeline


def _config(name, batch_size=16):
  c = config_lib.base_config()
  c.data.name = name
  c.training.batch_size = batch_size
  return c


@pytest.mark.parametrize("name,shape", [("checkerboard", (16, 2)),
                                        ("digits", (16, 8, 8, 1))])
def test_batches_and_exact_resume(name, shape):
  it = pipeline.make_train_iterator(_config(name))
  first = next(it)
  assert first["x"].shape == shape and first["x"].dtype == np.float32
  assert first["y"].shape == (16,) and first["y"].dtype == np.int32
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.make_train_iterator(_config(name))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["y"], want["y"])


def test_digits_epochs_are_reshuffled():
  """Each epoch visits every image once, in a new order."""
  it = pipeline.make_train_iterator(_config("digits", batch_size=1797))
  epoch1, epoch2 = next(it)["x"], next(it)["x"]
  flat1, flat2 = epoch1.reshape(1797, -1), epoch2.reshape(1797, -1)
  assert not np.array_equal(flat1, flat2)
  np.testing.assert_array_equal(np.unique(flat1, axis=0),
                                np.unique(flat2, axis=0))


def test_unknown_and_unprepared_datasets_fail_with_the_fix(tmp_path):
  with pytest.raises(ValueError, match="Unknown data.name 'chekerboard'"):
    pipeline.dataset_kind("chekerboard")
  c = _config("cifar10")
  c.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    pipeline.make_train_iterator(c)
