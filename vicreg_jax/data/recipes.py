"""View recipes: the keys of a view's augmentation recipe and their "off" values, and the ImageNet
normalisation. Plain Python (no TensorFlow), shared by the host pipeline (augment.py) and the device ops
(device_augment.py)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

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
    colour_first=False,     # jitter and grayscale on the whole image before the crop (W-MSE), else after the flip
    jitter_p=0.0,
    jitter=(0.4, 0.4, 0.2, 0.1),  # brightness, contrast, saturation, hue
    gray_p=0.0,
    blur_p=0.0,
    blur_sigma=(0.1, 2.0),
    blur_kernel_fraction=0.1,  # kernel side / image side; 0: radius ceil(3·max σ) pixels at every size (PIL, SwAV)
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


def blur_radius(side: Optional[int], kernel_fraction: float, sigma_max: float) -> int:
  """Half the side of the Gaussian blur kernel (2r + 1 taps) for an image side ``side`` (pixels; None when not
  known statically) and a recipe's ``blur_kernel_fraction`` and largest σ ``sigma_max`` (pixels).

  ``kernel_fraction > 0``: r = max(1, round(fraction·side / 2)), the kernel about that fraction of the side
  (SimCLR's 10%; 1 when the side is not known). ``kernel_fraction == 0``: r = ceil(3·sigma_max) whatever the
  side, the ±3σ support of PIL's ``GaussianBlur(radius=σ)`` (three box blurs of variance σ²/3; 13 taps for σ 2),
  which SwAV and W-MSE blur with at σ ∈ [0.1, 2] pixels on every crop. A known side caps r at side - 1 (the
  reflect padding needs it).
  """
  if kernel_fraction == 0:
    radius = max(1, math.ceil(3 * sigma_max))
  elif side is None:
    return 1
  else:
    radius = max(1, int(round(kernel_fraction * side / 2)))
  return radius if side is None else max(1, min(radius, side - 1))
