"""View recipes: the keys of a view's augmentation recipe and their "off" values, and the ImageNet
normalisation. Plain Python (no TensorFlow), shared by the host pipeline (augment.py) and the device ops
(device_augment.py)."""

from __future__ import annotations

from typing import Any, Mapping

from vicreg_jax import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys of a view recipe and their "off" values.
RECIPE_DEFAULTS: dict[str, Any] = dict(
    crop_size=0,            # random resized crop to this side (0: no crop)
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    crop_method='bicubic',
    translate=0,            # pad-and-crop shift in pixels (small images)
    affine_degrees=0.0,     # random rotation / zoom / shear (small images, digits)
    affine_scale=(1.0, 1.0),
    affine_shear=0.0,
    flip_p=0.0,
    jitter_p=0.0,
    jitter=(0.4, 0.4, 0.2, 0.1),  # brightness, contrast, saturation, hue
    gray_p=0.0,
    blur_p=0.0,
    blur_sigma=(0.1, 2.0),
    blur_kernel_fraction=0.1,
    solarize_p=0.0,
    noise_std=0.0,          # additive Gaussian pixel noise (small images; not clipped)
    cutout_p=0.0,           # a square of zeros at a random position (small images)
    cutout_size=0,
    mean=None,              # normalisation; None leaves [0, 1] values
    std=None,
)


def full_recipe(recipe: Mapping[str, Any]) -> dict:
  """``recipe`` with every key of :data:`RECIPE_DEFAULTS` (defaults filled in); unknown keys are an error."""
  unknown = set(recipe) - set(RECIPE_DEFAULTS)
  if unknown:
    raise errors.ConfigError(f'Unknown augmentation keys {sorted(unknown)}; known: {sorted(RECIPE_DEFAULTS)}.')
  return {**RECIPE_DEFAULTS, **recipe}
