"""Each method's official evaluation protocol (linear, and semi-supervised on 1% / 10% of the labels), and how an
evaluation job's config resolves it.

The evaluation jobs' protocol-controlled keys (:data:`KEYS`) default to None. ``config.protocol`` names the
table that fills them: ``'auto'`` (the pretraining run's ``method``, from its config.json; a converted workdir
records it with ``convert_weights --config.method=NAME``), a method's name, or ``'none'`` (the config's own
values; keys it leaves None take :data:`DEFAULTS`, VICReg's linear protocol). A key the config sets (in the file
or on the command line) always wins. :func:`resolve` returns the filled config, with ``protocol`` set to the
table it used, and one line saying what it chose; the job prints the line and writes the config to its
config.json.

Linear protocols (frozen backbone, BatchNorm in inference mode, train on the whole train split, test on the
validation split); sources cited as ``repository@commit:file:Lnn``:

========  ==============================================================================================
method    protocol
========  ==============================================================================================
vicreg    SGD momentum 0.9, head lr 0.02, wd 1e-6, batch 256, 100 epochs, cosine per epoch, head N(0, 0.01), bilinear
          crop / resize 256 + centre 224, best epoch (facebookresearch/vicreg@4e12602:README.md:L91,
          evaluate.py:L58-84, L151-153, L167-168, L193-210, L280-281)
barlow_   as VICReg's, head lr 0.3 (facebookresearch/barlowtwins@8e8d284:README.md:L67; evaluate.py:L35-44,
twins     L85-86, L103-104, L125-136, L190-191)
byol      SGD Nesterov 0.9, lr 0.2 × B/256, B 4096 (lr 3.2), cosine per step to 0, no warmup, no wd, 80 epochs,
          hk.Linear's init, random crop + flip, centre crop 224/256, bicubic, last (google-deepmind/
          deepmind-research@f5de0ed: byol/configs/eval.py:L29, L38-45; byol/utils/schedules.py:L27-53;
          byol/main_loop.py:L37; byol/eval_experiment.py:L151, L299-301, L329-330; byol/utils/dataset.py:L184-201,
          L247-267). The paper's 74.3% took the best of 5 lrs on a 10,000-image split of train
          (byol/README.md:L92-98, dataset.py:L177): see docs/evaluation.md for that sweep. The paper (Grill et al.
          2020 arXiv:2006.07733v3, App. C.1) states lrs {0.4, 0.3, 0.2, 0.1, 0.05}, batch 1024, 80 epochs, no wd,
          and a 10,009-image local validation set; the code's default batch is 4096 (main_loop.py:L37).
simclr    (v1) SGD Nesterov 0.9 (google-research/simclr@be133b3:model.py:L168-170), lr 0.1 × B/256, B 4096,
          90 epochs, wd 1e-6, no warmup (simclr@383d414:README.md:L134-146, its ImageNet linear-eval command; the
          paper, Chen et al. 2020 arXiv:2002.05709 App. B.6, gives 0.1 × B/256 and 90 epochs, the rest "similar" to
          §B.5, which uses no weight decay), cosine per step (model_util.py:L50-68), wd as an L2 loss on every non-BN
          variable (model_util.py:L31-41), zero-initialised head (run.py:L120-122, model.py:L202-212), random crop +
          flip bicubic, centre crop 87.5% bicubic (data_util.py:L29, L195-217, L274-295), last
simsiam   apex LARC (trust 0.001, no clipping) around SGD momentum 0.9, lr 0.1 × B/256, B 4096, wd 0, 90 epochs,
          cosine per epoch, head N(0, 0.01), bilinear, best (facebookresearch/simsiam@a7bc177:main_lincls.py:L44-59,
          L160-161, L188, L226-232, L264-290, L307-309, L491-495; README.md:L41-51)
swav      SGD momentum 0.9 (not Nesterov), lr 0.3, wd 1e-6, batch 256 (32 × 8 GPUs), 100 epochs, cosine per epoch to
          0, head N(0, 0.01), bilinear, best (facebookresearch/swav@06b1b7c:eval_linear.py:L62-75, L103-117,
          L170-186, L249-251, L375-376; README.md:L114)
moco_v3   SGD momentum 0.9, lr 0.1 × B/256 (ResNet) or 3 × B/256 (ViT: CONFIG.md:L144, L174), B 1024, 90 epochs,
          wd 0, cosine per epoch to 0, head N(0, 0.01) with zero bias, random crop + flip, resize 256 + centre 224
          bilinear, best (facebookresearch/moco-v3@c349e6e:main_lincls.py:L49-L63, L168-L169, L196, L236-L238,
          L273-L274, L290-L291, L314-L315, L499-L502); the pretraining run's ``model.arch`` picks the row
moco_v2   SGD momentum 0.9, lr 30, batch 256, 100 epochs, × 0.1 at epochs 60 and 80, wd 0, head N(0, 0.01) with zero
          bias, random crop + flip, resize 256 + centre 224 bilinear, best (facebookresearch/moco@132aea9:
          main_lincls.py:L57, L69, L79, L87, L92, L96, L240-L241, L354, L381-L382, L412, L604-L610; README.md:L60-L63)
wmse      a linear layer on cached features of un-augmented images: Adam lr 1e-2 decayed exponentially per epoch to
          1e-6 over 500 epochs, wd 5e-6 (L2), batch 1000, nn.Linear's init, the end's figures
          (htdt/self-supervised@d9662c8:eval/sgd.py:L6-25; eval/get_data.py:L4-17; datasets/imagenet.py:L18-41;
          datasets/base.py:L47-54); published for ImageNet-100 only
========  ==============================================================================================

Semi-supervised (the whole network fine-tuned on ``imagenet2012_subset/1pct`` or ``/10pct``, the SimCLR subsets
the official code downloads; ``classifier.labels_percent`` picks the row):

- vicreg: backbone / head lr 0.03 / 0.08 (1%), 0.01 / 0.1 (10%), wd 0, 20 epochs, batch 256, cosine per epoch,
  ghost BatchNorm over groups of 32 (one node of 8 GPUs under DDP without SyncBN), best (README.md:L99, L105;
  evaluate.py:L141-168, L222-229).
- barlow_twins: 1%: 0.005 / 0.5, cosine per epoch (README.md:L75; evaluate.py:L96-104, L146-148). 10%: the paper's
  one setting for both subsets (Zbontar et al. 2021, ICML version, App. B.2): 0.002 / 0.5, × 0.2 after epochs 12
  and 16 (the README has no 10% command; it raised the 1% backbone lr from the paper's 0.002 to 0.005 in
  barlowtwins@046eec3). Both: 20 epochs, SGD momentum 0.9, wd 0, batch 256, ghost BatchNorm of 32 (evaluate.py).
- swav: trunk / head 0.02 / 5 (1%), 0.01 / 0.2 (10%), 20 epochs, SGD momentum 0.9, wd 0, × 0.2 at epochs 12
  and 16, batch 256, SyncBatchNorm, head nn.Linear's init, best (README.md:L124-138; eval_semisup.py:L61-69, L140,
  L169-186, L334-335; src/resnet50.py:L203, L219-224).
- simclr (v1 paper, Chen et al. 2020 arXiv:2002.05709 App. B.5; the code has only the mechanism): SGD Nesterov 0.9,
  lr 0.05 × B/256 for every parameter, B 4096, no warmup, no regularisation (no wd), 60 epochs (1%) / 30 (10%),
  random crop 224 + flip, test resize 256 + centre 224; cosine per step (the code's), global BatchNorm
  (run.py:L206 ``global_bn``), zero-initialised head, bicubic, last.
- byol (Grill et al. 2020 arXiv:2006.07733v3, App. C.1 "Semi-supervised learning on ImageNet", which follows
  SimCLR's protocol): SGD Nesterov 0.9, batch 1024, no wd or other regularisation, random crop 224 + flip, test
  resize 256 bicubic + centre 224. The lr and the epochs are a sweep, lr in {0.005, 0.01, 0.02, 0.05, 0.1} and
  epochs in {30, 50}, picked on a local validation split; the paper states no default. Chosen here: lr 0.05 × B/256
  for every parameter (in the sweep, and SimCLR's §B.5 value; × B/256 as byol/utils/schedules.py:L34 scales every
  lr), 50 epochs (1%) / 30 (10%) (the sweep's values nearest SimCLR's 60 / 30), cosine per step without warmup (the
  released eval code's schedule, eval_experiment.py:L359-363), hk.Linear's head, global BatchNorm (not stated; the
  released code's fine-tuning mode, freeze_backbone=False, uses per-device hk.BatchNorm), last. Say so when
  quoting a figure.
- simsiam, wmse, moco_v3, moco_v2: no semi-supervised protocol published; we use VICReg's rows.

Not followed: SwAV normalises with std 0.228 for red (eval_linear.py:L104) where we use 0.229; BYOL and SimCLR
crop the centre then resize (we resize the shorter side to 256 then crop 224: the same window up to rounding);
W-MSE's ImageNet-100 was stored pre-resized (we resize 256 + centre 224 before caching).
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections

from vicreg_jax import errors
from vicreg_jax.config import Rule

# The keys a protocol sets (dotted), each None in eval_job_config until resolved.
KEYS = ('batch_size', 'epochs', 'classifier.optimizer', 'classifier.head_lr', 'classifier.backbone_lr',
        'classifier.scale_lr', 'classifier.weight_decay', 'classifier.momentum', 'classifier.lr_schedule',
        'classifier.lr_decay_epochs', 'classifier.lr_decay_factor', 'classifier.head_init',
        'classifier.head_init_std', 'classifier.batchnorm', 'classifier.report', 'features.cache',
        'transforms.train.crop_method', 'transforms.eval.method')

# VICReg's linear protocol: every protocol's starting point, and what protocol='none' fills unset keys with.
DEFAULTS = {
    'batch_size': 256, 'epochs': 100, 'classifier.optimizer': 'sgd', 'classifier.head_lr': 0.02,
    'classifier.backbone_lr': 0.0, 'classifier.scale_lr': False, 'classifier.weight_decay': 1e-6,
    'classifier.momentum': 0.9, 'classifier.lr_schedule': 'cosine', 'classifier.lr_decay_epochs': (),
    'classifier.lr_decay_factor': 0.1, 'classifier.head_init': 'normal', 'classifier.head_init_std': 0.01,
    'classifier.batchnorm': 'ghost', 'classifier.report': 'best', 'features.cache': False,
    'transforms.train.crop_method': 'bilinear', 'transforms.eval.method': 'bilinear',
}

_BICUBIC = {'transforms.train.crop_method': 'bicubic', 'transforms.eval.method': 'bicubic'}
_BYOL = dict(_BICUBIC, **{'batch_size': 4096, 'classifier.optimizer': 'nesterov', 'classifier.scale_lr': True,
                          'classifier.lr_schedule': 'cosine_steps', 'classifier.report': 'last'})

# Linear evaluation: what differs from DEFAULTS (sources in the module docstring).
LINEAR: dict[str, dict[str, Any]] = {
    'vicreg': {},
    'barlow_twins': {'classifier.head_lr': 0.3},
    'byol': dict(_BYOL, **{'epochs': 80, 'classifier.head_lr': 0.2, 'classifier.weight_decay': 0.0,
                           'classifier.head_init': 'haiku'}),
    'simclr': dict(_BYOL, **{'epochs': 90, 'classifier.head_lr': 0.1, 'classifier.head_init_std': 0.0}),
    'simsiam': {'batch_size': 4096, 'epochs': 90, 'classifier.optimizer': 'larc', 'classifier.head_lr': 0.1,
                'classifier.scale_lr': True, 'classifier.weight_decay': 0.0},
    'swav': {'classifier.head_lr': 0.3},
    'moco_v3': {'batch_size': 1024, 'epochs': 90, 'classifier.head_lr': 0.1, 'classifier.scale_lr': True,
                'classifier.weight_decay': 0.0},
    'moco_v2': {'classifier.head_lr': 30.0, 'classifier.weight_decay': 0.0, 'classifier.lr_schedule': 'step',
                'classifier.lr_decay_epochs': (60, 80), 'classifier.lr_decay_factor': 0.1},
    'wmse': {'batch_size': 1000, 'epochs': 500, 'classifier.optimizer': 'adam', 'classifier.head_lr': 1e-2,
             'classifier.weight_decay': 5e-6, 'classifier.lr_schedule': 'exponential',
             'classifier.lr_decay_factor': 1e-4, 'classifier.head_init': 'torch', 'classifier.report': 'last',
             'features.cache': True},
}

_VICREG_SEMI = {'epochs': 20, 'classifier.weight_decay': 0.0}
_SIMCLR_SEMI = dict(_BYOL, **{'classifier.head_lr': 0.05, 'classifier.backbone_lr': 0.05,
                              'classifier.weight_decay': 0.0, 'classifier.head_init_std': 0.0,
                              'classifier.batchnorm': 'sync'})
# BYOL's App. C.1: SimCLR's optimiser and no wd, at batch 1024; lr (0.05 × B/256) and epochs chosen from its sweep.
_BYOL_SEMI = dict(_SIMCLR_SEMI, **{'batch_size': 1024, 'classifier.head_init': 'haiku'})
# Barlow Twins' paper, App. B.2 (1% and 10% alike): × 0.2 after epochs 12 and 16.
_BARLOW_PAPER_STEPS = {'classifier.lr_schedule': 'step', 'classifier.lr_decay_epochs': (12, 16),
                       'classifier.lr_decay_factor': 0.2}
_SWAV_SEMI = {'epochs': 20, 'classifier.weight_decay': 0.0, 'classifier.lr_schedule': 'step',
              'classifier.lr_decay_epochs': (12, 16), 'classifier.lr_decay_factor': 0.2,
              'classifier.head_init': 'torch', 'classifier.batchnorm': 'sync'}


def _lrs(backbone: float, head: float) -> dict:
  return {'classifier.backbone_lr': backbone, 'classifier.head_lr': head}


# What differs for a ViT backbone (the pretraining run's model.arch vit_*), on top of the method's LINEAR row.
LINEAR_VIT: dict[str, dict[str, Any]] = {'moco_v3': {'classifier.head_lr': 3.0}}

# Semi-supervised fine-tuning, by (method, percent of the labels): what differs from DEFAULTS.
SEMI: dict[tuple[str, int], dict[str, Any]] = {
    ('vicreg', 1): dict(_VICREG_SEMI, **_lrs(0.03, 0.08)),
    ('vicreg', 10): dict(_VICREG_SEMI, **_lrs(0.01, 0.1)),
    ('barlow_twins', 1): dict(_VICREG_SEMI, **_lrs(0.005, 0.5)),
    ('barlow_twins', 10): dict(_VICREG_SEMI, **_lrs(0.002, 0.5), **_BARLOW_PAPER_STEPS),  # paper App. B.2
    ('swav', 1): dict(_SWAV_SEMI, **_lrs(0.02, 5.0)),
    ('swav', 10): dict(_SWAV_SEMI, **_lrs(0.01, 0.2)),
    ('simclr', 1): dict(_SIMCLR_SEMI, epochs=60),
    ('simclr', 10): dict(_SIMCLR_SEMI, epochs=30),
    ('byol', 1): dict(_BYOL_SEMI, epochs=50),  # lr and epochs: one point of the paper's sweep (see above)
    ('byol', 10): dict(_BYOL_SEMI, epochs=30),
    ('simsiam', 1): dict(_VICREG_SEMI, **_lrs(0.03, 0.08)),  # none published: VICReg's
    ('simsiam', 10): dict(_VICREG_SEMI, **_lrs(0.01, 0.1)),
    ('wmse', 1): dict(_VICREG_SEMI, **_lrs(0.03, 0.08)),
    ('wmse', 10): dict(_VICREG_SEMI, **_lrs(0.01, 0.1)),
    ('moco_v3', 1): dict(_VICREG_SEMI, **_lrs(0.03, 0.08)),
    ('moco_v3', 10): dict(_VICREG_SEMI, **_lrs(0.01, 0.1)),
    ('moco_v2', 1): dict(_VICREG_SEMI, **_lrs(0.03, 0.08)),
    ('moco_v2', 10): dict(_VICREG_SEMI, **_lrs(0.01, 0.1)),
}


def table(name: str, job: str, percent: int = 100, arch: str = '') -> dict[str, Any]:
  """Every key of protocol ``name`` ('none' or a method) for ``job`` ('linear' or 'finetune'; fine-tuning on
  ``percent`` % of the labels) on a backbone ``arch`` (the pretraining run's ``model.arch``: a ViT's linear row
  may differ, :data:`LINEAR_VIT`), or a :class:`errors.ConfigError` for a row no source defines."""
  if name == 'none':
    return dict(DEFAULTS)
  if name not in LINEAR:
    raise errors.ConfigError(f'config.protocol: no evaluation protocol for method {name!r}; known: '
                             f'{", ".join(sorted(LINEAR))}, or protocol=none with the classifier keys set')
  if job == 'linear':
    return {**DEFAULTS, **LINEAR[name], **(LINEAR_VIT.get(name, {}) if arch.startswith('vit') else {})}
  if (name, percent) not in SEMI:
    raise errors.ConfigError(
        f'config.protocol: {name} has semi-supervised rows for 1% and 10% of the labels, not '
        f'classifier.labels_percent={percent}; set --config.protocol=none and the classifier keys')
  return {**DEFAULTS, **SEMI[(name, percent)]}


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    if part not in node:
      return _ABSENT
    node = node[part]
  return node


_ABSENT = object()  # a key the config does not hold (e.g. transforms.train = {}): the protocol leaves it so, but
                    # for the evaluation transform's interpolation, which the job always reads


def _put(config, key: str, value) -> None:
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def resolve(config: ml_collections.ConfigDict, pretrain_method: Optional[str],
            pretrain_arch: str = '') -> tuple[Any, str]:
  """``(config with every protocol key it left None filled from its protocol, one line saying which protocol
  and which keys the config set itself)``. ``pretrain_method``: the pretraining run's method (for 'auto');
  ``pretrain_arch``: its ``model.arch`` (a ViT's row of a method may differ).
  The result is an unlocked copy whose ``protocol`` names the table used."""
  name = config.protocol
  how = ''
  if name == 'auto':
    if not pretrain_method:
      raise errors.ConfigError("config.protocol='auto' needs the pretraining run's method; name one "
                               '(--config.protocol=NAME) or use none')
    name, how = pretrain_method, ' (auto: the pretraining run\'s method)'
  values = table(name, config.job, config.classifier.labels_percent, pretrain_arch or '')
  out = ml_collections.ConfigDict(config.to_dict())
  explicit = []
  for key, value in values.items():
    current = _get(out, key)
    if current is None or (current is _ABSENT and key == 'transforms.eval.method'):  # eval: a dict given whole
      _put(out, key, value)
    elif current is not _ABSENT and current != value and not _same(current, value):
      explicit.append(f'{key}={current!r}')
  out.protocol = name
  _check(out)
  return out, _line(out, name + how, explicit)


def _same(a, b) -> bool:
  return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)


def _check(config) -> None:
  """One line for resolved values that cannot work together."""
  cl = config.classifier
  epochs = cl.lr_decay_epochs
  if Rule('ints', 1).problem(epochs):
    raise errors.ConfigError(f'config.classifier.lr_decay_epochs must be a tuple of epochs >= 1, not {epochs!r}')


def _line(config, name: str, explicit: list) -> str:
  """The resolved protocol in one line."""
  cl = config.classifier
  scale = f' x {config.batch_size}/256' if cl.scale_lr else ''
  lrs = f'head lr {cl.head_lr:g}{scale}'
  if config.job == 'finetune':
    lrs += f', backbone lr {cl.backbone_lr:g}{scale}, BatchNorm {cl.batchnorm}'
  schedule = cl.lr_schedule + (f' x{cl.lr_decay_factor:g} at {tuple(cl.lr_decay_epochs)}'
                               if cl.lr_schedule == 'step' else
                               f' to x{cl.lr_decay_factor:g}' if cl.lr_schedule == 'exponential' else '')
  init = 'zeros' if cl.head_init == 'normal' and cl.head_init_std == 0 else cl.head_init
  momentum = '' if cl.optimizer == 'adam' else f', momentum {cl.momentum:g}'
  line = (f'Evaluation protocol {name}: {cl.optimizer}, {lrs}{momentum}, wd {cl.weight_decay:g}, '
          f'batch {config.batch_size}, {config.epochs} epochs, {schedule}, head init {init}, report {cl.report}, '
          f'interpolation {_get(config, "transforms.eval.method")}, backbone {cl.backbone_dtype}'
          f'{", cached features" if config.features.cache else ""}')
  return line + (f'; set by the config: {", ".join(explicit)}' if explicit else '')
