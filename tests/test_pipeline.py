"""Two-view pipeline: shapes, determinism, resume, the digits split, and a few augmentation properties."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import load_config, write_folder
from vicreg_jax import config as schema
from vicreg_jax.data import augment, pipeline, recipes
from vicreg_jax.data.sources import digits


def batches(config, start_step, count, **kw):
  ds = pipeline.pretrain_dataset(config, start_step, **kw)
  return [b for _, b in zip(range(count), ds.as_numpy_iterator())]


def test_digits_split_is_stratified_70_30():
  tr, te = digits.load('train'), digits.load('test')
  assert (tr.num_examples, te.num_examples) == (1257, 540)
  assert tr.images.shape[1:] == (8, 8, 1) and 0 <= tr.images.min() and tr.images.max() <= 1
  np.testing.assert_allclose(np.bincount(tr.labels) / 1257, np.bincount(te.labels) / 540, atol=0.01)
  up = digits.load('train', 16)
  assert up.images.shape == (1257, 16, 16, 1) and (up.labels == tr.labels).all()
  assert np.abs(up.images.reshape(-1, 8, 2, 8, 2).mean((2, 4)) - tr.images[..., 0]).mean() < 0.1  # same digits (another: 0.23)


def test_digits_views_shapes_and_values():
  config = load_config('digits')
  (b,) = batches(config, 0, 1)
  assert b['view1'].shape == (256, 16, 16, 1) and b['view1'].dtype == np.float32  # upsampled to 16×16
  assert -1 < b['view1'].min() < 0 and 1 < b['view1'].max() < 2  # [0, 1] images plus unclipped noise
  assert np.abs(b['view1'] - b['view2']).mean() > 0.01  # two different augmentations


def test_resumed_pipeline_sees_the_same_batches():
  config = load_config('digits')
  fresh = batches(config, 0, 7)
  resumed = batches(config, 5, 2)  # crosses an epoch boundary: 1257 / 256 < 5
  for a, b in zip(fresh[5:], resumed):
    np.testing.assert_array_equal(a['view1'], b['view1'])
    np.testing.assert_array_equal(a['view2'], b['view2'])
  assert not np.array_equal(fresh[0]['view1'], fresh[1]['view1'])
  config.seed = 1
  assert not np.array_equal(batches(config, 0, 1)[0]['view1'], fresh[0]['view1'])


def test_two_processes_build_the_halves_of_the_one_process_batches():
  """In-memory sources are one global stream: process p of 2 yields rows [64p, 64p + 64) of every global batch
  of one process (augmentations included), also after a resume, so the data never depends on the number of
  processes."""
  config = load_config('digits')
  config.batch_size = 128
  one = batches(config, 3, 2)
  halves = [batches(config, 3, 2, process_index=p, process_count=2) for p in range(2)]
  for step in range(2):
    for k in ('view1', 'view2', 'label'):
      assert halves[0][step][k].shape[0] == 64
      np.testing.assert_array_equal(np.concatenate([halves[0][step][k], halves[1][step][k]]), one[step][k])
  # Within an epoch no example repeats across the processes' rows (1257 examples, 9 batches of 128).
  config.augment.view1 = dict(recipes.RECIPE_DEFAULTS)  # identity views: recover the raw images
  train = digits.load('train', 16).images.reshape(1257, -1)
  seen = []
  for p in range(2):
    for b in batches(config, 0, 9, process_index=p, process_count=2):
      seen += [int(np.flatnonzero((train == r).all(1))[0]) for r in b['view1'].reshape(64, -1)]
  assert len(seen) == len(set(seen)) == 9 * 128


def test_ops_agree_eagerly_and_in_tf_function():
  image = tf.random.stateless_uniform((32, 32, 3), seed=[1, 2])
  view1, view2 = (dict(v) for v in schema.imagenet_views(24))
  seed = tf.constant([3, 4], tf.int64)
  eager = augment.augment_view(image, seed, view2)
  graph = tf.function(lambda x, s: augment.augment_view(x, s, view2))(image, seed)
  np.testing.assert_allclose(eager.numpy(), graph.numpy(), atol=1e-5)
  assert eager.shape == (24, 24, 3)


def test_solarize_and_blur_properties():
  x = tf.linspace(0.0, 1.0, 64)[:, None, None] * tf.ones((64, 64, 3))
  s = augment.solarize(x).numpy()
  assert np.allclose(s[x.numpy() < 0.5], x.numpy()[x.numpy() < 0.5])
  assert s.max() <= 0.5 + 1e-6
  noisy = tf.random.stateless_uniform((64, 64, 3), seed=[0, 1])
  blurred = augment.gaussian_blur(noisy, tf.constant([5, 6]), sigma=(1.5, 2.0))
  assert blurred.shape == noisy.shape
  assert float(tf.math.reduce_std(blurred)) < 0.5 * float(tf.math.reduce_std(noisy))
  np.testing.assert_allclose(float(tf.reduce_mean(blurred)), float(tf.reduce_mean(noisy)), atol=0.01)


def test_grayscale_rate_is_about_its_probability():
  image = tf.random.stateless_uniform((8, 8, 3), seed=[1, 1])
  recipe = dict(recipes.RECIPE_DEFAULTS, gray_p=0.2)
  fn = tf.function(lambda s: augment.augment_view(image, s, recipe))
  gray = [np.allclose(v[..., 0], v[..., 1]) and np.allclose(v[..., 1], v[..., 2])
          for v in (fn(tf.constant([7, i], tf.int64)).numpy() for i in range(1000))]
  assert 0.16 <= np.mean(gray) <= 0.24


def test_random_affine_identity_and_rotation():
  x = tf.constant(digits.load('train').images[3])
  same = augment.random_affine(x, tf.constant([0, 1]), 0.0, (1.0, 1.0), 0.0)
  np.testing.assert_allclose(same.numpy(), x.numpy(), atol=1e-6)
  # Rotations by U[-180, 180] degrees move one bright pixel around a circle about the centre.
  square = np.zeros((8, 8, 1), np.float32)
  square[1, 2] = 1.0  # row 1, column 2
  rotations = set()
  for i in range(200):
    y = augment.random_affine(tf.constant(square), tf.constant([i, 0]), 180.0).numpy()
    assert 0.0 <= y.min() and y.max() <= 1.0 + 1e-6
    assert abs(y.sum() - 1.0) < 0.6  # mass is moved, not created (bilinear, zero fill)
    rotations.add(tuple(np.unravel_index(np.argmax(y[..., 0]), (8, 8))))
  assert len(rotations) > 8  # the pixel lands in many places around the centre
  centre = np.array([3.5, 3.5])
  radii = [np.linalg.norm(np.array(r) - centre) for r in rotations]
  assert max(radii) - min(radii) < 1.5  # ... at its distance from the centre: a rotation


def eval_rows(data, split, batch_size, **kw):
  """Every real row (mask 1) of an eval_dataset pass, as numpy arrays by key."""
  ds = list(pipeline.eval_dataset(data, split, batch_size, **kw).as_numpy_iterator())
  keep = np.concatenate([b['mask'] for b in ds]) > 0
  return {k: np.concatenate([b[k] for b in ds])[keep] for k in ds[0]}, len(ds)


def test_eval_dataset_shares_are_contiguous_padded_equally_and_honour_max_examples():
  data = load_config('digits').data
  test = digits.load('test', 16)
  whole, _ = eval_rows(data, 'test', 64, crop=8)
  assert whole['index'].tolist() == list(range(540))
  np.testing.assert_array_equal(whole['image'], test.images)
  np.testing.assert_array_equal(whole['label'], test.labels)
  shares = [eval_rows(data, 'test', 63, crop=8, process_index=p, process_count=3, max_examples=100)
            for p in range(3)]
  assert [n for _, n in shares] == [2, 2, 2]  # 33, 33 and 34 examples in batches of 21: two batches each
  assert [r['index'].tolist() for r, _ in shares] == [list(range(0, 33)), list(range(33, 66)),
                                                     list(range(66, 100))]
  np.testing.assert_array_equal(shares[2][0]['image'], test.images[66:100])


def folder_config(root, size=16):
  config = load_config('imagenet')
  config.batch_size = 8
  config.data.update(source='folder', data_dir=str(root), image_size=size)
  config.augment.view1 = dict(config.augment.view1, crop_size=size)
  config.augment.view2 = dict(config.augment.view2, crop_size=size)
  return config


def test_resumed_folder_pipeline_sees_the_same_batches(tmp_path):
  write_folder(tmp_path, {'a': 6, 'b': 5}, shape=(12, 16))
  config = folder_config(tmp_path)
  fresh = batches(config, 0, 4)
  resumed = batches(config, 2, 2)  # 11 examples, batch 8: crosses an epoch boundary
  for a, b in zip(fresh[2:], resumed):
    for k in ('view1', 'view2', 'label'):
      np.testing.assert_array_equal(a[k], b[k])
  assert fresh[0]['view1'].shape == (8, 16, 16, 3)
  assert not np.array_equal(fresh[0]['view1'], fresh[1]['view1'])


@pytest.mark.slow
def test_imagenet_config_trains_two_steps_on_an_image_folder(tmp_path):
  from vicreg_jax import runs, train
  rng = np.random.default_rng(0)
  for k in range(32):  # ImageNet-like JPEGs: 500×375 (some portrait), smooth random content, 2 classes
    low = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    size = (375, 500) if k % 4 else (500, 375)
    image = tf.cast(tf.image.resize(low, size, method='bilinear'), tf.uint8)
    (tmp_path / 'images' / f'class{k % 2}').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'images' / f'class{k % 2}' / f'{k}.jpeg').write_bytes(tf.io.encode_jpeg(image).numpy())
  config = folder_config(tmp_path / 'images', size=64)
  config.model.update(arch='resnet18', width_multiplier=1 / 16, projector='64-64-64')
  config.batch_size = 16
  config.num_steps = 2
  config.log_every_steps = 1
  assert runs.train_examples(config) == 32
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 2
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == ['2']
