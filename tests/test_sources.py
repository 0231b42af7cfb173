"""Image-folder source: labels from class names, a fixed disjoint train/validation split, per-process shards,
one-line errors; encoded TFDS images for the fused crop."""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from conftest import load_config, write_folder
from vicreg_jax import errors
from vicreg_jax.data import augment, pipeline, recipes, sources
from vicreg_jax.data.sources import folder, tfds




def image_id(image):
  return int(round(float(np.mean(image)) * 255 / 8))


def folder_data(root, **kw):
  return ml_collections.ConfigDict(dict(dict(source='folder', name='imagenet2012', train_split='train',
                                             data_dir=str(root), val_fraction=0.0, channels=3, shuffle_buffer=8,
                                             threadpool_size=0, prefetch=1), **kw))


def test_labels_come_from_sorted_class_names(tmp_path):
  write_folder(tmp_path, {'zebra': 2, 'ant': 3, 'moth': 1})
  files = folder.folder_split(str(tmp_path), 'train')
  assert files.classes == ['ant', 'moth', 'zebra']
  for path, label in zip(files.paths, files.labels):
    assert path.split('/')[-2] == files.classes[label]
  assert sources.get(folder_data(tmp_path)).num_classes(folder_data(tmp_path)) == 3
  assert sources.get(folder_data(tmp_path)).num_examples(folder_data(tmp_path), 'train') == 6


def test_validation_fraction_split_is_disjoint_covering_and_fixed(tmp_path):
  write_folder(tmp_path, {'a': 10, 'b': 20})
  train = folder.folder_split(str(tmp_path), 'train', 0.2)
  val = folder.folder_split(str(tmp_path), 'validation', 0.2)
  assert not set(train.paths) & set(val.paths)
  assert len(set(train.paths) | set(val.paths)) == 30
  assert np.bincount(val.labels).tolist() == [2, 4]  # 20% of every class
  again = folder.folder_split(str(tmp_path), 'validation', 0.2)
  assert val.paths.tolist() == again.paths.tolist()
  data = folder_data(tmp_path, val_fraction=0.2)
  assert sources.get(data).num_examples(data, 'train') == 24 and sources.get(data).num_examples(data, 'validation') == 6
  with pytest.raises(ValueError, match='val_fraction'):
    folder.folder_split(str(tmp_path), 'validation', 0.0)


def test_train_and_val_subfolders_are_the_splits(tmp_path):
  write_folder(tmp_path / 'train', {'a': 3, 'b': 2})
  write_folder(tmp_path / 'val', {'b': 2})  # a class may be missing from validation
  assert folder.folder_split(str(tmp_path), 'train').num_examples == 5
  val = folder.folder_split(str(tmp_path), 'validation')
  assert val.classes == ['a', 'b'] and val.labels.tolist() == [1, 1]
  # num_examples (the trainer's call) counts a folder given as data_dir when TFDS has no such dataset there.
  assert tfds.num_examples('imagenet2012', 'train', str(tmp_path)) == 5


def test_val_fraction_holds_out_part_of_a_train_only_folder(tmp_path):
  write_folder(tmp_path / 'train', {'a': 10, 'b': 10})
  with pytest.raises(errors.DataNotFoundError, match='val_fraction'):
    folder.folder_split(str(tmp_path), 'validation')
  assert folder.folder_split(str(tmp_path), 'train').num_examples == 20  # no fraction: all of train/
  train, val = (folder.folder_split(str(tmp_path), s, val_fraction=0.2) for s in ('train', 'validation'))
  assert (train.num_examples, val.num_examples) == (16, 4)
  assert not set(train.paths) & set(val.paths) and sorted(val.labels.tolist()) == [0, 0, 1, 1]
  write_folder(tmp_path / 'val', {'b': 2})  # a val/ folder wins over the fraction
  assert folder.folder_split(str(tmp_path), 'validation', val_fraction=0.2).num_examples == 2
  assert folder.folder_split(str(tmp_path), 'train', val_fraction=0.2).num_examples == 20


@pytest.mark.parametrize('make', ['missing', 'empty', 'unset'])
def test_missing_or_empty_folder_is_one_line(tmp_path, make):
  root = tmp_path / 'data'
  if make == 'empty':
    (root / 'cls').mkdir(parents=True)
  with pytest.raises(errors.DataNotFoundError) as e:
    folder.folder_split(None if make == 'unset' else str(root), 'train')
  message = str(e.value)
  assert '\n' not in message and 'data_dir' in message and 'CLASS/*.jpg' in message


def test_two_processes_read_disjoint_shares_that_cover_the_split(tmp_path):
  write_folder(tmp_path, {'a': 7, 'b': 5})
  identity = dict(recipes.RECIPE_DEFAULTS)
  seen = []
  for p in range(2):
    # The first global batch of 12 is one epoch; process p holds its rows 6p .. 6p + 5.
    ds = pipeline.labelled_dataset(folder_data(tmp_path), identity, 12, seed=0, process_index=p, process_count=2)
    b = next(ds.as_numpy_iterator())
    ids = [image_id(x) for x in b['image']]
    assert len(set(ids)) == 6
    seen.append(set(ids))
    # Labels travel with their images: ids 0-6 are class a, 7-11 class b.
    assert [int(i >= 7) for i in ids] == b['label'].tolist()
    ev = list(pipeline.eval_dataset(folder_data(tmp_path), 'train', 8, crop=4, resize=4, process_index=p,
                                    process_count=2).as_numpy_iterator())
    mask = np.concatenate([e['mask'] for e in ev]) > 0
    # The evaluation share is the contiguous half of the split in file order, index = position in the split.
    assert [image_id(x) for x in np.concatenate([e['image'] for e in ev])[mask]] == list(range(6 * p, 6 * p + 6))
    assert np.concatenate([e['index'] for e in ev])[mask].tolist() == list(range(6 * p, 6 * p + 6))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


def test_eval_dataset_of_a_folder_validation_split(tmp_path):
  write_folder(tmp_path, {'a': 4, 'b': 4}, shape=(10, 14))
  config = ml_collections.ConfigDict(dict(
      data=folder_data(tmp_path, val_fraction=0.25, image_size=8),
      augment=dict(view1=dict(recipes.RECIPE_DEFAULTS))))
  ds = pipeline.eval_dataset(config.data, 'validation', 4, crop=8)
  (b,) = list(ds.as_numpy_iterator())
  assert b['image'].shape == (4, 8, 8, 3) and b['mask'].tolist() == [1, 1, 0, 0]
  assert sorted(b['label'][:2].tolist()) == [0, 1]


def test_tfds_images_stay_encoded_when_every_view_crops(tmp_path, mock_tfds):
  data = folder_data(tmp_path, source='tfds', data_dir=str(tmp_path / 'tfds'))
  assert pipeline._encoded(sources.get(data), [dict(crop_size=32), dict(crop_size=32)])
  assert not pipeline._encoded(sources.get(data), [dict(crop_size=32), dict(crop_size=0)])
  with mock_tfds('imagenet2012', tmp_path / 'tfds', {'train': 100}, 4):
    ex = next(iter(tfds.tfds_split('imagenet2012', 'train', data_dir=data.data_dir, decode=False)))
    assert ex['image'].dtype == tf.string and ex['image'].shape == ()
    assert augment.augment_view(ex['image'], tf.constant([0, 0]), dict(crop_size=16)).shape == (16, 16, 3)


def test_cached_tfds_stream_yields_the_same_batches(tmp_path, mock_tfds):
  """data.cache keeps the examples after one pass; the batches (here beyond the first epoch) are unchanged."""
  config = load_config('cifar10')
  config.batch_size = 8
  config.data.update(data_dir=str(tmp_path / 'tfds'), shuffle_buffer=4)
  with mock_tfds('cifar10', tmp_path / 'tfds', {'train': 12, 'test': 12}, 12):
    plain = [b for _, b in zip(range(4), pipeline.pretrain_dataset(config).as_numpy_iterator())]
    config.data.cache = True
    cached = [b for _, b in zip(range(4), pipeline.pretrain_dataset(config).as_numpy_iterator())]
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a['view1'], b['view1'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_tfds_stream_resumes_exactly(tmp_path, mock_tfds):
  """A TFDS pipeline restarted at step k yields the batches of an uninterrupted one from step k, across epoch
  boundaries (24 examples, batches of 16: steps 3 and 4 start inside epochs 2 and 3). One process: the mock
  yields whole splits whatever the slice, so per-process shares cannot be mocked."""
  config = load_config('cifar10')
  config.batch_size = 16
  config.data.update(data_dir=str(tmp_path / 'tfds'), shuffle_buffer=6)
  with mock_tfds('cifar10', tmp_path / 'tfds', {'train': 24, 'test': 12}, 24):
    fresh = [b for _, b in zip(range(6), pipeline.pretrain_dataset(config, 0).as_numpy_iterator())]
    for k in (3, 4):
      resumed = [b for _, b in zip(range(6 - k), pipeline.pretrain_dataset(config, k).as_numpy_iterator())]
      for a, b in zip(fresh[k:], resumed):
        for key in ('view1', 'view2', 'label'):
          np.testing.assert_array_equal(a[key], b[key])
  # Each epoch is reshuffled: the first two epochs (24 examples each) come in different orders.
  labels = np.concatenate([b['label'] for b in fresh])
  assert sorted(labels[:24]) == sorted(labels[24:48]) and not np.array_equal(labels[:24], labels[24:48])


def test_tfds_evaluation_shares_are_contiguous_and_keep_every_example(tmp_path, mock_tfds):
  """Three processes' evaluation shares of a TFDS split of 50 (not divisible by 3): contiguous index ranges that
  cover the split, nothing dropped; max_examples and sliced splits too."""
  data = ml_collections.ConfigDict(dict(source='tfds', name='imagenet2012', data_dir=str(tmp_path / 'tfds'),
                                        channels=3, threadpool_size=0))
  with mock_tfds('imagenet2012', tmp_path / 'tfds', {'train': 100, 'validation': 50}, 50):
    for split, max_examples, total in (('validation', 0, 50), ('validation', 20, 20), ('validation[:21]', 0, 21),
                                       ('validation', 80, 50)):  # a limit above the split's size: all of it
      indices = []
      for p in range(3):
        ds = pipeline.eval_dataset(data, split, 12, crop=8, process_index=p, process_count=3,
                                   max_examples=max_examples)
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == math.ceil(math.ceil(total / 3) / 4)  # the largest share, batches of 4, everywhere
        index = np.concatenate([b['index'] for b in batches])[np.concatenate([b['mask'] for b in batches]) > 0]
        assert index.tolist() == sorted(index.tolist())
        indices.append(index.tolist())
      assert sum(indices, []) == list(range(total)), (split, indices)
    with pytest.raises(ValueError, match='sliced or combined split'):
      pipeline.eval_dataset(data, 'validation[:21]', 12, crop=8, max_examples=5)
    with pytest.raises(ValueError, match='use one split'):  # even_splits would split each part separately
      pipeline.eval_dataset(data, 'train[:10]+validation', 12, crop=8, process_index=0, process_count=3)
    ds = pipeline.eval_dataset(data, 'train[:10]+validation', 12, crop=8)  # one process: all 60 of it
    assert len(list(ds.as_numpy_iterator())) == 5  # (mock_data reads 50 examples from any split)
