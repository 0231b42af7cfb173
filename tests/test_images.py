"""Odd and unreadable files in image folders (and TFDS records): decoded right or replaced (training), masked
(evaluation), counted, and the batches still full and deterministic (resume, process count)."""

from __future__ import annotations

import io
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import load_config
from vicreg_jax.data import augment, pipeline, recipes, streams
from vicreg_jax.data.sources import folder as image_folder, tfds

SIZE = 8
# Cheap views that keep a flat image flat (a crop, resized; a flip), so a view's colour names its file.
VIEW1 = dict(recipes.RECIPE_DEFAULTS, crop_size=SIZE)
VIEW2 = dict(recipes.RECIPE_DEFAULTS, crop_size=SIZE, crop_scale=(0.5, 1.0), flip_p=0.5)


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **kw)
  return out.getvalue()


def _truncated_jpeg() -> bytes:
  """A JPEG of noise cut 16 bytes into its scan: its header parses, no crop window of it decodes."""
  noise = np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)
  data = _save(Image.fromarray(noise), 'JPEG', quality=90)
  return data[:data.index(b'\xff\xda') + 16]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """16 files in two classes: 5 flat grey images (JPEG and PNG), 7 readable odd ones, 4 unreadable. Returns
  (root, {path: expected RGB in [0, 1]} of the readable files, [unreadable paths])."""
  root = tmp_path_factory.mktemp('odd_images')
  (root / 'a').mkdir()
  (root / 'b').mkdir()
  expected = {}
  for k in range(5):
    grey = 20 * (k + 1)
    image = Image.new('RGB', (16, 12), (grey, grey, grey))
    name = f'a/grey{k}.' + ('png' if k % 2 else 'jpg')
    (root / name).write_bytes(_save(image, 'PNG') if k % 2 else _save(image, 'JPEG', quality=100))
    expected[name] = (grey, grey, grey)
  cmyk = Image.new('CMYK', (16, 12), (0, 128, 255, 64))
  odd = {
      'b/cmyk.jpg': (_save(cmyk, 'JPEG', quality=100), cmyk.convert('RGB').getpixel((0, 0))),
      'b/gray.png': (_save(Image.new('L', (16, 12), 90), 'PNG'), (90, 90, 90)),
      'b/rgba.png': (_save(Image.new('RGBA', (16, 12), (200, 40, 90, 0)), 'PNG'), (200, 40, 90)),  # alpha dropped
      'b/deep.png': (tf.io.encode_png(tf.constant(np.tile(np.array([65535, 32896, 0], np.uint16), (12, 16, 1))))
                     .numpy(), (255, 128, 0)),  # 16-bit: 65535 -> 1.0
      'b/one.png': (_save(Image.new('RGB', (1, 1), (10, 200, 30)), 'PNG'), (10, 200, 30)),
      'b/big.png': (_save(Image.new('RGB', (4000, 3000), (30, 60, 150)), 'PNG', compress_level=1), (30, 60, 150)),
      'b/png_inside.jpg': (_save(Image.new('RGB', (16, 12), (120, 120, 250)), 'PNG'), (120, 120, 250)),
  }
  for name, (data, rgb) in odd.items():
    (root / name).write_bytes(data)
    expected[name] = rgb
  bad = {'a/truncated.jpg': _truncated_jpeg(), 'b/text.jpg': b'not an image\n', 'b/empty.jpg': b'',
         'b/noise.png': np.random.default_rng(1).integers(0, 256, 500, np.uint8).tobytes()}
  for name, data in bad.items():
    (root / name).write_bytes(data)
  expected = {str(root / k): np.array(v) / 255 for k, v in expected.items()}
  return root, expected, sorted(str(root / k) for k in bad)


def _config(root, batch_size=8):
  config = load_config('imagenet')
  config.batch_size = batch_size
  config.data.update(source='folder', data_dir=str(root), image_size=SIZE, prefetch=1)
  config.augment.update(view1=VIEW1, view2=VIEW2, on_device=False)
  return config


def _take(ds, count):
  return [b for _, b in zip(range(count), ds.as_numpy_iterator())]


@pytest.fixture(scope='module')
def fresh(folder):
  """The first 3 pretraining batches (positions 0-23) of the folder."""
  return _take(pipeline.pretrain_dataset(_config(folder[0])), 3)


def _names(views, expected):
  """The readable file each (flat) view shows: the one of the nearest expected colour (within 3/255)."""
  paths = list(expected)
  colours = np.stack([expected[p] for p in paths])
  names = []
  for view in views:
    assert np.ptp(view.reshape(-1, 3), axis=0).max() < 0.02  # flat: one file, no blend of two
    distance = np.abs(colours - view.reshape(-1, 3).mean(0)).max(1)
    assert distance.min() < 3 / 255, view.reshape(-1, 3).mean(0) * 255
    names.append(paths[int(distance.argmin())])
  return names


def test_odd_formats_decode_to_the_right_colours(folder):
  """Grayscale -> 3 equal channels, RGBA -> RGB, 16-bit -> 8-bit scaled, CMYK -> PIL's RGB, 1×1, 4000×3000, a PNG
  named .jpg: whole decodes (augment.decode) and the fused crop path (decode_crops) give the file's colour."""
  root, expected, bad = folder
  for path, rgb in expected.items():
    data = tf.io.read_file(path)
    whole = augment.decode(data).numpy()
    np.testing.assert_allclose(whole.reshape(-1, 3).min(0), rgb, atol=2 / 255, err_msg=path)
    np.testing.assert_allclose(whole.reshape(-1, 3).max(0), rgb, atol=2 / 255, err_msg=path)
    h, w = whole.shape[:2]
    assert (h, w) == {'big.png': (3000, 4000), 'one.png': (1, 1)}.get(path.split('/')[-1], (12, 16))
    crops = augment.decode_crops(data, lambda shape: tf.constant([[0, 0, 1, 1], [h - 1, w - 1, 1, 1]]))
    for crop in crops:
      np.testing.assert_allclose(crop.numpy()[0, 0], rgb, atol=2 / 255, err_msg=path)
  for path in bad:
    with pytest.raises(tf.errors.InvalidArgumentError):
      augment.decode_random_resized_crop(tf.io.read_file(path), tf.constant([0, 0]), SIZE)


def test_pretraining_batches_are_full_and_replace_each_unreadable_file_once_per_epoch(folder, fresh):
  """One epoch (16 positions, 2 batches of 8): the 12 readable files are each one row, the 4 unreadable ones
  each replaced by a readable file (counted, with their paths)."""
  _, expected, bad = folder
  batches = fresh[:2]
  for b in batches:
    assert b['view1'].shape == (8, SIZE, SIZE, 3) and b['view2'].shape == (8, SIZE, SIZE, 3)
  unreadable = np.concatenate([b[streams.UNREADABLE] for b in batches])
  paths = [p.decode() for b in batches for p in b[streams.UNREADABLE_PATH]]
  names = _names(np.concatenate([b['view1'] for b in batches]), expected)
  assert _names(np.concatenate([b['view2'] for b in batches]), expected) == names  # both views of one file
  assert (unreadable > 0).sum() == len(bad)
  assert sorted(p for p, u in zip(paths, unreadable) if u) == bad
  assert not any(p for p, u in zip(paths, unreadable) if not u)
  assert sorted(n for n, u in zip(names, unreadable) if not u) == sorted(expected)  # each readable file once
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.tolist() == [int('/b/' in n) for n in names]  # a replacement brings its own label



def test_global_batches_strip_the_counts_and_log_them():
  """global_batches drops the count fields (device arrays of the rest) and logs the running count with the first
  path; tuple batches pass as they are."""
  rows = {'x': np.arange(12.0).reshape(3, 4),
          streams.UNREADABLE: np.array([[0, 0, 0, 0], [0, 2, 0, 1], [1, 0, 0, 0]]),
          streams.UNREADABLE_PATH: np.array([[b''] * 4, [b'', b'/d/bad.jpg', b'', b'/d/worse.jpg'],
                                              [b'/d/x.png'] + [b''] * 3])}
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with mock.patch.object(pipeline.logging, 'warning') as warning:
    out = list(pipeline.global_batches(tf.data.Dataset.from_tensor_slices(rows), sharding))
  assert [set(b) for b in out] == [{'x'}] * 3
  np.testing.assert_array_equal(np.asarray(out[2]['x']), rows['x'][2])
  assert [c[0][1:4:2] for c in warning.call_args_list] == [(3, '/d/bad.jpg'), (4, '/d/bad.jpg')]  # at once, at the end
  pairs = list(pipeline.global_batches(tf.data.Dataset.from_tensor_slices((rows['x'], rows['x'])), sharding))
  assert len(pairs) == 3 and isinstance(pairs[0], tuple)


def test_unreadable_replacements_are_the_same_on_resume_and_on_two_processes(folder, fresh):
  """Steps 1-2 (across the epoch boundary) of a run resumed at step 1 on process 0 of 2 are the first halves of
  those of the uninterrupted one-process run, replacements included; labelled_dataset resumed at step 1 shows
  the same files (hence labels and replacements) at the same positions, in its own view."""
  config = _config(folder[0])
  later = fresh[1:]
  assert sum(b[streams.UNREADABLE][:4].sum() for b in later) > 0  # the compared rows hold replacements
  half = _take(pipeline.pretrain_dataset(config, 1, process_index=0, process_count=2), 2)
  for step in range(2):
    for k in later[0]:
      np.testing.assert_array_equal(half[step][k], later[step][k][:4])
  labelled = _take(pipeline.labelled_dataset(config.data, VIEW1, 8, seed=config.seed, start_step=1), 2)
  for a, b in zip(later, labelled):
    assert b['image'].shape == (8, SIZE, SIZE, 3)
    assert _names(b['image'], folder[1]) == _names(a['view1'], folder[1])
    for k in ('label', streams.UNREADABLE, streams.UNREADABLE_PATH):
      np.testing.assert_array_equal(b[k], a[k])


def test_evaluation_masks_out_unreadable_files(folder):
  """eval_dataset over the folder: the readable files with their colours and indices (mask 1), the unreadable
  ones masked out (mask 0, counted, their paths) rather than replaced; on two processes too."""
  root, expected, bad = folder
  data = ml_collections.ConfigDict(dict(source='folder', name='imagenet2012', train_split='train',
                                        data_dir=str(root), val_fraction=0.0, channels=3, threadpool_size=0))
  paths = image_folder.folder_split(str(root), 'train').paths.tolist()
  rows = []
  for p in range(2):  # shares of 8 files, in batches of 6: 2 batches each, the second padded
    ev = list(pipeline.eval_dataset(data, 'train', 12, crop=4, resize=4, process_index=p, process_count=2)
              .as_numpy_iterator())
    assert len(ev) == 2 and all(b['image'].shape == (6, 4, 4, 3) for b in ev)
    rows += [{k: b[k][i] for k in b} for b in ev for i in range(6)]
  real = [r for r in rows if r['index'] >= 0]
  assert [r['index'] for r in real] == list(range(16))  # every file keeps its row; the rest is padding
  for r in real:
    path = paths[r['index']]
    if path in bad:
      assert r['mask'] == 0 and r[streams.UNREADABLE] == 1 and r[streams.UNREADABLE_PATH].decode() == path
    else:
      assert r['mask'] == 1 and r[streams.UNREADABLE] == 0
      np.testing.assert_allclose(r['image'].reshape(-1, 3).mean(0), expected[path], atol=2 / 255)
  assert sum(r[streams.UNREADABLE] for r in rows) == len(bad)
  assert sum(r['mask'] for r in rows) == len(expected)


def test_a_folder_of_no_images_fails_with_a_message(tmp_path):
  (tmp_path / 'a').mkdir()
  for k in range(3):
    (tmp_path / 'a' / f'{k}.jpg').write_text('not an image')
  with pytest.raises(tf.errors.InvalidArgumentError, match='unreadable'):
    next(pipeline.pretrain_dataset(_config(tmp_path, batch_size=2)).as_numpy_iterator())


def test_tfds_records_that_fail_to_decode_are_dropped_and_counted(folder):
  """A TFDS stream (here of encoded images, 4 of 16 unreadable) drops the records it cannot decode: the batches
  stay full, and each row counts the records dropped just before it."""
  root, expected, bad = folder
  files = image_folder.folder_split(str(root), 'train')
  records = tf.data.Dataset.from_tensor_slices((files.paths, files.labels)).map(
      lambda p, y: {'image': tf.io.read_file(p), 'label': y})
  config = _config(root)
  config.data.update(source='tfds', shuffle_buffer=1)  # no shuffle: the records in file order
  with mock.patch.object(tfds, 'tfds_split', lambda *a, **k: records), \
       mock.patch.object(tfds, 'num_examples', lambda *a, **k: 16):
    batches = _take(pipeline.pretrain_dataset(config), 3)  # 24 rows from 32 records: 2 epochs, 8 dropped
  assert all(b['view1'].shape == (8, SIZE, SIZE, 3) for b in batches)
  names = _names(np.concatenate([b['view1'] for b in batches]), expected)
  readable = [p for p in files.paths.tolist() if p not in bad]
  assert names == (readable * 2)[:24]
  dropped, gap = [], 0  # the unreadable records just before each readable one
  for p in files.paths.tolist() * 2:
    if p in bad:
      gap += 1
    else:
      dropped, gap = dropped + [gap], 0
  assert sum(dropped[:24]) >= len(bad)
  assert np.concatenate([b[streams.UNREADABLE] for b in batches]).tolist() == dropped[:24]


def test_host_colour_ops_on_a_tpu_warn_once_at_start(folder):
  """augment.on_device off with a TPU backend: one warning when the dataset is built (none with it on, none on
  other backends)."""
  for backend, on_device, warned in [('tpu', False, 1), ('tpu', True, 0), ('cpu', False, 0)]:
    config = _config(folder[0])
    config.augment.on_device = on_device
    with mock.patch.object(pipeline.jax, 'default_backend', return_value=backend), \
         mock.patch.object(pipeline.logging, 'warning') as warning:
      pipeline.pretrain_dataset(config)
    calls = [c for c in warning.call_args_list if 'augment.on_device' in str(c.args[0])]
    assert len(calls) == warned, (backend, on_device, warning.call_args_list)
