"""VICReg on scikit-learn's embedded digits: the default, CPU-only demo (about 4 minutes on 2 cores).

  python -m vicreg_jax.main --config=configs/digits.py --workdir=runs/digits

Recipe for 8×8 digits, upsampled to 16×16 so a small convolutional backbone has room for its strides: a
3-layer ConvNet (32-64-128 channels, 3×3, strides 1-2-2, BatchNorm, ReLU, global mean pool; 128-d
representation), projector 512-512-512, AdamW (lr 2e-3, weight decay 1e-4, batch 256, 150 epochs, 10 warmup
then cosine). Views: a ±2-pixel shift, brightness ×U[0.6, 1.4], Gaussian pixel noise σ 0.1 and, half the time, a
3×3 cutout. No flips (they change a digit's identity), no crops (at this size a crop cuts strokes away).

Measured (README, seeds 0–2, mean ± std): see the digits table; the end-of-run probe prints linear_top1,
linear_top1_5_per_class, knn_top1_20, RankMe and embedding_std. Evaluate its checkpoints with
configs/digits_linear.py and configs/digits_semi.py; the supervised reference is configs/digits_supervised.py.
"""

from vicreg_jax.defaults import digits_config


def get_config():
  return digits_config()
