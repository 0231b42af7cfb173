"""The arrays source (an .npz of images and labels, ``data.path``): uint8 scaled, float32 used as is, digits
through the same machinery bit for bit, the ``{split}`` rule, one-line errors, and both jobs on the command line."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from conftest import job_env, load_config, run_module
from vicreg_jax import errors
from vicreg_jax.data import pipeline, recipes, sources
from vicreg_jax.data.sources import digits


def arrays_data(path, **kw):
  return ml_collections.ConfigDict(dict(dict(
      source='arrays', name='', path=str(path), train_split='train', data_dir=None, val_fraction=0.0, channels=1,
      image_size=0, shuffle_buffer=8, threadpool_size=0, prefetch=1, cache=False), **kw))


def save(path, images, labels):
  np.savez(path, images=images, labels=labels)
  return path


def test_uint8_images_are_scaled_as_tf_converts_them(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)  # [N, H, W]: one channel added
  data = arrays_data(save(tmp_path / 'x.npz', images, np.arange(6) % 3))
  x, y = sources.get(data).in_memory(data, 'train')
  assert x.dtype == np.float32 and x.shape == (6, 5, 4, 1) and y.dtype == np.int32
  expected = tf.image.convert_image_dtype(images[..., None], tf.float32).numpy()
  assert x.tobytes() == expected.tobytes()
  assert sources.get(data).num_classes(data) == 3 and sources.get(data).num_examples(data, 'train') == 6


def test_float32_images_are_used_as_they_are(tmp_path):
  images = np.random.default_rng(1).random((4, 3, 3, 3), dtype=np.float32)
  data = arrays_data(save(tmp_path / 'x.npz', images, [0, 4, 1, 1]), channels=3)
  x, y = sources.get(data).in_memory(data, 'train')
  assert x.tobytes() == images.tobytes() and y.tolist() == [0, 4, 1, 1]
  assert sources.get(data).num_classes(data) == 5  # the largest training label + 1


def test_split_placeholder_names_one_file_per_split(tmp_path):
  save(tmp_path / 'd_train.npz', np.zeros((5, 2, 2), np.uint8), [0, 1, 2, 0, 1])
  save(tmp_path / 'd_test.npz', np.full((3, 2, 2), 255, np.uint8), [7, 0, 1])  # test labels: no num_classes
  data = arrays_data(tmp_path / 'd_{split}.npz')
  source = sources.get(data)
  assert source.num_examples(data, 'train') == 5 and source.num_examples(data, 'test') == 3
  assert source.num_classes(data) == 3
  assert source.in_memory(data, 'test')[0].min() == 1.0
  with pytest.raises(errors.DataNotFoundError, match='d_validation.npz does not exist'):
    source.num_examples(data, 'validation')
  # Without {split}: the training split only, anything else names the fix.
  data = arrays_data(tmp_path / 'd_train.npz')
  assert sources.get(data).num_examples(data, 'train') == 5
  with pytest.raises(errors.ConfigError, match=r'holds only the training split.*\{split\}') as e:
    sources.get(data).num_examples(data, 'test')
  assert '\n' not in str(e.value)


BAD = {
    'unset': (None, errors.ConfigError, 'data.path is not set'),
    'missing_file': ('nothing', errors.DataNotFoundError, 'does not exist'),
    'not_npz': ('text', errors.DataNotFoundError, 'not a readable .npz'),
    'no_labels': (dict(images=np.zeros((2, 3, 3), np.uint8)), errors.DataNotFoundError, "no array 'labels'"),
    'no_images': (dict(labels=[0, 1]), errors.DataNotFoundError, "no array 'images'"),
    'flat_images': (dict(images=np.zeros((2, 9), np.uint8), labels=[0, 1]), errors.DataNotFoundError,
                    r'not \[N, H, W\]'),
    'int64_images': (dict(images=np.zeros((2, 3, 3), np.int64), labels=[0, 1]), errors.DataNotFoundError,
                     'int64, not uint8 or float32'),
    'float64_images': (dict(images=np.zeros((2, 3, 3)), labels=[0, 1]), errors.DataNotFoundError, 'float64'),
    'float_out_of_range': (dict(images=np.full((2, 3, 3), 255, np.float32), labels=[0, 1]),
                           errors.DataNotFoundError, r'in \[0, 1\]'),
    'float_nan': (dict(images=np.full((2, 3, 3), np.nan, np.float32), labels=[0, 1]), errors.DataNotFoundError,
                  r'in \[0, 1\]'),
    'fewer_labels': (dict(images=np.zeros((3, 3, 3), np.uint8), labels=[0, 1]), errors.DataNotFoundError,
                     '2 labels for 3 images'),
    'float_labels': (dict(images=np.zeros((2, 3, 3), np.uint8), labels=[0.0, 1.0]), errors.DataNotFoundError,
                     'labels must be integers'),
    'negative_labels': (dict(images=np.zeros((2, 3, 3), np.uint8), labels=[0, -1]), errors.DataNotFoundError,
                        'labels must be >= 0'),
    'channels': (dict(images=np.zeros((2, 3, 3, 3), np.uint8), labels=[0, 1]), errors.ConfigError,
                 '--config.data.channels=3'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_a_bad_file_is_one_line(tmp_path, case):
  content, error, message = BAD[case]
  path = tmp_path / 'x.npz'
  if isinstance(content, dict):
    np.savez(path, **content)
  elif content == 'text':
    path.write_text('not an npz\n')
  data = arrays_data('' if content is None else path)
  with pytest.raises(error, match=message) as e:
    sources.get(data).num_examples(data, 'train')
  assert '\n' not in str(e.value) and isinstance(e.value, errors.UserError)


def test_digits_through_the_arrays_source_are_bit_identical(tmp_path):
  """digits is the arrays machinery on the digits arrays: the same arrays in an .npz give the same batches."""
  for split in ('train', 'test'):
    split_arrays = digits.load(split, 16)
    save(tmp_path / f'digits_{split}.npz', split_arrays.images, split_arrays.labels)
  config = load_config('digits')
  from_file = load_config('digits')
  from_file.data.update(source='arrays', path=str(tmp_path / 'digits_{split}.npz'))
  for a, b in zip(pipeline.pretrain_dataset(config, 3, 1, 2).take(2).as_numpy_iterator(),
                  pipeline.pretrain_dataset(from_file, 3, 1, 2).take(2).as_numpy_iterator()):
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
  assert sources.get(from_file.data).num_classes(from_file.data) == 10
  lin, lin_file = load_config('digits_linear'), load_config('digits_linear')
  lin.data.image_size = 16
  lin_file.data.update(source='arrays', path=str(tmp_path / 'digits_{split}.npz'))
  pairs = [(pipeline.labelled_dataset(lin.data, {'translate': 2}, 64, 0).take(2),
            pipeline.labelled_dataset(lin_file.data, {'translate': 2}, 64, 0).take(2)),
           (pipeline.eval_dataset(lin.data, 'test', 64, crop=16, mean=(0.5,), std=(0.25,)),
            pipeline.eval_dataset(lin_file.data, 'test', 64, crop=16, mean=(0.5,), std=(0.25,)))]
  for ds, ds_file in pairs:
    for a, b in zip(ds.as_numpy_iterator(), ds_file.as_numpy_iterator(), strict=True):
      assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_round_trip_through_an_npz(tmp_path):
  """Images written to an .npz come back through the pipelines: identity views show them with their labels,
  evaluation shows every one once, in order, with its index."""
  n = 10
  images = (np.arange(n, dtype=np.uint8)[:, None, None] * 20 + np.zeros((n, 4, 4), np.uint8))
  labels = np.arange(n) % 4
  data = arrays_data(save(tmp_path / 'x_{split}.npz'.replace('{split}', 'train'), images, labels))
  ds = pipeline.labelled_dataset(data, dict(recipes.RECIPE_DEFAULTS), 5, seed=0)
  seen = []
  for b in ds.take(4).as_numpy_iterator():  # two epochs of 10
    ids = np.rint(b['image'][:, 0, 0, 0] * 255 / 20).astype(int)
    assert (labels[ids] == b['label']).all() and b['image'].shape == (5, 4, 4, 1)
    seen += ids.tolist()
  assert sorted(seen[:10]) == list(range(n)) and sorted(seen[10:]) == list(range(n))
  batches = list(pipeline.eval_dataset(data, 'train', 4, crop=4).as_numpy_iterator())
  mask = np.concatenate([b['mask'] for b in batches]) > 0
  assert len(batches) == 3 and mask.sum() == n
  assert np.concatenate([b['index'] for b in batches])[mask].tolist() == list(range(n))
  shown = np.concatenate([b['image'] for b in batches])[mask]
  assert shown.tobytes() == tf.image.convert_image_dtype(images[..., None], tf.float32).numpy().tobytes()


@pytest.mark.slow
def test_both_jobs_on_an_npz_from_the_command_line(tmp_path):
  """Pretraining and the linear job on digits written as 16×16 uint8 .npz files (train and test)."""
  for split in ('train', 'test'):
    d = digits.load(split, 16)
    save(tmp_path / f'x_{split}.npz', np.round(d.images[..., 0] * 255).astype(np.uint8), d.labels)
  path, pre, lin = str(tmp_path / 'x_{split}.npz'), tmp_path / 'pre', tmp_path / 'lin'
  source = ['--config.data.source=arrays', f'--config.data.path={path}']
  env = job_env(2)
  run = run_module(['--config=configs/digits.py', *source, '--config.num_steps=4',
                    '--config.final_probe.enabled=False', f'--workdir={pre}'], env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  run = run_module(['--config=configs/digits_linear.py', *source, f'--config.pretrain_workdir={pre}',
                    '--config.checkpoints=final', '--config.epochs=2', f'--workdir={lin}'], env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((lin / 'results.json').read_text())
  assert list(results) == ['4'] and 0 <= results['4']['top1'] <= 1


def test_a_channel_count_that_does_not_match_the_arrays_is_one_line():
  """digits (1 channel) with --config.data.channels=3: refused before any work, naming the fix (was a Flax shape
  error from the step)."""
  data = ml_collections.ConfigDict(dict(source='digits', name='digits', train_split='train', data_dir=None,
                                        val_fraction=0.0, channels=3, image_size=16, path=''))
  with pytest.raises(errors.ConfigError, match=r'^the digits images have 1 channels but data.channels is 3: pass '
                                               r'--config.data.channels=1$'):
    sources.get(data).num_examples(data, 'train')
