"""Weighted k-NN classification on frozen features (InstDisc / DINO protocol, VICReg Table 11), with the
feature bank sharded over the ``'data'`` mesh axis so it need not fit on one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vicreg_jax import parallel


def _normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def shard_bank(bank: np.ndarray, labels: np.ndarray, mesh) -> tuple[jax.Array, jax.Array]:
  """L2-normalised ``bank`` [N, D] and its ``labels`` [N] (the same on every process) as device arrays split
  over ``'data'``.

  Rows are padded to a multiple of the device count; padding rows are zero with label -1 and never vote.
  """
  n_dev = mesh.devices.size
  pad = -len(bank) % n_dev
  bank = _normalize(bank)
  bank = np.concatenate([bank, np.zeros((pad, bank.shape[1]), np.float32)])
  labels = np.concatenate([np.asarray(labels, np.int32), np.full(pad, -1, np.int32)])
  sharding = parallel.data_sharding(mesh)
  return parallel.global_array(bank, sharding), parallel.global_array(labels, sharding)


@functools.lru_cache(maxsize=None)
def _predict_fn(mesh, ks: tuple[int, ...], shard_len: int, num_classes: int, temperature: float):
  """Jitted ``(bank, labels, queries) -> [len(ks), B]`` predictions for one replicated batch of queries."""
  kmax = max(ks)
  k_local = min(kmax, shard_len)

  def local(bank, labels, q):
    sims = jnp.where(labels[None] >= 0, q @ bank.T, -jnp.inf)  # [B, shard_len]
    s, i = jax.lax.top_k(sims, k_local)
    s = jax.lax.all_gather(s, parallel.AXIS, axis=1, tiled=True)  # [B, n_dev * k_local]
    lab = jax.lax.all_gather(labels[i], parallel.AXIS, axis=1, tiled=True)
    s, j = jax.lax.top_k(s, kmax)
    lab = jnp.take_along_axis(lab, j, axis=1)
    preds = []
    for k in ks:  # neighbours are sorted by similarity, so every k reads a prefix of the top-kmax
      w = jnp.exp(s[:, :k] / temperature)
      votes = jnp.sum(jax.nn.one_hot(lab[:, :k], num_classes) * w[..., None], axis=1)
      preds.append(jnp.argmax(votes, axis=1))
    return jnp.stack(preds)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(parallel.AXIS), P(parallel.AXIS), P()),
                               out_specs=P(), check_vma=False))


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int,
                ks=(20, 200), temperature: float = 0.07, mesh=None,
                query_batch: int = 1024) -> dict[int, np.ndarray]:
  """For each k, the class maximising ``sum_i exp(cos(query, bank_i) / temperature)`` over the query's k
  most cosine-similar bank rows (k capped at the bank size); returns k -> numpy labels [Q]."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  n = len(bank)
  if n == 0:
    raise ValueError('knn_predict needs a non-empty bank')
  caps = tuple(min(int(k), n) for k in ks)
  bank_d, labels_d = shard_bank(bank, bank_labels, mesh)
  fn = _predict_fn(mesh, tuple(sorted(set(caps))), bank_d.shape[0] // mesh.devices.size,
                   int(num_classes), float(temperature))
  queries = _normalize(queries)
  batch = max(1, min(query_batch, len(queries)))
  rep = parallel.replicated(mesh)
  out = []
  for i in range(0, len(queries), batch):
    q = queries[i:i + batch]
    pad = batch - len(q)
    q = np.concatenate([q, np.zeros((pad, q.shape[1]), np.float32)]) if pad else q
    out.append(np.asarray(fn(bank_d, labels_d, parallel.global_array(q, rep)))[:, :batch - pad])
  preds = np.concatenate(out, axis=1) if out else np.zeros((len(set(caps)), 0), np.int32)
  by_cap = dict(zip(sorted(set(caps)), preds))
  return {int(k): by_cap[c] for k, c in zip(ks, caps)}


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=None, ks=(20, 200),
                 temperature: float = 0.07, mesh=None, query_batch: int = 1024) -> dict[int, float]:
  """Top-1 accuracy of :func:`knn_predict` for each k; ``num_classes`` defaults to the largest label + 1."""
  query_labels = np.asarray(query_labels)
  if num_classes is None:
    num_classes = int(max(np.max(bank_labels), np.max(query_labels, initial=-1))) + 1
  preds = knn_predict(bank, bank_labels, queries, num_classes, ks, temperature, mesh, query_batch)
  return {k: float(np.mean(p == query_labels)) for k, p in preds.items()}
