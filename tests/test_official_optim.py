"""The optimisers and schedules of the methods' official code, each against a float64 NumPy transcription of it:
SwAV's apex LARC + SGD with frozen prototypes and its warmup-cosine (facebookresearch/swav main_swav.py, NVIDIA
apex LARC.py), W-MSE's Adam with L2 and its 500-iteration warmup and step drops (htdt/self-supervised train.py),
and Barlow Twins' gradient, which the official code takes from a cross-correlation all-reduced without a gradient
(facebookresearch/barlowtwins main.py), against a step that computes it so, on 8 simulated devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vicreg_jax import config as schema
from vicreg_jax import losses, methods, optim, parallel
from vicreg_jax.models import heads


def flat(tree) -> dict:
  """``{'a/b/c': float64 array}`` of a nested dict of arrays."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(k.key for k in path): np.asarray(v, np.float64) for path, v in leaves}


def run_tx(tx, params, grads_seq):
  """The parameters after each step of ``tx`` fed the gradients ``grads_seq`` (jit, as the trainer)."""
  state, p, out = tx.init(params), params, []
  update = jax.jit(tx.update)
  for grads in grads_seq:
    upd, state = update(grads, state, p)
    p = optax.apply_updates(p, upd)
    out.append(flat(p))
  return out


def displacements(steps, params) -> list:
  """Each step's parameters minus the initial ones."""
  start = flat(params)
  return [{k: v - start[k] for k, v in step.items()} for step in steps]


def assert_same_steps(got, want, params, rtol=1e-5):
  """Each step's displacement from ``params`` the same to ``rtol`` of its largest entry, plus a few float32 ulps
  of the parameters' largest entry (the rounding of the stored parameters)."""
  for step, (g, w, d) in enumerate(zip(got, want, displacements(want, params), strict=True)):
    assert set(g) == set(w)
    for k in w:
      atol = rtol * np.abs(d[k]).max() + 8 * np.finfo(np.float32).eps * np.abs(w[k]).max()
      np.testing.assert_allclose(g[k], w[k], rtol=0, atol=atol, err_msg=f'step {step}, {k}')


# --------------------------------------------------------------------------------------- SwAV: LARC and schedule

def swav_lr_schedule(base_lr, final_lr, start_warmup, epochs, warmup_epochs, iters_per_epoch):
  """main_swav.py's ``lr_schedule``, transcribed: np.linspace warmup, then its cosine, one entry per iteration
  (facebookresearch/swav@06b1b7c:main_swav.py:L178-L182)."""
  warmup = np.linspace(start_warmup, base_lr, iters_per_epoch * warmup_epochs)
  iters = np.arange(iters_per_epoch * (epochs - warmup_epochs))
  cosine = np.array([final_lr + 0.5 * (base_lr - final_lr)
                     * (1 + math.cos(math.pi * t / (iters_per_epoch * (epochs - warmup_epochs)))) for t in iters])
  return np.concatenate((warmup, cosine))


def apex_larc_sgd(params, grads_seq, lrs, wd, trust, momentum=0.9, eps=1e-8, frozen=lambda step, name: False):
  """apex ``LARC(SGD(momentum, weight_decay=wd), trust, clip=False)`` step by step, float64: the parameters after
  each step. ``frozen(step, name)``: that parameter's ``grad`` is None at that step (LARC and SGD skip it).
  NVIDIA/apex@e13873de:apex/parallel/LARC.py:L78-L104; SwAV's use: facebookresearch/swav@06b1b7c:main_swav.py:L171-L177,
  the frozen prototypes' ``p.grad = None``: L324-L328."""
  p = flat(params)
  buf, out = {}, []
  for step, grads in enumerate(grads_seq):
    for k, g in flat(grads).items():
      if frozen(step, k):
        continue
      p_norm, g_norm = np.linalg.norm(p[k]), np.linalg.norm(g)
      if p_norm != 0 and g_norm != 0:  # LARC: adaptive lr with the decay, then SGD without its own decay
        g = (g + wd * p[k]) * (trust * p_norm / (g_norm + p_norm * wd + eps))
      buf[k] = g.copy() if k not in buf else momentum * buf[k] + g  # torch SGD: the first buffer is the gradient
      p[k] = p[k] - lrs[step] * buf[k]
    out.append({k: v.copy() for k, v in p.items()})
  return out


def swav_tree(seed=0):
  """Prototypes, a projector weight and bias, a BatchNorm scale at 0 (‖p‖ = 0), and gradients for 6 steps, one
  of them 0 for the projector's bias (‖g‖ = 0)."""
  rng = np.random.default_rng(seed)
  params = {'prototypes': {'dense': {'kernel': rng.normal(size=(4, 5)).astype(np.float32)}},
            'projector': {'dense0': {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
                                     'bias': rng.normal(size=(4,)).astype(np.float32)}},
            'backbone': {'bn': {'scale': np.zeros((3,), np.float32)}}}
  grads_seq = [jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32), params) for _ in range(6)]
  grads_seq[3]['projector']['dense0']['bias'][:] = 0.0
  return params, grads_seq


def swav_config(iters_per_epoch=3):
  """SwAV's optimiser (800-epoch script: base_lr 4.8 at batch 4096 = 0.3·4096/256, final_lr 0.0048,
  start_warmup 0.3, LARC trust 0.001, wd 1e-6), with a larger decay and trust so that both are visible."""
  c = schema.base_config()
  c.method = 'swav'
  c.batch_size = 4096
  c.epochs = 4
  c.optim.update(name='larc', base_lr=0.3, weight_decay=0.05, eta=0.02, warmup_epochs=2, end_lr_factor=0.001,
                 warmup_start_factor=0.3 / 4.8, warmup_linspace=True)
  c.swav.freeze_prototypes_steps = 2
  total, warmup = c.epochs * iters_per_epoch, c.optim.warmup_epochs * iters_per_epoch
  return c, total, warmup


def test_swav_schedule_is_main_swavs_over_every_iteration():
  """The whole lr schedule of a run (ours at steps 0…total - 1) equals main_swav.py's array, element for element
  (np.linspace's warmup reaching base_lr on its last step; the cosine indexed from the end of the warmup)."""
  for epochs, warmup_epochs, per_epoch in ((4, 2, 3), (100, 10, 7)):
    c, _, _ = swav_config()
    c.epochs = epochs
    c.optim.update(warmup_epochs=warmup_epochs, weight_decay=1e-6, eta=0.001)
    schedule = methods.lr_schedule(c, epochs * per_epoch, warmup_epochs * per_epoch)
    want = swav_lr_schedule(4.8, 0.0048, 0.3, epochs, warmup_epochs, per_epoch)
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(len(want))))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=4.8 * 2**-22)  # float32 rounding of terms of the peak's size
    assert got[0] == pytest.approx(0.3) and got[warmup_epochs * per_epoch - 1] == pytest.approx(4.8)


def test_swav_larc_with_frozen_prototypes_is_apex_larc_over_steps():
  """make_optimizer with optim.name='larc' (SwAV's config) equals apex LARC + torch SGD on every parameter, the
  BatchNorm scale at 0 and the zero gradient left undecayed and unscaled as apex does, the prototypes without
  gradient, decay or momentum for their 2 frozen steps (p.grad = None), with main_swav.py's learning rates."""
  c, total, warmup = swav_config()
  tx, schedule = methods.make_optimizer(c, total, warmup)
  params, grads_seq = swav_tree()
  lrs = swav_lr_schedule(4.8, 0.0048, 0.3, c.epochs, c.optim.warmup_epochs, 3)
  want = apex_larc_sgd(params, grads_seq, lrs, wd=0.05, trust=0.02,
                       frozen=lambda step, k: step < 2 and k.startswith('prototypes'))
  got = run_tx(tx, params, grads_seq)
  assert_same_steps(got, want, params)
  assert np.all(got[1]['prototypes/dense/kernel'] == params['prototypes']['dense']['kernel'])
  assert np.abs(got[2]['prototypes/dense/kernel'] - params['prototypes']['dense']['kernel']).min() > 1e-4
  assert np.all(got[-1]['backbone/bn/scale'] != 0)  # moved by its raw gradient on step 0, then adapted


def test_frozen_prototypes_take_no_decay_into_lars_momentum():
  """Under LARS with weight decay the frozen prototypes' momentum stays empty: their first update after the
  freeze is that of a first step, ``-lr·η‖p‖·dp/‖dp‖`` with ``dp = g + wd·p`` (the official LARS skips a
  parameter whose grad is None)."""
  c, total, warmup = swav_config()
  c.optim.name = 'lars'
  tx, schedule = methods.make_optimizer(c, total, warmup)
  params, grads_seq = swav_tree(seed=1)
  got = run_tx(tx, params, grads_seq[:3])
  w = params['prototypes']['dense']['kernel'].astype(np.float64)
  dp = grads_seq[2]['prototypes']['dense']['kernel'] + 0.05 * w
  step2 = -float(schedule(2)) * 0.02 * np.linalg.norm(w) / np.linalg.norm(dp) * dp
  np.testing.assert_allclose(got[2]['prototypes/dense/kernel'] - w, step2, rtol=1e-5)
  np.testing.assert_array_equal(got[1]['prototypes/dense/kernel'], w)


def test_larc_leaves_zero_norm_parameters_and_gradients_alone():
  """optim.larc on its own: a zero parameter moves by the raw gradient (no decay, no scaling), a zero gradient
  gives no decay (the update is the momentum's alone), and with ‖p‖, ‖g‖ ≠ 0 the ratio has ``wd·‖p‖`` in its
  denominator."""
  p = {'zero': jnp.zeros((2,)), 'w': jnp.full((2,), 3.0)}
  g = {'zero': jnp.array([0.5, -1.0]), 'w': jnp.array([0.0, 4.0])}
  (after,) = run_tx(optim.larc(0.1, weight_decay=0.5, momentum=0.9, trust=0.01), p, [g])
  np.testing.assert_allclose(after['zero'], [-0.05, 0.1], rtol=1e-6)
  ratio = 0.01 * math.sqrt(18) / (4.0 + 0.5 * math.sqrt(18) + 1e-8)
  np.testing.assert_allclose(after['w'], 3.0 - 0.1 * ratio * (np.array([0.0, 4.0]) + 0.5 * 3.0), rtol=1e-6)
  (still,) = run_tx(optim.larc(0.1, weight_decay=0.5), {'w': jnp.ones((3,))}, [{'w': jnp.zeros((3,))}])
  np.testing.assert_array_equal(still['w'], 1.0)


# ---------------------------------------------------------------------------------- SimCLR: classic momentum

def simclr_lars(params, grads_seq, lrs, wd, eeta, momentum=0.9):
  """google-research/simclr (v1) ``LARSOptimizer(classic_momentum=True)`` with ``exclude_from_weight_decay=
  ['batch_normalization', 'bias']`` (the ndim-1 parameters here), float64: the learning rate inside the buffer
  (google-research/simclr@be133b3:lars_optimizer.py:L83-L122, model.py:L175-L179)."""
  p = flat(params)
  v, out = {k: np.zeros_like(x) for k, x in p.items()}, []
  for step, grads in enumerate(grads_seq):
    for k, g in flat(grads).items():
      trust = 1.0
      if p[k].ndim > 1:
        g = g + wd * p[k]
        w_norm, g_norm = np.linalg.norm(p[k]), np.linalg.norm(g)
        trust = eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
      v[k] = momentum * v[k] + lrs[step] * trust * g
      p[k] = p[k] - v[k]
    out.append({k: x.copy() for k, x in p.items()})
  return out


def test_simclr_lars_classic_momentum_is_simclrs_optimizer():
  """optim.name='lars_classic' equals SimCLR's LARS over steps of a changing learning rate (the warmup), where
  'lars' (the learning rate after the momentum) does not."""
  c = schema.base_config()
  c.method = 'simclr'
  c.batch_size = 4096
  c.optim.update(name='lars_classic', base_lr=0.3, weight_decay=0.05, eta=0.02, end_lr_factor=0.0)
  tx, schedule = methods.make_optimizer(c, 20, 5)
  params, grads_seq = swav_tree(seed=3)
  lrs = [4.8 * k / 5 for k in range(5)] + [4.8]
  want = simclr_lars(params, grads_seq, lrs, wd=0.05, eeta=0.02)
  assert_same_steps(run_tx(tx, params, grads_seq), want, params)
  c.optim.name = 'lars'
  with pytest.raises(AssertionError):
    assert_same_steps(run_tx(methods.make_optimizer(c, 20, 5)[0], params, grads_seq), want, params, rtol=1e-2)


# ----------------------------------------------------------------------------------- SimSiam: per-epoch cosine

def test_simsiam_cosine_epochs_is_main_simsiams_per_epoch_cosine():
  """'cosine_epochs' (no warmup, to 0): main_simsiam.py's ``adjust_learning_rate``, called at the start of every
  epoch, ``init_lr·(1 + cos(π·epoch/epochs))/2`` with ``init_lr = lr·batch/256``, at every iteration
  (facebookresearch/simsiam@a7bc177:main_simsiam.py:L359-L366)."""
  c = schema.base_config()
  c.method = 'simsiam'
  c.batch_size = 512
  c.epochs = 5
  c.optim.update(name='sgd', base_lr=0.05, warmup_epochs=0, end_lr_factor=0.0, schedule='cosine_epochs')
  init_lr = 0.05 * 512 / 256
  want = [init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / 5)) for epoch in range(5) for _ in range(3)]
  for per_epoch in (3, None):  # given, or from the run's length in epochs
    schedule = methods.lr_schedule(c, 15, 0, steps_per_epoch=per_epoch)
    np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(15)), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ W-MSE: Adam and schedule

def wmse_lrs(lr, epochs, iters, drop, gamma=0.2):
  """htdt/self-supervised train.py's learning rate at every iteration, transcribed: 500 warmup iterations
  ``lr·(k + 1)/500`` overwriting the group's lr, MultiStepLR(milestones = epochs - drop) stepped per epoch
  (htdt/self-supervised@d9662c8:train.py:L22-L24, L43-L54, L65-L66; cfg.py:L114-L126)."""
  milestones = [epochs - a for a in drop]
  group_lr, last_epoch, lr_warmup, out = lr, 0, 0, []
  for _ in range(epochs):
    for _ in range(iters):
      if lr_warmup < 500:
        group_lr = lr * (lr_warmup + 1) / 500
        lr_warmup += 1
      out.append(group_lr)
    last_epoch += 1  # scheduler.step(): chainable MultiStepLR
    if last_epoch in milestones:
      group_lr = group_lr * gamma ** milestones.count(last_epoch)
  return np.asarray(out)


def wmse_config():
  """W-MSE's ImageNet-100 schedule (htdt/self-supervised@d9662c8: README.md:L72 --epoch 240 --lr 2e-3; cfg.py:L112
  batch 512, L114-L126 drop [50, 25], ×0.2; L66-L68 adam_l2 1e-6)."""
  c = schema.base_config()
  c.method = 'wmse'
  c.batch_size = 512
  c.epochs = 240
  c.optim.update(name='adam', base_lr=1e-3, weight_decay=1e-6, warmup_steps=500, warmup_start_factor=1 / 500,
                 warmup_linspace=True, schedule='step', decay_epochs=(190, 215), decay_factor=0.2)
  return c


def test_wmse_schedule_is_train_pys_over_every_iteration():
  """500 warmup iterations, constant, ×0.2 from epochs 190 and 215: every iteration of a 240-epoch run of 4
  iterations per epoch (the warmup spans 125 epochs) and of 10 (50 epochs)."""
  for iters in (4, 10):
    c = wmse_config()
    total = c.epochs * iters
    schedule = methods.lr_schedule(c, total, 0, steps_per_epoch=iters)
    want = wmse_lrs(2e-3, 240, iters, drop=(50, 25))
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got[0] == pytest.approx(2e-3 / 500) and got[499] == pytest.approx(2e-3)
    assert got[190 * iters] == pytest.approx(4e-4) and got[215 * iters] == pytest.approx(8e-5)
  # Without the epoch's length the schedule takes it from the run's length in epochs.
  schedule = methods.lr_schedule(wmse_config(), 2400, 0)
  assert float(schedule(1899)) == pytest.approx(2e-3) and float(schedule(1900)) == pytest.approx(4e-4)


def torch_adam_l2(params, grads_seq, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
  """``torch.optim.Adam(weight_decay=wd)`` step by step in float64 (coupled L2, every parameter), W-MSE's
  optimiser (htdt/self-supervised@d9662c8:train.py:L39)."""
  p = flat(params)
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for step, grads in enumerate(grads_seq, start=1):
    for k, g in flat(grads).items():
      g = g + wd * p[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      denom = np.sqrt(v[k]) / math.sqrt(1 - b2**step) + eps
      p[k] = p[k] - lrs[step - 1] / (1 - b1**step) * m[k] / denom
    out.append({k: x.copy() for k, x in p.items()})
  return out


def test_wmse_adam_is_torch_adam_with_l2():
  """optim.name='adam': torch Adam with weight_decay (the decay added to the gradient, biases too), on W-MSE's
  warmup (peak 1.0 here, so that the steps are large against float32 rounding) with a decay large enough to
  matter; AdamW (decoupled, weights only) differs."""
  c = wmse_config()
  c.optim.update(base_lr=0.5, weight_decay=0.5)
  tx, schedule = methods.make_optimizer(c, 2400, 0, steps_per_epoch=10)
  params, grads_seq = swav_tree(seed=2)
  params['backbone']['bn']['scale'] = np.ones((3,), np.float32)
  want = torch_adam_l2(params, grads_seq, wmse_lrs(1.0, 240, 10, (50, 25)), wd=0.5)
  assert_same_steps(run_tx(tx, params, grads_seq), want, params)
  c.optim.name = 'adamw'
  with pytest.raises(AssertionError):
    assert_same_steps(run_tx(methods.make_optimizer(c, 2400, 0, steps_per_epoch=10)[0], params, grads_seq), want,
                      params, rtol=1e-2)


# ------------------------------------------------------------------------------ Barlow Twins' official gradient

W, LOCAL, FEATURES = 8, 4, 6
PROJECTOR = heads.Projector('16-8', axis_name=parallel.AXIS, hidden_bias=False)


def embed(params, x):
  """The projector on this device's rows (training BatchNorm over every device, as SyncBatchNorm; its running
  averages, which the output does not use, dropped)."""
  stats = {'bn0': {'mean': jnp.zeros((16,)), 'var': jnp.ones((16,))}}
  z, _ = PROJECTOR.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
  return z


def official_loss(params, x1, x2, lambd):
  """main.py's BarlowTwins.forward on one GPU, literally: BatchNorm1d(affine=False) synchronised, this GPU's
  ``c = bn(z1).T @ bn(z2) / batch_size``, then ``all_reduce(c)``, which carries no gradient: the other GPUs'
  share enters as a constant (facebookresearch/barlowtwins@8e8d284:main.py:L204-L221; SyncBatchNorm: L89; DDP's
  average of the GPUs' gradients: L98)."""
  def bn(z):
    mean = jax.lax.pmean(z.mean(0), parallel.AXIS)
    var = jax.lax.pmean(((z - mean) ** 2).mean(0), parallel.AXIS)
    return (z - mean) / jnp.sqrt(var + 1e-5)

  c = bn(embed(params, x1)).T @ bn(embed(params, x2)) / (W * LOCAL)
  c = c + jax.lax.stop_gradient(jax.lax.psum(c, parallel.AXIS) - c)
  on_diag = jnp.sum((jnp.diag(c) - 1) ** 2)
  return on_diag + lambd * (jnp.sum(c**2) - jnp.sum(jnp.diag(c) ** 2))


def exact_loss(params, x1, x2, lambd):
  """The project's loss (losses.barlow_twins_loss), whose replicas' gradients average to the exact one."""
  return losses.barlow_twins_loss(embed(params, x1), embed(params, x2), lambd=lambd, axis_name=parallel.AXIS)[0]


def ddp_gradients(loss):
  """Each device's gradient of ``loss`` on its rows, averaged over the devices (DDP), as a jit function."""
  def per_device(params, x1, x2):
    return jax.lax.pmean(jax.grad(loss)(params, x1, x2, 0.0051), parallel.AXIS)

  mesh = Mesh(np.asarray(jax.devices()[:W]), (parallel.AXIS,))
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                               out_specs=P(), check_vma=False))


def barlow_config(world_size=0, weight_decay=0.05, bias_lr_factor=0.024):
  """Barlow Twins' LARS (lr-biases/lr-weights 0.024) at a decay and trust coefficient large enough to show."""
  c = schema.base_config()
  c.method = 'barlow_twins'
  c.batch_size = W * LOCAL
  c.optim.update(base_lr=4.0, weight_decay=weight_decay, eta=0.05)
  c.barlow_twins.update(official_gradient_world_size=world_size, bias_lr_factor=bias_lr_factor)
  return c


def train(grad_fn, config, params, batches):
  """The parameters after each step: ``grad_fn`` on the step's batch, ``make_optimizer(config)``."""
  tx, _ = methods.make_optimizer(config, 10, 0)
  state, out = tx.init(params), []
  for x1, x2 in batches:
    upd, state = tx.update(grad_fn(params, x1, x2), state, params)
    params = optax.apply_updates(params, upd)
    out.append(flat(params))
  return out


def test_barlow_twins_official_gradient_world_size_is_the_official_per_gpu_gradient():
  """Four LARS steps on 8 devices: the exact gradient with ``official_gradient_world_size=8`` gives the parameters
  of the official gradient (each device back-propagating its own share of c, DDP's average) under plain LARS, to
  float32 rounding; so does LARS with 8× the weight decay and biases/BatchNorm at 1/8 of the learning rate; the
  exact gradient without the setting does not."""
  rng = np.random.default_rng(0)
  params = PROJECTOR.init(jax.random.key(0), jnp.ones((2, FEATURES)), train=False)['params']
  batches = [(jnp.asarray(rng.normal(size=(W * LOCAL, FEATURES)), jnp.float32),) * 2 for _ in range(4)]
  batches = [(a, a + 0.3 * jnp.asarray(rng.normal(size=a.shape), jnp.float32)) for a, _ in batches]
  official, exact = ddp_gradients(official_loss), ddp_gradients(exact_loss)
  g_off, g_exact = official(params, *batches[0]), exact(params, *batches[0])
  for a, b in zip(jax.tree.leaves(g_off), jax.tree.leaves(g_exact)):  # the official gradient: 1/W of the exact one
    np.testing.assert_allclose(a * W, b, rtol=0, atol=2e-5 * np.abs(b).max())
  want = train(official, barlow_config(), params, batches)
  ours = train(exact, barlow_config(world_size=W), params, batches)
  equivalent = train(exact, barlow_config(weight_decay=0.05 * W, bias_lr_factor=0.024 / W), params, batches)
  for got in (ours, equivalent):
    assert_same_steps(got, want, params)
  plain = train(exact, barlow_config(), params, batches)
  with pytest.raises(AssertionError):
    assert_same_steps(plain, want, params, rtol=1e-1)
