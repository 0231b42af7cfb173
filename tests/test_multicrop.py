"""Multi-crop (SwAV's 2 large + 6 small crops): the loss with 8 crops against a float64 NumPy transcription of the
official training loop (value and gradient) and on 8 devices against 1; the crops through the real pipeline
(configs/imagenet_swav.py on a folder of JPEGs: 2×224 + 6×96); the backbone once per resolution group; the whole
step on 8 devices against 1, with micro-batches and remat; the refusals; and (slow) a short multi-crop run on a
folder of images, linear-evaluated. The two-process comparison is in tests/test_multiprocess.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from conftest import (checkpoint_arrays, load_config, max_abs_difference, numeric_grad, ref_sinkhorn, tiny_digits,
                      train_steps)
from vicreg_jax import config as schema
from vicreg_jax import errors, losses, methods, train
from vicreg_jax import step as step_lib
from vicreg_jax.data import pipeline
from vicreg_jax.evaluate import linear

CROPS = 8  # 2 large + 6 small, as the official 75.3% recipe


# --- the loss against the official training loop ---------------------------------------------------------------

def ref_swav_multicrop(scores, t=0.1, queue=None, codes=None, crops_for_assign=(0, 1)):
  """Official main_swav.py:L289-L315 with ``output`` = the crops' scores in crop order, bs rows each: for each
  crop_id of crops_for_assign (i its position) q from Sinkhorn on that crop's scores (queue[i]'s scores in front,
  dropped after); subloss = Σ over every other crop v of −mean Σ q log softmax(x_v / T), / (crops − 1); summed,
  / len(crops_for_assign). ``codes`` fixes q (the stop-gradient, for finite differences)."""
  scores = [np.asarray(s, np.float64) for s in scores]
  bs, nmb = len(scores[0]), len(scores)
  if codes is None:
    codes = []
    for i, crop_id in enumerate(crops_for_assign):
      out = scores[crop_id] if queue is None else np.concatenate([queue[i], scores[crop_id]])
      codes.append(ref_sinkhorn(out)[-bs:])
  loss = 0.0
  for i, crop_id in enumerate(crops_for_assign):
    subloss = 0.0
    for v in np.delete(np.arange(nmb), crop_id):
      x = scores[v] / t
      log_softmax = x - x.max(1, keepdims=True)
      log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
      subloss -= np.mean(np.sum(codes[i] * log_softmax, axis=1))
    loss += subloss / (nmb - 1)
  return loss / len(crops_for_assign), codes


@pytest.mark.parametrize('with_queue', [False, True])
def test_swav_loss_with_8_crops_equals_the_official_loop(with_queue):
  """Value and gradient (every crop's scores) against the float64 transcription; the small crops only predict,
  the large ones predict each other's codes and are predicted by all."""
  rng = np.random.default_rng(0)
  scores = np.tanh(rng.normal(size=(CROPS, 6, 5))).astype(np.float32)
  queue = np.tanh(rng.normal(size=(2, 12, 5))).astype(np.float32) if with_queue else None
  loss, metrics = losses.swav_loss(*scores, queue_scores=queue)
  ref, codes = ref_swav_multicrop(scores, queue=queue)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  grad = np.asarray(jax.grad(lambda s: losses.swav_loss(*s, queue_scores=queue)[0])(tuple(scores)))
  want = numeric_grad(lambda s: ref_swav_multicrop(s, codes=codes)[0], scores.astype(np.float64))
  np.testing.assert_allclose(grad, want, rtol=2e-3, atol=1e-5 * np.abs(want).max())
  # Not the two-crop loss of the large crops alone: the small crops take part.
  assert abs(float(losses.swav_loss(*scores[:2], queue_scores=queue)[0]) - ref) > 1e-3
  assert float(metrics['entropy']) > 0


def test_swav_loss_with_8_crops_on_8_devices_equals_1_device():
  """Every replica returns the global loss (codes of the global batch), and the pmean of a replicated weight's
  gradients is the single-device gradient."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(CROPS, 32, 6)).astype(np.float32)
  w = (rng.normal(size=(6, 5)) / np.sqrt(6)).astype(np.float32)

  def loss(w, x, axis_name):
    return losses.swav_loss(*jnp.tanh(x @ w), axis_name=axis_name)[0]

  def body(w, x):
    value, g = jax.value_and_grad(loss)(w, x, 'data')
    return value[None], jax.lax.pmean(g, 'data')

  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  values, grad = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, 'data')),
                                       out_specs=(P('data'), P()), check_vma=False))(w, x)
  single, single_grad = jax.value_and_grad(loss)(w, x, None)
  np.testing.assert_allclose(values, np.full(8, single), rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-5, atol=1e-5 * np.abs(single_grad).max())


# --- the crops through the pipeline ---------------------------------------------------------------------------

def write_photos(root, n=4, shape=(150, 200)):
  """``n`` JPEGs of smooth random colour fields, two classes."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  for i in range(n):
    small = rng.uniform(0, 255, size=(6, 8, 3))
    image = tf.image.resize(small, shape, method='bilinear').numpy().astype(np.uint8)
    (root / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
    (root / f'c{i % 2}' / f'{i}.jpg').write_bytes(tf.io.encode_jpeg(image, quality=95).numpy())
  return root


def test_the_swav_imagenet_config_yields_2x224_and_6x96_crops_from_jpegs(tmp_path):
  """configs/imagenet_swav.py through the real pipeline on a folder of JPEGs: both views 224 px and 6 small
  crops of 96 px per image, uint8 (colour on the device); the views are those of the same config without the
  small crops, bit for bit (their seeds are unchanged), and the small crops differ from one another."""
  config = load_config('imagenet_swav')
  assert config.augment.small_crops == 6 and config.model.views_together
  assert config.augment.small_view.crop_size == 96 and tuple(config.augment.small_view.crop_scale) == (0.05, 0.14)
  assert tuple(config.augment.view1.crop_scale) == tuple(config.augment.view2.crop_scale) == (0.14, 1.0)
  config.data.update(source='folder', data_dir=str(write_photos(tmp_path)))
  config.batch_size = 4
  batch = next(pipeline.pretrain_dataset(config).as_numpy_iterator())
  assert batch['view1'].shape == batch['view2'].shape == (4, 224, 224, 3)
  assert batch['small'].shape == (4, 6, 96, 96, 3) and batch['small'].dtype == np.uint8
  config.augment.small_crops = 0
  two = next(pipeline.pretrain_dataset(config).as_numpy_iterator())
  assert 'small' not in two
  for v in ('view1', 'view2'):
    np.testing.assert_array_equal(batch[v], two[v])
  small = batch['small'].astype(np.float32)
  assert min(np.abs(small[:, i] - small[:, j]).mean() for i in range(6) for j in range(i)) > 1.0


# --- the step -------------------------------------------------------------------------------------------------

def tiny_multicrop(**overrides):
  """SwAV on the tiny digits model with 2 views of 16 px and 6 small crops of 8 px (the digits view's colour
  part after a random resized crop), colour on the device."""
  config = tiny_digits(method='swav', **{'swav.num_prototypes': 12, 'swav.freeze_prototypes_steps': 0,
                                         'augment.small_crops': 6, 'model.views_together': True,
                                         'augment.on_device': True, **overrides})
  for view in (config.augment.view1, config.augment.view2):
    view['noise_std'] = 0.0  # the uint8 transfer would clip it
  config.augment.small_view.update(dict(config.augment.view1, crop_size=8, crop_scale=(0.2, 0.5), translate=1,
                                        cutout_p=0.0))
  schema.validate(config)
  return config


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_the_backbone_runs_once_per_resolution_group_and_the_heads_over_all_crops():
  """``model((large, small))``: the representations of the large group are the backbone's on that group alone
  (BatchNorm over both views, not per view), and the embeddings are the projector's on every crop's
  representations together."""
  config = tiny_multicrop()
  model = step_lib.build_model(config, None)
  rng = np.random.default_rng(0)
  large, small = rng.random((8, 16, 16, 1), np.float32), rng.random((12, 8, 8, 1), np.float32)
  variables = model.init(jax.random.key(0), large[:1], train=False, heads=True)
  (h, z, out), _ = model.apply(variables, (large, small), train=True, heads=True, mutable=['batch_stats'])
  assert h.shape[0] == z.shape[0] == out['scores'].shape[0] == 20
  backbone = lambda x: model.apply(variables, x, mutable=['batch_stats'],  # noqa: E731
                                   method=lambda m, x: m.backbone(x, train=True))[0]
  np.testing.assert_allclose(h[:8], backbone(large), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h[8:], backbone(small), rtol=1e-5, atol=1e-6)
  assert np.abs(h[:4] - backbone(large[:4])).max() > 1e-3  # one view alone has other statistics
  projector = lambda x: model.apply(variables, x, mutable=['batch_stats'],  # noqa: E731
                                    method=lambda m, x: m.projector(x, train=True))[0]
  np.testing.assert_allclose(z, projector(h), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_multicrop_step_on_8_devices_equals_1_device():
  """Two steps of SwAV with 6 small crops (colour ops on the device with keys per crop and global row, the
  queue of the two views full at the second step) on 8 devices and on 1."""
  config = tiny_multicrop(**{'swav.queue_length': 64})
  batches = [b for _, b in zip(range(2), pipeline.pretrain_dataset(config).as_numpy_iterator())]
  assert batches[0]['small'].shape == (64, 6, 8, 8, 1) and batches[0]['small'].dtype == np.uint8
  s1, m1 = train_steps(config, batches, jax.devices()[:1])
  s8, m8 = train_steps(config, batches)
  for k in ('loss', 'entropy', 'embedding_std', 'online_probe_top1'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
  for part in ('params', 'batch_stats', 'probe_params', 'extra'):
    assert_trees_close(getattr(s8, part), getattr(s1, part))
  assert s1.extra['queue'].shape == (2, 64, 32) and int(s1.extra['queue_count']) == 128
  p0 = step_lib.init_state(config, step_lib.build_model(config, None), methods.make_optimizer(config, 10, 2)[0],
                           jax.random.key(0)).params
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), s1.params, p0))) > 1e-4


def duplicated_per_device(batch, devices: int, copies: int):
  """Each device's share cut to 1/copies, each row repeated ``copies`` times in a row: every micro-batch of
  ``copies`` then holds the same examples (of every crop), so its BatchNorm statistics are the batch's."""
  def dup(x):
    return np.concatenate([np.repeat(s[:len(s) // copies], copies, axis=0) for s in np.split(x, devices)])
  return {k: dup(v) for k, v in batch.items()}


@pytest.mark.slow
def test_multicrop_micro_batches_and_remat_give_the_one_pass_step():
  """4 micro-batches per device with remat, on a batch whose micro-batches hold the same examples: the small
  crops are sliced with their views (else the micro-batches' statistics and the loss would differ), the codes
  are the global batch's, so loss and updated parameters are those of one pass without remat. (Colour on the
  host: on the device each repeated row would get its own colour draws.)"""
  config = tiny_multicrop(**{'augment.on_device': False, 'augment.small_crops': 2})
  batch = duplicated_per_device(next(pipeline.pretrain_dataset(config).as_numpy_iterator()), 8, 4)
  s1, m1 = train_steps(config, [batch])
  config.grad_accum_steps = 4
  config.model.remat = True
  s4, m4 = train_steps(config, [batch])
  for k in ('loss', 'entropy', 'online_probe_top1'):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert_trees_close(s4.params, s1.params, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('method, heads', [('simclr', {}), ('byol', {'byol.predictor': '32'})])
def test_views_together_runs_two_views_of_any_method(method, heads):
  """``model.views_together`` without small crops (SimCLR's official BatchNorm over both views): a method without
  heads and one with a predictor and an EMA target take a finite step, which is not the step of one pass per
  view (the BatchNorm statistics cover both views)."""
  config = tiny_digits(method=method, **heads)
  batch = next(pipeline.pretrain_dataset(config).as_numpy_iterator())
  _, apart = train_steps(config, [batch], jax.devices()[:1])
  config.model.views_together = True
  _, together = train_steps(config, [batch], jax.devices()[:1])
  assert np.isfinite(together['loss']) and abs(float(together['loss']) - float(apart['loss'])) > 1e-4


def test_multicrop_is_refused_in_one_line_where_it_cannot_run():
  config = tiny_multicrop()
  config.method = 'vicreg'
  with pytest.raises(errors.ConfigError, match=r'small_crops: vicreg has no multi-crop loss \(only swav\)'):
    schema.validate(config)
  config.method, config.model.views_together = 'swav', False
  with pytest.raises(errors.ConfigError, match='needs --config.model.views_together=True'):
    schema.validate(config)


@pytest.mark.slow
def test_a_short_multicrop_run_on_a_folder_of_images_trains_and_is_linear_evaluated(tmp_path):
  """configs/imagenet_swav.py shrunk (ResNet-18 ×1/16, 2×32 + 6×16 px crops, batch 16, 3 steps) on a folder of
  JPEGs, then configs/imagenet_linear.py on its checkpoint."""
  root = write_photos(tmp_path / 'images', n=24, shape=(48, 64))
  config = load_config('imagenet_swav')
  config.model.update(arch='resnet18', width_multiplier=1 / 16, projector='64-32')
  config.swav.update(num_prototypes=20, freeze_prototypes_steps=1)
  config.update(batch_size=16, num_steps=3, log_every_steps=1, checkpoint_every_steps=3)
  config.model.remat = False  # remat: tests/test_multicrop.py's micro-batch test (it only costs compile time here)
  config.data.update(source='folder', data_dir=str(root), val_fraction=0.25, image_size=32)
  for view, size in ((config.augment.view1, 32), (config.augment.view2, 32), (config.augment.small_view, 16)):
    view['crop_size'] = size
  pre = str(tmp_path / 'pre')
  assert train.train_and_evaluate(config, pre)['steps'] == 3
  trained = checkpoint_arrays(tmp_path / 'pre' / 'checkpoints' / '3' / 'default')
  tx, _ = methods.make_optimizer(config, 3, 0)
  initial = step_lib.init_state(config, step_lib.build_model(config, None), tx, jax.random.key(config.seed)).params
  assert max_abs_difference(trained['params']['backbone'], initial['backbone']) > 1e-4
  lin = load_config('imagenet_linear')
  lin.update(pretrain_workdir=pre, batch_size=16, epochs=1, log_every_steps=1, poll_seconds=0.1,
             timeout_seconds=60.0, checkpoint_every_steps=2)
  lin.data.update(source='folder', data_dir=str(root), val_fraction=0.25)
  lin.transforms.train['crop_size'] = 32
  lin.transforms.eval.update(resize=36, crop=32)
  results = linear.run(lin, str(tmp_path / 'lin'))
  assert list(results) == ['3'] and 0.0 <= results['3']['top1'] <= 1.0
