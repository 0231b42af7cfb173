"""VICReg on scikit-learn's embedded digits: the default, CPU-only demo (about 4 minutes on 2 cores).

  python -m vicreg_jax.main --config=configs/digits.py --workdir=runs/digits

Recipe for 8×8 digits, upsampled to 16×16 so a small convolutional backbone has room for its strides: a
3-layer ConvNet (32-64-128 channels, 3×3, strides 1-2-2, BatchNorm, ReLU, global mean pool; 128-d
representation), projector 512-512-512, AdamW (lr 2e-3, weight decay 1e-4, batch 256, 150 epochs, 10 warmup
then cosine). Views: a ±2-pixel shift, brightness ×U[0.6, 1.4], Gaussian pixel noise σ 0.1 and, half the time, a
3×3 cutout. No flips (they change a digit's identity), no crops (at this size a crop cuts strokes away).

Measured (docs/results.md, seeds 0–2, mean ± std, 2 CPU cores): linear_top1 0.988 ± 0.002, linear_top1_5_per_class
0.898 ± 0.002, knn_top1_20 0.967 ± 0.005, RankMe 22.2 (embeddings 92.1), embedding_std 0.640; raw pixels 0.972 /
0.816 / 0.980. With --config.vicreg.std_coeff=0 --config.vicreg.cov_coeff=0 it collapses: embedding_std 0.0031,
5-per-class 0.699. Evaluate its checkpoints with
configs/digits_linear.py and configs/digits_semi.py; the supervised reference is configs/digits_supervised.py.
"""

from vicreg_jax.config import digits_config


def get_config():
  return digits_config()
