"""Every configuration key with its default; the files in configs/ start from :func:`base_config`.

The returned ConfigDict is locked, so a misspelt key in a config file or an unknown ``--config.key=value``
fails at start instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from vicreg_jax.data.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPE_DEFAULTS, full_recipe


def view_recipe(**keys) -> dict:
  """A view recipe with every key of :data:`augment.RECIPE_DEFAULTS` (so ``--config.augment.view1.KEY=…`` works
  for any key), ``keys`` overriding the "off" defaults."""
  return full_recipe(keys)


def imagenet_views(size: int = 224) -> tuple[dict, dict]:
  """The official VICReg ImageNet recipe: view 1 always blurred, view 2 rarely blurred and sometimes solarized."""
  common = dict(RECIPE_DEFAULTS, crop_size=size, crop_scale=(0.08, 1.0), crop_method='bicubic', flip_p=0.5, jitter_p=0.8,
                jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.2, blur_sigma=(0.1, 2.0), blur_kernel_fraction=0.1,
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
  return dict(common, blur_p=1.0, solarize_p=0.0), dict(common, blur_p=0.1, solarize_p=0.2)


def base_config() -> ml_collections.ConfigDict:
  """Every pretraining key, defaulting to the paper's ImageNet recipe (configs/imagenet.py adds only bfloat16 and
  its logging and checkpoint periods)."""
  c = ml_collections.ConfigDict()
  c.job = 'pretrain'
  c.seed = 0
  c.batch_size = 2048         # global, over all devices and hosts
  c.epochs = 1000
  c.num_steps = 0             # > 0 overrides epochs
  c.max_steps_per_run = 0     # > 0: stop this invocation after that many steps, with a checkpoint (jobs with a
                              # time limit); the same command continues from there
  c.log_every_steps = 50      # a progress line, the collapse diagnostics (repr/…, emb/…)
  c.metrics_every_steps = 10  # the step metrics (loss, terms, …) as their means over the steps since the last write
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  # A NaN or inf in the loss or the gradients (checked on every step, one step late, without a host sync):
  # 'stop' ends the run with one line naming the step and the term, the checkpoints intact; 'skip' drops the
  # step's update (parameters, optimiser and method state unchanged), counted and logged.
  c.nonfinite = 'stop'
  # A checkpoint that cannot be read but whose files are whole (a storage error, out of memory): retried with
  # backoff for this long, then the run stops with one line, every checkpoint left where it is. Only a checkpoint
  # whose own files show damage (missing, truncated, not decoding) is set aside (vicreg_jax/checkpoints.py).
  c.restore_retry_seconds = 600.0
  c.debug_nan_at_step = 0     # tests: the loss becomes NaN at this step (0: never)
  c.spectrum_every_steps = 0  # singular-value spectra as TensorBoard images (0: with each checkpoint)
  c.diagnostics_max_rows = 1024  # the collapse diagnostics' SVD: on a subsample of this many rows of the batch
  # JAX's persistent compilation cache: 'workdir' (WORKDIR/compilation_cache, unless JAX_COMPILATION_CACHE_DIR
  # names one), a directory (gs:// allowed; one can serve several runs) or '' (JAX's own setting). A restart then
  # loads the compiled step instead of compiling it again; programs compiled in less than
  # compilation_cache_min_seconds are not stored.
  c.compilation_cache = 'workdir'
  c.compilation_cache_min_seconds = 1.0
  c.profile_steps = ''        # 'FIRST-LAST' (e.g. '20-25'): a profiler trace of those steps in WORKDIR/profile
  c.prefetch_to_device = 2    # batches put on the devices ahead of the step (0: each when the step needs it)
  c.grad_accum_steps = 1      # > 1: micro-batches through the backbone per step (memory); see vicreg_jax/step.py
  # How sums over devices add the devices' values (vicreg_jax/collectives.py): 'native' (jax.lax's collectives),
  # 'ordered' (in device order: bitwise the same on any split of the devices into processes; tests, debugging,
  # slower) or 'reversed' (the reverse order: against 'ordered', what rounding alone changes in a run).
  c.reductions = 'native'
  # A linear classifier on stop-gradient representations, trained alongside (never touches the backbone);
  # its train top-1 per epoch is an early collapse warning.
  c.online_probe = ml_collections.ConfigDict(dict(enabled=True, lr=0.1, momentum=0.9))

  c.model = ml_collections.ConfigDict(dict(
      arch='resnet50', width_multiplier=1.0, stem='imagenet', projector='8192-8192-8192', dtype='float32',
      projector_hidden_bias=True,   # biases before the projector's BatchNorms (official VICReg; redundant)
      projector_bn=True,            # False: no BatchNorm in the projector or predictor (ablations)
      projector_output_bn=False,    # a BatchNorm without affine after the projector's last layer (SimSiam)
      remat=False))                 # recompute each residual block's activations in the backward pass (memory)
  # The self-supervised method (vicreg_jax.methods.METHODS) and, in a section named like it, its loss's
  # keyword arguments and optimiser keys.
  c.method = 'vicreg'
  # gather_dtype: the embeddings' dtype in the loss's all-gather over the devices ('float32', or 'bfloat16': half
  # the traffic, the statistics still in float32; losses.vicreg_loss says what it rounds).
  c.vicreg = ml_collections.ConfigDict(dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4,
                                            gather_dtype='float32'))
  # Official Barlow Twins: λ 0.0051; biases and BatchNorm at lr-biases 0.0048 against lr-weights 0.2.
  c.barlow_twins = ml_collections.ConfigDict(dict(lambd=0.0051, eps=1e-5, bias_lr_factor=0.024))
  # W-MSE (htdt/self-supervised): its own head (official Linear-BN-ReLU-Linear to 64-d, used instead of
  # model.projector: the whitening needs D < w_size), whitening of random sub-batches of w_size, w_iter draws,
  # shrinkage eps (official 0).
  c.wmse = ml_collections.ConfigDict(dict(projector='1024-64', w_size=128, w_iter=1, eps=0.0))
  # SimCLR: NT-Xent temperature (official ImageNet 0.1, CIFAR 0.5).
  c.simclr = ml_collections.ConfigDict(dict(temperature=0.1))
  # BYOL (deepmind-research/byol, 1000 epochs): the predictor MLP's hidden sizes (its output is the
  # projector's), EMA base decay τ (cosine to 1);
  # std_coeff / cov_coeff add VICReg's variance / covariance terms (the VICReg paper's Table 4: 1 and 0.01).
  c.byol = ml_collections.ConfigDict(dict(predictor='4096', tau_base=0.996, std_coeff=0.0, cov_coeff=0.0))
  # SimSiam (facebookresearch/simsiam): the predictor's hidden sizes ('' = none, the collapsing ablation), the
  # predictor's learning rate held at its peak (--fix-pred-lr), and the same optional VICReg terms.
  c.simsiam = ml_collections.ConfigDict(dict(predictor='512', fixed_predictor_lr=True, std_coeff=0.0,
                                             cov_coeff=0.0))
  # SwAV (facebookresearch/swav): prototypes, softmax temperature, Sinkhorn-Knopp ε and iterations, prototypes
  # frozen for the first steps, and a queue of the last queue_length embeddings per crop (0: none; official
  # 3840 for batch 256) filled from queue_start_step.
  c.swav = ml_collections.ConfigDict(dict(
      num_prototypes=3000, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, freeze_prototypes_steps=313,
      queue_length=0, queue_start_step=0))
  c.optim = ml_collections.ConfigDict(dict(
      name='lars',  # or 'sgd' (SimSiam; eta unused) or 'adamw' (small demos; momentum and eta unused)
      base_lr=0.2, weight_decay=1e-6, momentum=0.9, eta=0.001, warmup_epochs=10, end_lr_factor=0.001))

  # source: 'tfds' (``name`` prepared under ``data_dir``), 'digits', or 'folder' (``data_dir`` holds
  # CLASS/*.jpg|jpeg|png, or train/CLASS/... and val/CLASS/...; without val/, ``val_fraction`` of every class is
  # held out as 'validation'). tf.data: ``threadpool_size`` is the private thread pool per pipeline (0: TF's
  # shared pool), ``shuffle_buffer`` examples (TFDS; encoded bytes when the views crop), ``prefetch`` batches.
  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='imagenet2012', train_split='train', data_dir=ml_collections.FieldReference(
          None, field_type=str), val_fraction=0.0, image_size=224, channels=3, shuffle_buffer=10_000,
      threadpool_size=0, prefetch=2,
      path='',  # source 'arrays': the .npz of images and labels; '{split}' in it is replaced by the split's name
      cache=False))  # TFDS: keep this host's share in memory after one pass (as read: encoded or decoded)
  view1, view2 = imagenet_views()
  # on_device: the host does only the geometric part of each view (crop, affine, shift, flip) and sends uint8
  # (a quarter of float32's host-to-device traffic); the colour part (jitter, grayscale, blur, solarize,
  # normalisation) runs in the jit step on the accelerator, same distribution (data/device_augment.py). False:
  # all on the host, float32 sent (needed for recipes with pixel noise, which uint8 would clip).
  c.augment = ml_collections.ConfigDict(dict(view1=view1, view2=view2, on_device=True))

  c.eval = ml_collections.ConfigDict(dict(
      final_probe=False, test_split='validation', labels_per_class=5, draws=5, batch_size=256,
      max_train_examples=0, max_test_examples=0))
  c.lock()
  return c


def imagenet_config() -> ml_collections.ConfigDict:
  """The ImageNet runs (configs/imagenet*.py): the paper's recipe in bfloat16, a progress line every 100 steps,
  a checkpoint every 2500, a shuffle buffer of 50,000 encoded images."""
  c = base_config()
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.model.dtype = 'bfloat16'
  c.data.shuffle_buffer = 50_000
  return c


def digits_config() -> ml_collections.ConfigDict:
  """The digits demo (configs/digits.py, whose docstring says why): what every method's digits config starts
  from. 8×8 digits upsampled to 16×16, a 3-layer ConvNet, projector 512³, AdamW, 150 epochs, shift /
  brightness / noise / cutout views, the end-of-run probe on the test split."""
  c = base_config()
  c.batch_size = 256
  c.epochs = 150
  c.log_every_steps = 100
  c.checkpoint_every_steps = 200
  c.model.update(arch='convnet', projector='512-512-512', projector_hidden_bias=False)  # AdamW: see heads.Projector
  c.optim.update(name='adamw', base_lr=2e-3, weight_decay=1e-4)
  c.data.update(source='digits', name='digits', image_size=16, channels=1)
  view = view_recipe(translate=2, jitter_p=1.0, jitter=(0.4, 0.0, 0.0, 0.0), noise_std=0.1, cutout_p=0.5,
                     cutout_size=3)
  c.augment.update(view1=view, view2=dict(view), on_device=False)  # pixel noise: the host does it all
  c.eval.update(final_probe=True, test_split='test', batch_size=512)
  return c


def eval_job_config() -> ml_collections.ConfigDict:
  """Keys of the linear-evaluation (``job='linear'``) and fine-tuning (``job='finetune'``) jobs, defaulting to
  the official ImageNet linear protocol. The backbone comes from the pretraining run's own config.json."""
  c = ml_collections.ConfigDict()
  c.job = 'linear'
  c.seed = 0
  c.pretrain_workdir = ''     # the pretraining run's --workdir (required)
  c.checkpoints = 'all'       # 'all': each checkpoint as it lands; 'latest': skip to the newest; 'final' only
  c.from_scratch = False      # instead: the same backbone freshly initialised (baselines; results key '0')
  c.poll_seconds = 60.0
  c.timeout_seconds = 0.0     # give up after this long without a new checkpoint (0: wait for ever)
  c.start_timeout_seconds = 600.0  # give up after this long if pretrain_workdir has no config.json yet (0: at once)
  c.batch_size = 256
  c.epochs = 100
  c.log_every_steps = 100     # a progress line
  c.metrics_every_steps = 10  # the head's train loss and top-1, as their means over the steps since the last write
  c.checkpoint_every_steps = 1000
  c.nonfinite = 'stop'        # a NaN/inf in the head's loss or gradients: 'stop' (one line) or 'skip' the step
  c.restore_retry_seconds = 600.0  # as in pretraining: for the pretraining checkpoints and the head's own
  c.reductions = 'native'    # 'native', 'ordered' or 'reversed', as in pretraining (vicreg_jax/collectives.py)
  # The classifier's optimiser (SGD, cosine per epoch, lr per group) and protocol.
  c.classifier = ml_collections.ConfigDict(dict(
      head_lr=0.02, backbone_lr=0.0, weight_decay=1e-6, momentum=0.9, head_init_std=0.01,
      batchnorm='per_device',  # fine-tuning: each device's batch statistics (official: DDP, no SyncBN) or 'sync'
      report='best',           # test top-1 of the 'best' epoch, tested after each (official), or of the 'last'
      test_every_epochs=1))    # the test top-1/top-5 written every this many epochs (official: 1; 0: at the end)
  c.features = ml_collections.ConfigDict(dict(
      cache=False,            # extract frozen features once (no train augmentation): small datasets
      standardize=False))     # scale cached features by the training features' mean/std (BN without affine)
  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='imagenet2012', train_split='train', test_split='validation',
      data_dir=ml_collections.FieldReference(None, field_type=str), val_fraction=0.0, labels_per_class=0, channels=3,
      image_size=0,           # in-memory (digits) images: 0 takes the pretraining run's
      path='',                # source 'arrays': the .npz file ('{split}' in it: the split's name), as pretraining
      shuffle_buffer=10_000, threadpool_size=0, prefetch=2, cache=False))
  c.transforms = ml_collections.ConfigDict(dict(
      # Official: RandomResizedCrop(224) (bilinear) + flip; validation Resize(256) (bilinear) + CenterCrop(224).
      train=dict(RECIPE_DEFAULTS, crop_size=224, crop_scale=(0.08, 1.0), crop_method='bilinear', flip_p=0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD),
      eval=dict(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)))
  c.lock()
  return c
