"""Weighted k-NN on a feature bank sharded over the 8 simulated devices."""

import math

import jax
import numpy as np
import pytest

from vicreg_jax import parallel
from vicreg_jax.evaluate import knn


def one_device_mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))


def reference_predict(bank, bank_labels, queries, num_classes, k, temperature):
  """Straight from the equations: cosine similarities, the k largest, exp(sim / T) votes, argmax."""
  b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = q @ b.T
  preds = []
  for row in sims:
    nn = np.argsort(-row)[:min(k, len(b))]
    votes = np.zeros(num_classes)
    for j in nn:
      votes[bank_labels[j]] += math.exp(row[j] / temperature)
    preds.append(np.argmax(votes))
  return np.asarray(preds)


def random_problem(n=1003, q=77, d=16, c=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n),
          rng.normal(size=(q, d)).astype(np.float32), rng.integers(0, c, q))


def test_clustered_features_are_classified_perfectly():
  rng = np.random.default_rng(0)
  c, d = 10, 32
  centres = rng.normal(size=(c, d)) * 5
  bank_labels = np.repeat(np.arange(c), 50)
  bank = centres[bank_labels] + 0.1 * rng.normal(size=(len(bank_labels), d))
  query_labels = rng.integers(0, c, 100)
  queries = centres[query_labels] + 0.1 * rng.normal(size=(100, d))
  acc = knn.knn_accuracy(bank, bank_labels, queries, query_labels, ks=(20, 200))
  assert acc[20] == 1.0
  assert set(acc) == {20, 200}


def test_hand_computed_vote():
  # Query e0. Three class-0 neighbours at cosine ~1; twenty class-1 rows at cosine exactly 0.5.
  d = 32
  e = np.eye(d)
  near = [e[0] + 0.01 * e[29 + i] for i in range(3)]
  far = [0.5 * e[0] + math.sqrt(0.75) * e[1 + i] for i in range(20)]
  bank = np.asarray(near + far, np.float32)
  labels = np.asarray([0] * 3 + [1] * 20)
  query = e[:1].astype(np.float32)
  cos_near = 1 / math.sqrt(1 + 0.01 ** 2)
  # By hand: at T = 1 the 20 far votes win, at T = 0.07 the 3 near votes win; with k = 3 only near ones vote.
  assert 20 * math.exp(0.5 / 1.0) > 3 * math.exp(cos_near / 1.0)
  assert 20 * math.exp(0.5 / 0.07) < 3 * math.exp(cos_near / 0.07)
  hot = knn.knn_predict(bank, labels, query, 2, ks=(3, 23), temperature=1.0)
  assert hot[3][0] == 0 and hot[23][0] == 1
  cold = knn.knn_predict(bank, labels, query, 2, ks=(3, 23), temperature=0.07)
  assert cold[3][0] == 0 and cold[23][0] == 0


def test_matches_numpy_reference():
  bank, bank_labels, queries, _ = random_problem()
  preds = knn.knn_predict(bank, bank_labels, queries, 5, ks=(1, 5, 20), temperature=0.07, query_batch=32)
  assert set(preds) == {1, 5, 20}
  for k in (1, 5, 20):
    assert preds[k].shape == (len(queries),)
    np.testing.assert_array_equal(preds[k], reference_predict(bank, bank_labels, queries, 5, k, 0.07))


def test_bank_smaller_than_devices_and_k():
  bank, bank_labels, queries, _ = random_problem(n=3, q=10, c=3, seed=1)
  preds = knn.knn_predict(bank, bank_labels, queries, 3, ks=(1, 2, 20, 200), query_batch=4)
  for k in (1, 2, 20):
    np.testing.assert_array_equal(preds[k], reference_predict(bank, bank_labels, queries, 3, k, 0.07))
  np.testing.assert_array_equal(preds[200], preds[20])


def test_padding_rows_never_vote():
  # Every bank row has negative cosine with the query, so zero padding rows (cosine 0) would outrank them.
  a = [0.5, 0.4, 0.3, 0.2, 0.1]  # sims -1 / sqrt(1 + a^2): the class-2 rows are the three nearest
  bank = np.asarray([-np.eye(8)[0] + aj * np.eye(8)[1 + j] for j, aj in enumerate(a)], np.float32)
  labels = np.asarray([2, 2, 2, 1, 1])
  preds = knn.knn_predict(bank, labels, np.eye(8, dtype=np.float32)[:1], 3, ks=(3, 20))
  assert preds[3][0] == 2 and preds[20][0] == 2


def test_eight_devices_match_one():
  bank, bank_labels, queries, query_labels = random_problem(n=517, q=50, seed=2)
  ks = (1, 5, 20, 200)
  eight = knn.knn_predict(bank, bank_labels, queries, 5, ks=ks, mesh=parallel.make_mesh())
  one = knn.knn_predict(bank, bank_labels, queries, 5, ks=ks, mesh=one_device_mesh())
  for k in ks:
    np.testing.assert_array_equal(eight[k], one[k])
  acc = knn.knn_accuracy(bank, bank_labels, queries, query_labels, ks=ks, mesh=one_device_mesh())
  assert acc == {k: float(np.mean(one[k] == query_labels)) for k in ks}


def test_bank_is_sharded():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  bank, bank_labels, _, _ = random_problem(n=1003)
  bank_d, labels_d = knn.shard_bank(bank, bank_labels, mesh)
  assert bank_d.shape == (1008, 16) and labels_d.shape == (1008,)
  assert len(bank_d.sharding.device_set) == 8
  shards = bank_d.addressable_shards
  assert len({s.device for s in shards}) == 8
  assert all(s.data.shape == (126, 16) for s in shards)
  assert all(s.data.shape == (126,) for s in labels_d.addressable_shards)
  np.testing.assert_array_equal(np.asarray(labels_d)[1003:], -1)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(bank_d)[:1003], axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize('scale', [100.0, 0.01])
def test_cosine_not_dot_product(scale):
  bank, bank_labels, queries, _ = random_problem(n=200, q=60, seed=3)
  before = knn.knn_predict(bank, bank_labels, queries, 5, ks=(1, 20))
  scaled = bank.copy()
  # Scale the row that is most often a nearest neighbour: a dot product would make it win far more queries.
  top1 = np.argmax(queries @ bank.T / np.linalg.norm(bank, axis=1), axis=1)
  row = np.bincount(top1).argmax()
  scaled[row] *= scale
  after = knn.knn_predict(scaled, bank_labels, queries * 3.0, 5, ks=(1, 20))
  for k in (1, 20):
    np.testing.assert_array_equal(before[k], after[k])
  # Sanity: with dot products the scaled row would change the answer.
  if scale > 1:
    dot_top1 = np.argmax(queries @ scaled.T, axis=1)
    assert np.any(bank_labels[dot_top1] != before[1])
