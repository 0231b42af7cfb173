"""The pretraining run's end-of-run probe: frozen representations of the training and test splits, probed
linearly (all labels; a few labels per class over several draws) and by k-NN, with the collapse measures of the
representations and embeddings."""

from __future__ import annotations

import functools
import io
import os

import jax
import numpy as np
import tensorflow as tf

from vicreg_jax import collapse, compilation, distributed, parallel
from vicreg_jax.data import pipeline
from vicreg_jax.evaluate import knn, probe
from vicreg_jax.step import TrainState, build_model


def final_probe(config, state: TrainState, mesh, workdir: str) -> dict:
  """Linear probes on frozen representations (all labels; k labels per class over several draws), weighted
  k-NN (k = 20, 200), RankMe of representations and embeddings, the std of the embeddings and of the embeddings
  scaled to unit norm (:func:`collapse.unit_std`), on the
  ``config.data``'s train and test splits. Writes the singular values of the training set's
  representations and embeddings to ``workdir/spectra.npz`` (for ``python -m vicreg_jax.evaluate.diagnostics``).

  Each process extracts the features of its share of the images; k-NN runs on all devices; the host-side work
  (scikit-learn probes, spectra) runs on process 0, which hands the figures to the others."""
  model = build_model(config, axis_name=None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = compilation.jit(functools.partial(model.apply, train=False))
  recipe = dict(config.augment.view1)
  n_dev = mesh.devices.size
  batch = max(n_dev, config.final_probe.batch_size // n_dev * n_dev)

  def features(split: str, max_examples: int):
    ds = pipeline.eval_dataset(config.data, split, batch, crop=config.data.image_size, mean=recipe.get('mean'),
                               std=recipe.get('std'), process_index=jax.process_index(),
                               process_count=jax.process_count(), max_examples=max_examples)
    return probe.extract(apply, variables, pipeline.global_batches(ds, parallel.data_sharding(mesh)))

  (h_tr, z_tr), y_tr = features(config.data.train_split, config.final_probe.max_train_examples)
  (h_te, _), y_te = features(config.data.test_split, config.final_probe.max_test_examples)
  knn_acc = knn.knn_accuracy(h_tr, y_tr, h_te, y_te, ks=(20, 200), mesh=mesh)

  def host_side() -> dict:
    s_h, s_z = collapse.singular_values(h_tr), collapse.singular_values(z_tr)
    buffer = io.BytesIO()  # np.savez seeks, which GFile (gs://) does not support for writing
    np.savez(buffer, representations=s_h, embeddings=s_z)
    with tf.io.gfile.GFile(os.path.join(workdir, 'spectra.npz'), 'wb') as f:
      f.write(buffer.getvalue())
    result = {
        'linear_top1': probe.linear_probe(h_tr, y_tr, h_te, y_te),
        f'linear_top1_{config.final_probe.labels_per_class}_per_class': probe.few_label_probe(
            h_tr, y_tr, h_te, y_te, config.final_probe.labels_per_class, config.final_probe.draws, config.seed),
        'knn_top1_20': knn_acc[20],
        'knn_top1_200': knn_acc[200],
        'rankme': collapse.rankme_from_spectrum(s_h),
        'rankme_embeddings': collapse.rankme_from_spectrum(s_z),
        'embedding_std': float(np.mean(np.std(z_tr, axis=0))),
        'embedding_std_unit': collapse.unit_std(z_tr),
    }
    return {k: float(f'{float(v):.4g}') for k, v in result.items()}  # 4 significant digits: a collapsed std stays visible

  return distributed.share_from_process_0(host_side)
