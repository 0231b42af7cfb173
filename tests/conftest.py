"""Test setup: 8 simulated CPU devices. Runs before any test module (and hence jax) is imported."""

import os

# The simulated devices are threads; on a busy 2-core machine (tests that run two jobs at once) a collective can
# wait on a starved thread far longer than XLA's default before it aborts the process, so allow 10 minutes.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
                           ' --xla_cpu_collective_timeout_seconds=600').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Keep TensorFlow (tf.data in the input pipeline) off any GPU without paying for its import here; JAX is on
# the CPU anyway.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import contextlib  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def mock_tfds_dataset(name: str, data_dir, splits: dict, num_examples: int):
  """A TFDS dataset that looks prepared under ``data_dir`` (metadata written from TFDS's own code, with the
  given split sizes) and yields ``num_examples`` random examples through ``tfds.testing.mock_data``."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
      for s, n in splits.items()]))
  pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir)):
    yield


@pytest.fixture
def mock_tfds():
  return mock_tfds_dataset
