"""The sibling methods' losses (SimCLR, W-MSE, BYOL, SimSiam, SwAV, MoCo v3, the Table 4 regulariser) against float64
NumPy references written by explicit loops from the official code's semantics, value and gradient, and 8
simulated devices against 1 under shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numeric_grad, ref_sinkhorn, sharded_value_and_grad
from vicreg_jax import losses

N_DEV = 8


def _unit(x):
  return x / max(np.sqrt(np.sum(x * x)), 1e-12)


def assert_grad(got, want, rtol=1e-3):
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-4 * scale)


def views(n, d, seed=0, noise=0.5):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d))
  return a.astype(np.float32), (a + noise * rng.normal(size=(n, d))).astype(np.float32)


# --- SimCLR -----------------------------------------------------------------------------------------------

def ref_simclr(za, zb, t):
  """Official NT-Xent (TF1 add_contrastive_loss): hidden_norm, logits_ab / logits_aa with only the anchor's own
  entry masked (−1e9), softmax cross-entropy of [ab, aa] against the positive, mean over anchors; the same for b;
  the two directions' means summed."""
  za = np.array([_unit(r) for r in np.asarray(za, np.float64)])
  zb = np.array([_unit(r) for r in np.asarray(zb, np.float64)])
  n = len(za)

  def direction(x, y):
    total = 0.0
    for i in range(n):
      logits = [x[i] @ y[j] / t for j in range(n)] + [(x[i] @ x[j] / t if j != i else -1e9) for j in range(n)]
      logits = np.array(logits)
      total += -logits[i] + np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    return total / n

  return direction(za, zb) + direction(zb, za)


@pytest.mark.parametrize('t', [0.1, 0.5])
def test_simclr_value_and_gradient(t):
  za, zb = views(12, 5, seed=1)
  loss, m = jax.jit(functools.partial(losses.simclr_loss, temperature=t))(za, zb)
  np.testing.assert_allclose(loss, ref_simclr(za, zb, t), rtol=1e-5)
  assert 0.0 <= float(m['top1']) <= 1.0
  ga, gb = jax.grad(lambda a, b: losses.simclr_loss(a, b, temperature=t)[0], argnums=(0, 1))(za, zb)
  assert_grad(ga, numeric_grad(lambda x: ref_simclr(x, zb, t), za))
  assert_grad(gb, numeric_grad(lambda x: ref_simclr(za, x, t), zb))


def test_simclr_scores_identical_views_better_than_shuffled_ones():
  za, _ = views(16, 8, seed=2)
  same = float(losses.simclr_loss(za, za, temperature=0.2)[0])
  shuffled = float(losses.simclr_loss(za, za[::-1].copy(), temperature=0.2)[0])
  assert same < shuffled


# --- W-MSE ------------------------------------------------------------------------------------------------

def ref_whiten(x, eps=0.0):
  """Whitening2d in float64: centre, C = XcᵀXc/(w-1), shrink, L = cholesky(C), W = L⁻¹, out = Xc Wᵀ."""
  x = np.asarray(x, np.float64)
  xc = x - x.mean(0)
  c = xc.T @ xc / (len(x) - 1)
  c = (1 - eps) * c + eps * np.eye(x.shape[1])
  return xc @ np.linalg.inv(np.linalg.cholesky(c)).T


def ref_wmse(za, zb, perms, eps=0.0):
  """Per draw: each index chunk of the permutation whitened per view; 2 - 2·mean cos over the rows; mean over
  draws (the official ``loss /= w_iter * num_pairs`` with one pair)."""
  za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
  total = 0.0
  for perm in perms:
    wa, wb = np.empty_like(za), np.empty_like(zb)
    for idx in perm:
      wa[idx], wb[idx] = ref_whiten(za[idx], eps), ref_whiten(zb[idx], eps)
    total += 2 - 2 * np.mean([_unit(a) @ _unit(b) for a, b in zip(wa, wb)])
  return total / len(perms)


@pytest.mark.parametrize('w_iter,eps', [(1, 0.0), (2, 0.1)])
def test_wmse_value_and_gradient(w_iter, eps):
  za, zb = views(16, 3, seed=3)
  key = jax.random.key(7)
  perms = [np.asarray(jax.random.permutation(jax.random.fold_in(key, i), 16)).reshape(-1, 8) for i in range(w_iter)]
  f = lambda a, b: losses.wmse_loss(a, b, key=key, w_size=8, w_iter=w_iter, eps=eps)
  loss, m = jax.jit(f)(za, zb)
  np.testing.assert_allclose(loss, ref_wmse(za, zb, perms, eps), rtol=1e-5)
  np.testing.assert_allclose(m['cosine'], 1 - float(loss) / 2, rtol=1e-5)
  ga = jax.grad(lambda a: f(a, zb)[0])(za)
  assert_grad(ga, numeric_grad(lambda x: ref_wmse(x, zb, perms, eps), za), rtol=2e-3)


def test_whitened_sub_batch_has_identity_covariance():
  x = views(32, 4, seed=4)[0] @ np.array([[1, 0.9, 0, 0], [0, 1, 0, 0], [0, 0, 3, 0], [0, 0, 1, 0.2]], np.float32)
  w = np.asarray(losses.whiten(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(np.cov(w, rowvar=False), np.eye(4), atol=1e-4)


def test_wmse_refuses_an_embedding_as_wide_as_its_sub_batch():
  za, zb = views(16, 8)
  with pytest.raises(ValueError, match='w_size'):
    losses.wmse_loss(za, zb, key=jax.random.key(0), w_size=8)
  with pytest.raises(ValueError, match='multiple of w_size'):
    losses.wmse_loss(za[:12], zb[:12], key=jax.random.key(0), w_size=8)


# --- BYOL and SimSiam -------------------------------------------------------------------------------------

def ref_byol(pa, pb, ta, tb):
  """deepmind byol: per sample ‖n(p1) − n(t2)‖² + ‖n(p2) − n(t1)‖², then the batch mean."""
  rows = [np.sum((_unit(p1) - _unit(t2))**2) + np.sum((_unit(p2) - _unit(t1))**2)
          for p1, p2, t1, t2 in zip(*(np.asarray(x, np.float64) for x in (pa, pb, ta, tb)))]
  return float(np.mean(rows))


def ref_simsiam(pa, pb, za, zb):
  """facebookresearch/simsiam: −(cos(p1, z2).mean() + cos(p2, z1).mean()) · 0.5."""
  pa, pb, za, zb = (np.asarray(x, np.float64) for x in (pa, pb, za, zb))
  c1 = np.mean([_unit(p) @ _unit(z) for p, z in zip(pa, zb)])
  c2 = np.mean([_unit(p) @ _unit(z) for p, z in zip(pb, za)])
  return -(c1 + c2) / 2


@pytest.mark.parametrize('name', ['byol', 'simsiam'])
def test_distillation_losses_value_gradient_and_stop_gradient(name):
  loss_of, ref = {'byol': (losses.byol_loss, ref_byol), 'simsiam': (losses.simsiam_loss, ref_simsiam)}[name]
  pa, pb = views(10, 6, seed=5)
  ta, tb = views(10, 6, seed=6)
  f = lambda *x: loss_of(*x)[0]
  np.testing.assert_allclose(jax.jit(f)(pa, pb, ta, tb), ref(pa, pb, ta, tb), rtol=1e-5)
  g = jax.grad(f, argnums=(0, 1, 2, 3))(pa, pb, ta, tb)
  assert_grad(g[0], numeric_grad(lambda x: ref(x, pb, ta, tb), pa))
  assert_grad(g[1], numeric_grad(lambda x: ref(pa, x, ta, tb), pb))
  assert float(jnp.abs(g[2]).max()) == 0.0 and float(jnp.abs(g[3]).max()) == 0.0  # targets: stop-gradient


def test_simsiam_without_predictor_is_the_cosine_with_a_frozen_copy():
  za, zb = views(10, 6, seed=8)
  g = jax.grad(lambda a: losses.simsiam_loss(a, zb, a, zb)[0])(za)
  assert_grad(g, numeric_grad(lambda x: ref_simsiam(x, zb, za, zb), za))


# --- MoCo v3 -------------------------------------------------------------------------------------------------

def ref_moco_v3(qa, qb, ka, kb, t, ranks=1):
  """facebookresearch/moco-v3 builder.py ``contrastive_loss(q1, k2) + contrastive_loss(q2, k1)`` on ``ranks``
  GPUs, each holding consecutive rows: F.normalize, the GPU's queries against every gathered key ``/ T``,
  CrossEntropyLoss (mean) towards ``arange(N) + N·rank``, ``× 2T``; DDP then averages the GPUs' losses."""
  qa, qb, ka, kb = (np.array([_unit(r) for r in np.asarray(x, np.float64)]) for x in (qa, qb, ka, kb))
  n = len(qa) // ranks

  def contrastive(q, k, rank):
    total = 0.0
    for i in range(n):
      logits = np.array([q[rank * n + i] @ k[j] / t for j in range(len(k))])
      label = i + n * rank
      total += -logits[label] + np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    return total / n * (2 * t)

  return np.mean([contrastive(qa, kb, r) + contrastive(qb, ka, r) for r in range(ranks)])


@pytest.mark.parametrize('t', [0.2, 1.0])
def test_moco_v3_value_gradient_and_stop_gradient(t):
  qa, qb = views(12, 5, seed=11)
  ka, kb = views(12, 5, seed=12, noise=0.3)
  f = lambda *x: losses.moco_v3_loss(*x, temperature=t)[0]
  want = ref_moco_v3(qa, qb, ka, kb, t)
  np.testing.assert_allclose(jax.jit(f)(qa, qb, ka, kb), want, rtol=1e-5)
  np.testing.assert_allclose(want, ref_moco_v3(qa, qb, ka, kb, t, ranks=4), rtol=1e-12)  # DDP's mean = global
  g = jax.grad(f, argnums=(0, 1, 2, 3))(qa, qb, ka, kb)
  assert_grad(g[0], numeric_grad(lambda x: ref_moco_v3(x, qb, ka, kb, t), qa))
  assert_grad(g[1], numeric_grad(lambda x: ref_moco_v3(qa, x, ka, kb, t), qb))
  assert float(jnp.abs(g[2]).max()) == 0.0 and float(jnp.abs(g[3]).max()) == 0.0  # keys: no gradient
  top1 = float(losses.moco_v3_loss(qa, qb, qb, qa, temperature=t)[1]['top1'])  # view a against k_b = q_a
  assert top1 == 1.0  # each query's own key (itself) is its nearest


# --- MoCo v2 -------------------------------------------------------------------------------------------------

def ref_moco_v2(q, k, queue, t, ranks=1):
  """facebookresearch/moco builder.py ``forward`` + main_moco.py's criterion on ``ranks`` GPUs, each holding
  consecutive rows: F.normalize of queries and keys, ``l_pos = q·k``, ``l_neg = q·queue`` (the queue [dim, K]:
  its transpose here, unit keys already, used as they are), logits ``[l_pos, l_neg] / T``, CrossEntropyLoss
  (mean) towards label 0; DDP then averages the GPUs' losses."""
  q, k = (np.array([_unit(r) for r in np.asarray(x, np.float64)]) for x in (q, k))
  queue = np.asarray(queue, np.float64)
  n = len(q) // ranks
  per_gpu = []
  for rank in range(ranks):
    total = 0.0
    for i in range(rank * n, (rank + 1) * n):
      logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / t
      total += -logits[0] + np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    per_gpu.append(total / n)
  return np.mean(per_gpu)


@pytest.mark.parametrize('t', [0.07, 0.2])
def test_moco_v2_value_gradient_and_stop_gradient(t):
  q, k = views(12, 5, seed=13)
  queue = np.array([_unit(r) for r in np.random.default_rng(14).normal(size=(20, 5))], np.float32)
  f = lambda *x: losses.moco_v2_loss(*x, temperature=t)[0]
  want = ref_moco_v2(q, k, queue, t)
  np.testing.assert_allclose(jax.jit(f)(q, k, queue), want, rtol=1e-5)
  np.testing.assert_allclose(want, ref_moco_v2(q, k, queue, t, ranks=4), rtol=1e-12)  # DDP's mean = global
  g = jax.grad(f, argnums=(0, 1, 2))(q, k, queue)
  assert_grad(g[0], numeric_grad(lambda x: ref_moco_v2(x, k, queue, t), q))
  assert float(jnp.abs(g[1]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0  # keys and queue: no gradient
  _, metrics = losses.moco_v2_loss(q, q, queue, temperature=t)  # each query's positive is itself: cos 1
  assert float(metrics['top1']) == 1.0
  _, metrics = losses.moco_v2_loss(q, -q, queue, temperature=t)  # its positive the farthest: cos -1
  assert float(metrics['top1']) == 0.0


def ref_variance_covariance(za, zb):
  za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
  d = za.shape[1]
  var = np.mean([(np.mean(np.maximum(0, 1 - np.sqrt(np.var(z, axis=0, ddof=1) + 1e-4)))) for z in (za, zb)])
  cov = 0.0
  for z in (za, zb):
    c = np.cov(z, rowvar=False)
    cov += sum(c[i, j]**2 for i in range(d) for j in range(d) if i != j) / d
  return var, cov


def test_table4_regulariser_is_vicregs_variance_and_covariance():
  za, zb = views(12, 5, seed=9)
  za = za * np.linspace(0.3, 1.8, 5, dtype=np.float32)  # some dimensions below the hinge, some above
  var, cov = losses.variance_covariance(za, zb)
  rv, rc = ref_variance_covariance(za, zb)
  np.testing.assert_allclose([var, cov], [rv, rc], rtol=1e-5)
  g = jax.grad(lambda a: sum(losses.variance_covariance(a, zb)) )(za)
  assert_grad(g, numeric_grad(lambda x: sum(ref_variance_covariance(x, zb)), za))


# --- SwAV -------------------------------------------------------------------------------------------------

def ref_swav(sa, sb, t=0.1, eps=0.05, iters=3, queue=None, codes=None):
  """Official swav train loop for two crops: q of each crop from Sinkhorn (queue rows in front, then dropped),
  the other crop's −mean Σ q log softmax(s/T), / (crops − 1), / len(crops_for_assign). ``codes`` fixes q (the
  stop-gradient, for finite differences)."""
  sa, sb = np.asarray(sa, np.float64), np.asarray(sb, np.float64)
  n = len(sa)
  if codes is None:
    codes = []
    for crop, s in enumerate((sa, sb)):
      full = s if queue is None else np.concatenate([queue[crop], s])
      codes.append(ref_sinkhorn(full, eps, iters)[-n:])
  loss = 0.0
  for crop, other in ((0, sb), (1, sa)):
    x = other / t
    logp = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    loss -= np.mean(np.sum(codes[crop] * logp, axis=1))
  return loss / 2, codes


def test_sinkhorn_codes_are_equipartitioned_distributions():
  s = np.random.default_rng(0).uniform(-1, 1, size=(24, 6)).astype(np.float32)
  q = np.asarray(losses.sinkhorn(jnp.asarray(s), epsilon=0.05, iterations=3), np.float64)
  np.testing.assert_allclose(q, ref_sinkhorn(s), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)  # the last step normalises each example
  # A prototype that scores higher for every example does not attract more of the batch (the equipartition),
  # whereas a plain softmax of the scores would give it the most.
  skewed = s + np.array([0.5, 0, 0, 0, 0, 0], np.float32)
  np.testing.assert_allclose(losses.sinkhorn(jnp.asarray(skewed)), q, rtol=1e-3, atol=1e-6)
  plain = np.exp(skewed / 0.05) / np.exp(skewed / 0.05).sum(1, keepdims=True)
  assert plain.sum(0)[0] > 2 * 24 / 6 and q.sum(0)[0] < 1.25 * 24 / 6


@pytest.mark.parametrize('with_queue', [False, True])
def test_swav_value_and_gradient(with_queue):
  rng = np.random.default_rng(10)
  sa, sb = (np.tanh(rng.normal(size=(8, 5))).astype(np.float32) for _ in range(2))
  queue = np.tanh(rng.normal(size=(2, 16, 5))).astype(np.float32) if with_queue else None
  loss, m = losses.swav_loss(sa, sb, queue_scores=queue)
  ref, codes = ref_swav(sa, sb, queue=queue)
  np.testing.assert_allclose(loss, ref, rtol=1e-4)
  assert float(m['entropy']) > 0
  ga = jax.grad(lambda a: losses.swav_loss(a, sb, queue_scores=queue)[0])(sa)
  assert_grad(ga, numeric_grad(lambda x: ref_swav(x, sb, codes=codes)[0], sa), rtol=2e-3)


# --- 8 devices = 1 device -----------------------------------------------------------------------------------

def _losses_of_linear_embeddings():
  """name -> loss(w, xa, xb, axis_name) of embeddings x @ w, one per method."""
  key = jax.random.key(3)
  tw = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32) / 3  # a fixed "target network"
  queue = np.random.default_rng(2).normal(size=(24, 4)).astype(np.float32)  # MoCo v2's negatives
  return {
      'simclr': lambda w, a, b, ax: losses.simclr_loss(a @ w, b @ w, temperature=0.2, axis_name=ax)[0],
      'wmse': lambda w, a, b, ax: losses.wmse_loss(a @ w, b @ w, key=key, w_size=16, w_iter=2, axis_name=ax)[0],
      'byol': lambda w, a, b, ax: losses.byol_loss(a @ w, b @ w, a @ tw, b @ tw, axis_name=ax)[0],
      'simsiam': lambda w, a, b, ax: losses.simsiam_loss(a @ w, b @ w, a @ tw, b @ tw, axis_name=ax)[0],
      'moco_v3': lambda w, a, b, ax: losses.moco_v3_loss(a @ w, b @ w, a @ tw, b @ tw, temperature=0.2,
                                                         axis_name=ax)[0],
      'moco_v2': lambda w, a, b, ax: losses.moco_v2_loss(a @ w, b @ tw, queue, temperature=0.2, axis_name=ax)[0],
      'swav': lambda w, a, b, ax: losses.swav_loss(jnp.tanh(a @ w), jnp.tanh(b @ w), axis_name=ax)[0],
      'variance_covariance': lambda w, a, b, ax: sum(losses.variance_covariance(a @ w, b @ w, axis_name=ax)),
  }


@pytest.mark.parametrize('name', sorted(_losses_of_linear_embeddings()))
def test_8_devices_equal_1_device(name):
  """Every replica returns the global loss, and the pmean of a replicated weight's gradients is the
  single-device gradient (≤ 1e-5)."""
  loss = _losses_of_linear_embeddings()[name]
  rng = np.random.default_rng(4)
  xa = rng.normal(size=(32, 6)).astype(np.float32)
  xb = (xa + 0.3 * rng.normal(size=(32, 6))).astype(np.float32)
  w = (rng.normal(size=(6, 4)) / np.sqrt(6)).astype(np.float32)
  single, single_grad = jax.value_and_grad(loss)(w, xa, xb, None)
  values, grad = sharded_value_and_grad(loss, w, xa, xb, N_DEV)
  np.testing.assert_allclose(values, np.full(N_DEV, single), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-5, atol=1e-5 * np.abs(single_grad).max())
