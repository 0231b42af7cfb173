"""Each ``configs/imagenet_NAME.py`` is NAME's published recipe: its views, crops, optimiser, schedule, length and
heads hold the values of the method's official code (each repository read at the commit its config's docstring
names; the expected values below are those facts, written out by hand), its docstring holds the table
``hyperparameter | official (source) | ours`` with a source for every row and a reason for every difference, and
README.md and docs/ quote beside each method the ImageNet figure of the variant its config implements."""

import re

import pytest

from conftest import REPO, load_config
from vicreg_jax import methods

CONFIGS = {'vicreg': 'imagenet', 'barlow_twins': 'imagenet_barlow_twins', 'byol': 'imagenet_byol',
           'simclr': 'imagenet_simclr', 'simsiam': 'imagenet_simsiam', 'swav': 'imagenet_swav', 'wmse': 'imagenet_wmse',
           'moco_v3': 'imagenet_moco_v3', 'moco_v2': 'imagenet_moco_v2'}
# Recipes beside a method's main one (checked for their docstring tables and figures; their values in their tests).
VARIANTS = {'moco_v3_r50': 'imagenet_moco_v3_r50'}

# The official views (crop size, scale and resize; flip; jitter and its p; grayscale; blur p and σ; solarize p):
# VICReg facebookresearch/vicreg augmentations.py:L37-82 (Barlow Twins main.py:L290-320 and BYOL
# byol/utils/augmentations.py:L27-66 the same), SimCLR v1 data_util.py, SimSiam main_simsiam.py:L229-239, SwAV
# src/multicropdataset.py:L37-94 and the 800-epoch script, W-MSE README.md:L72 with datasets/.
_VICREG_VIEW = dict(crop_size=224, crop_scale=(0.08, 1.0), crop_method='bicubic', flip_p=0.5,
                    jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_sigma=(0.1, 2.0))
_STRONG = dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
               solarize_p=0.0, flip_p=0.5, crop_size=224)
VIEWS = {
    'vicreg': (dict(_VICREG_VIEW, blur_p=1.0, solarize_p=0.0), dict(_VICREG_VIEW, blur_p=0.1, solarize_p=0.2)),
    'barlow_twins': (dict(_VICREG_VIEW, blur_p=1.0, solarize_p=0.0), dict(_VICREG_VIEW, blur_p=0.1, solarize_p=0.2)),
    'byol': (dict(_VICREG_VIEW, blur_p=1.0, solarize_p=0.0), dict(_VICREG_VIEW, blur_p=0.1, solarize_p=0.2)),
    'simclr': (dict(_STRONG, crop_scale=(0.08, 1.0), crop_method='bicubic'),) * 2,
    'simsiam': (dict(_STRONG, jitter=(0.4, 0.4, 0.4, 0.1), crop_scale=(0.2, 1.0), crop_method='bilinear'),) * 2,
    'swav': (dict(_STRONG, crop_scale=(0.14, 1.0), crop_method='bilinear'),) * 2,
    'wmse': (dict(_STRONG, crop_scale=(0.08, 1.0), crop_method='bicubic'),) * 2,
    # MoCo v3 (main_moco.py:L262-285): BYOL's views, torchvision's bilinear crop.
    'moco_v3': (dict(_VICREG_VIEW, crop_method='bilinear', blur_p=1.0, solarize_p=0.0),
                dict(_VICREG_VIEW, crop_method='bilinear', blur_p=0.1, solarize_p=0.2)),
    # MoCo v2 (facebookresearch/moco main_moco.py:L330-344): SimSiam took them from it.
    'moco_v2': (dict(_STRONG, jitter=(0.4, 0.4, 0.4, 0.1), crop_scale=(0.2, 1.0), crop_method='bilinear'),) * 2,
}

# Optimiser, peak learning rate (after warmup), warmup, end of the cosine, epochs, global batch.
OPTIM = {
    'vicreg': dict(name='lars', peak=1.6, weight_decay=1e-6, eta=1e-3, warmup_epochs=10, end_lr_factor=1e-3,
                   epochs=1000, batch=2048),
    'barlow_twins': dict(name='lars', peak=1.6, weight_decay=1e-6, eta=1e-3, warmup_epochs=10, end_lr_factor=1e-3,
                         epochs=1000, batch=2048),
    'byol': dict(name='lars', peak=3.2, weight_decay=1.5e-6, eta=1e-3, warmup_epochs=10, end_lr_factor=0.0,
                 epochs=1000, batch=4096),
    'simclr': dict(name='lars_classic', peak=4.8, weight_decay=1e-6, eta=1e-3, warmup_epochs=10, end_lr_factor=0.0,
                   epochs=1000, batch=4096),
    'simsiam': dict(name='sgd', peak=0.1, weight_decay=1e-4, warmup_epochs=0, end_lr_factor=0.0, epochs=100,
                    batch=512),
    'swav': dict(peak=4.8, weight_decay=1e-6, eta=1e-3, warmup_epochs=10, end_lr_factor=1e-3, epochs=800,
                 batch=4096),
    'wmse': dict(peak=2e-3, weight_decay=1e-6, epochs=240, batch=512),
    'moco_v3': dict(name='adamw_all', peak=2.4e-3, weight_decay=0.1, warmup_epochs=40, end_lr_factor=0.0, epochs=300,
                    batch=4096),
    'moco_v2': dict(name='sgd', peak=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0, end_lr_factor=0.0,
                    epochs=200, batch=256),
}

# The heads: projector sizes, biases before its hidden BatchNorms, an affine-free output BatchNorm; the method's
# own keys (predictor hidden sizes, prototypes, whitening, loss coefficients).
HEADS = {
    'vicreg': (dict(projector='8192-8192-8192', projector_hidden_bias=True, projector_output_bn=False),
               dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)),
    'barlow_twins': (dict(projector='8192-8192-8192', projector_hidden_bias=False, projector_output_bn=False),
                     dict(lambd=0.0051)),
    'byol': (dict(projector='4096-256', projector_hidden_bias=True, projector_output_bn=False),
             dict(predictor='4096', tau_base=0.996)),
    'simclr': (dict(projector='2048-128', projector_hidden_bias=False), dict(temperature=0.1)),
    'simsiam': (dict(projector='2048-2048-2048', projector_hidden_bias=False, projector_output_bn=True),
                dict(predictor='512', fixed_predictor_lr=True)),
    'swav': (dict(projector='2048-128', projector_hidden_bias=True, projector_output_bn=False),
             dict(num_prototypes=3000, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
                  freeze_prototypes_steps=313, queue_length=0)),
    'wmse': (dict(projector_hidden_bias=True), dict(projector='1024-128', w_size=256, w_iter=1, eps=0.0)),
    'moco_v3': (dict(projector='4096-4096-256', projector_hidden_bias=False, projector_output_bn=True),
                dict(predictor='4096', predictor_output_bn=True, momentum=0.99, temperature=0.2)),
    'moco_v2': (dict(projector='2048-128', projector_hidden_bias=True, projector_bn=False, projector_output_bn=False,
                     ghost_batch_size=32),
                dict(momentum=0.999, temperature=0.2, queue_length=65536, shuffle_keys=True)),
}
ARCHS = {'moco_v3': 'vit_s16'}  # the others: ResNet-50


def _subset(recipe, expected: dict) -> dict:
  """``recipe``'s values of the keys of ``expected``, tuples as tuples (a config holds lists after JSON)."""
  return {k: tuple(recipe[k]) if isinstance(recipe[k], (list, tuple)) else recipe[k] for k in expected}


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_each_imagenet_config_takes_its_methods_official_views(method):
  c = load_config(CONFIGS[method])
  assert c.method == method
  for recipe, expected in zip((c.augment.view1, c.augment.view2), VIEWS[method]):
    assert _subset(recipe, expected) == expected


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_each_imagenet_config_takes_its_methods_optimiser_schedule_and_length(method):
  """The optimiser, its weight decay and trust coefficient, the schedule's warmup and end, the epochs and the
  batch; the peak learning rate as the schedule the trainer builds gives it after the warmup."""
  c, want = load_config(CONFIGS[method]), dict(OPTIM[method])
  assert (c.epochs, c.batch_size) == (want.pop('epochs'), want.pop('batch'))
  steps_per_epoch = 1_281_167 // c.batch_size
  warmup = int(c.optim.warmup_epochs * steps_per_epoch)
  _, schedule = methods.make_optimizer(c, c.epochs * steps_per_epoch, warmup)
  assert float(schedule(warmup)) == pytest.approx(want.pop('peak'), rel=1e-6)
  assert {k: c.optim[k] for k in want} == want


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_each_imagenet_config_takes_its_methods_heads(method):
  c = load_config(CONFIGS[method])
  model, section = HEADS[method]
  assert {k: c.model[k] for k in model} == model
  assert {k: c[method][k] for k in section} == section
  assert c.model.arch == ARCHS.get(method, 'resnet50')


# --- the docstring tables ------------------------------------------------------------------------------------------

# The rows every table has (a method's own rows, e.g. SwAV's prototypes, come on top).
ROWS = ('crop', 'flip', 'colour jitter', 'grayscale', 'blur', 'solarize', 'colour before crop', 'optimiser',
        'learning rate', 'weight decay', 'schedule', 'epochs, batch', 'backbone', 'BatchNorm', 'precision',
        'linear top-1')
MARKS = '¹²³⁴⁵⁶⁷⁸⁹'


def table(doc: str) -> dict:
  """The docstring's table as {hyperparameter: (official cell, ours cell)}, continuation lines (an empty first
  cell) joined to their row."""
  rows, name = {}, None
  for line in doc.splitlines():
    cells = [c.strip() for c in line.split('|')]
    if len(cells) != 3 or set(cells[0]) <= {'-'} and cells[0]:
      continue
    if cells[0]:
      name = cells[0]
      rows[name] = (cells[1], cells[2])
    elif name is not None:
      rows[name] = (f'{rows[name][0]} {cells[1]}', f'{rows[name][1]} {cells[2]}'.strip())
  rows.pop('hyperparameter', None)
  return rows


@pytest.mark.parametrize('method', sorted({**CONFIGS, **VARIANTS}))
def test_each_imagenet_config_docstring_tables_the_official_recipe_with_sources(method):
  """The table names the repository and commit it was read at, has every row, a source (FILE:Lnn or the paper)
  in every official cell, and every note its rows point to (a row that differs says why in a note)."""
  doc = (REPO / 'configs' / f'{({**CONFIGS, **VARIANTS})[method]}.py').read_text().split('"""')[1]
  assert re.search(r'Official code: [\w-]+/[\w.-]+@[0-9a-f]{7,40}\b', doc), 'no repository@commit'
  rows = table(doc)
  row_names = [r.split(' (')[0] for r in rows]
  assert not [r for r in ROWS if not any(n == r or n.startswith(r) for n in row_names)], row_names
  unsourced = [r for r, (official, _) in rows.items() if not re.search(r':L\d+|paper|\(none', official)]
  assert not unsourced
  used = {m for _, ours in rows.values() for m in ours if m in MARKS}
  notes = {line.strip()[0] for line in doc.splitlines() if line.strip() and line.strip()[0] in MARKS}
  assert used <= notes, f'notes missing for {sorted(used - notes)}'
  assert all(ours for _, ours in rows.values())


# The ImageNet linear top-1 of the variant each config implements, with the protocol that produced it (VICReg,
# Barlow Twins, BYOL, SimCLR v1: their papers' Table 1 / 1 / 1 / 6; Barlow Twins' released 16-GPU run
# README.md:L32; SimSiam README.md:L74 at 100 epochs; SwAV README.md:L29 and L35).
FIGURES = {'vicreg': ('73.2',), 'barlow_twins': ('73.2', '73.5'), 'byol': ('74.3',), 'simclr': ('69.3',),
           'simsiam': ('68.1',), 'swav': ('75.3', '70.1'), 'wmse': (), 'moco_v3': ('73.2',), 'moco_v3_r50': ('74.6',),
           'moco_v2': ('67.5', '71.1')}
NAMES = {'vicreg': 'VICReg', 'barlow_twins': 'Barlow Twins', 'byol': 'BYOL', 'simclr': 'SimCLR',
         'simsiam': 'SimSiam', 'swav': 'SwAV', 'wmse': 'W-MSE', 'moco_v3': 'MoCo v3', 'moco_v2': 'MoCo v2'}


@pytest.mark.parametrize('method', sorted({**CONFIGS, **VARIANTS}))
def test_each_config_docstring_expects_its_variants_figure(method):
  doc = (REPO / 'configs' / f'{({**CONFIGS, **VARIANTS})[method]}.py').read_text().split('"""')[1]
  expected = doc[doc.index('Expected'):]
  assert all(f'{f}%' in expected for f in FIGURES[method])
  if not FIGURES[method]:
    assert 'no published ImageNet-1k figure' in expected


def test_readme_and_results_quote_each_methods_implemented_figure():
  """The ImageNet column of the seven-methods tables (README.md, docs/results.md) holds each config's own
  figure (SwAV's 75.3 with multi-crop, SimSiam's 68.1 at the config's 100 epochs, not the 800-epoch 71.3), and
  the text beside it the variants' (Barlow Twins' 73.5 at W = 16, SwAV's 70.1 without multi-crop)."""
  for path in ('README.md', 'docs/results.md', 'docs/methods.md'):
    text = (REPO / path).read_text()
    assert all(f in text for f in ('73.5', '70.1', 'W = 32', 'multi-crop')), path
    for method, name in NAMES.items():
      key = re.escape(name if path != 'docs/methods.md' else method)
      row = re.search(rf'^\| `?{key}`?(?: \(default\))?(?: [¹²³⁴⁵])? \|.*$', text, re.M)  # a footnote mark
      assert row, (path, name)
      last = row.group(0).rstrip(' |').rsplit('|', 1)[1].strip()
      assert last == (FIGURES[method][:1] or ('–',))[0], (path, name, last)


# --- the keys other branches add (enabled when merged) -----------------------------------------------------------

@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_colour_order_and_blur_kernel_keys(method):
  """W-MSE jitters and grays the whole image before its crop (datasets/transforms.py:L6-17); SwAV's and MoCo v3's
  blur kernel (PIL's) covers ±3σ at every crop size (``blur_kernel_fraction`` 0); the others crop first with a
  kernel of 10%."""
  c = load_config(CONFIGS[method])
  for recipe in (c.augment.view1, c.augment.view2):
    assert recipe['colour_first'] is (method == 'wmse')
    assert recipe['blur_kernel_fraction'] == (0.0 if method in ('swav', 'moco_v3', 'moco_v2') else 0.1)


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_multicrop_keys(method):
  """SwAV: 6 crops of 96 at 0.05-0.14 with the large crops' colour recipe (800ep:L28-31,
  src/multicropdataset.py:L37-52); SwAV and SimCLR run both views through one BatchNorm batch."""
  c = load_config(CONFIGS[method])
  assert c.augment.small_crops == (6 if method == 'swav' else 0)
  assert c.model.views_together is (method in ('swav', 'simclr'))
  if method == 'swav':
    small = c.augment.small_view
    assert (small['crop_size'], tuple(small['crop_scale'])) == (96, (0.05, 0.14))
    colour = dict(VIEWS['swav'][0], crop_size=96, crop_scale=(0.05, 0.14), blur_kernel_fraction=0.0)
    assert _subset(small, colour) == colour


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_optimiser_and_schedule_keys(method):
  """SwAV: apex LARC on every parameter, warmup from 0.3 to 4.8 by np.linspace (main_swav.py:L171-182). W-MSE:
  PyTorch Adam with coupled L2, 500 warmup steps at (i+1)/500, ×0.2 at epochs 190 and 215 (train.py:L22-54).
  Barlow Twins: the official gradient of 32 GPUs. The others: today's keys (checked above)."""
  c = load_config(CONFIGS[method])
  want = {'swav': dict(name='larc', warmup_start_factor=0.3 / 4.8, warmup_linspace=True, schedule='cosine'),
          'wmse': dict(name='adam', warmup_steps=500, warmup_start_factor=1 / 500, warmup_linspace=True,
                       schedule='step', decay_epochs=(190, 215), decay_factor=0.2),
          'simsiam': dict(warmup_steps=0, warmup_start_factor=0.0, schedule='cosine_epochs'),
          'moco_v2': dict(warmup_steps=0, warmup_start_factor=0.0, schedule='cosine_epochs')}.get(
                           method, dict(warmup_steps=0, warmup_start_factor=0.0, schedule='cosine'))
  got = {k: tuple(c.optim[k]) if k == 'decay_epochs' else c.optim[k] for k in want}
  assert got == want  # 0.3 / 4.8 and 1 / 500 are the doubles nearest 0.0625 and 0.002, however written
  assert c.barlow_twins.official_gradient_world_size == (32 if method == 'barlow_twins' else 0)


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_backbone_and_head_keys(method):
  """Residual BN zero-initialised except in SwAV (src/resnet50.py:L139), W-MSE and MoCo v2 (torchvision's default); an
  output bias in SwAV's projector (src/resnet50.py:L209), W-MSE's head (model.py:L15) and SimSiam's predictor
  (simsiam/builder.py:L42); SimCLR v1's output BatchNorm with a scale, no offset (model_util.py:L118-120)."""
  c = load_config(CONFIGS[method])
  assert c.model.zero_init_residual is (method not in ('swav', 'wmse', 'moco_v2'))
  assert c.model.projector_output_bias is (method in ('swav', 'wmse', 'moco_v2'))
  assert (c.model.projector_output_bn, c.model.projector_output_scale) == {
      'simclr': (True, True), 'simsiam': (True, False), 'moco_v3': (True, False)}.get(method, (False, False))
  assert c.simsiam.predictor_output_bias is (method == 'simsiam')
