"""The VICReg train step written in PyTorch, for ``step_throughput.py --reference``: the same ResNet (torchvision's
layout: BasicBlock / Bottleneck v1.5, ImageNet or small stem, zero-initialised last BatchNorm of each block),
the same projector (Linear-BN-ReLU, last Linear without bias), the official VICReg loss and LARS in the official
order (``dp = g + wd·p``, trust ratio on weights only, momentum, then the learning rate).

Written for this benchmark (torchvision is not needed); ``torch`` is an optional dependency (``pip install
'.[bench]'``). One process: plain BatchNorm is what SyncBN computes on one device.

A ViT arch (``vit_s16`` …, vicreg_jax/models/timm_weights.py's table) is timm's own ``VisionTransformer`` with
the same patch size, width, depth and heads (``num_classes=0``: the class token after the final norm; timm's
learned position embedding, which costs what ours does), so that ours is measured against the implementation
users know; timm is in the ``bench`` extra too.
"""

from __future__ import annotations

import time

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, filters, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, filters, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    nn.init.zeros_(self.bn2.weight)
    self.down = None
    if stride != 1 or cin != filters:
      self.down = nn.Sequential(nn.Conv2d(cin, filters, 1, stride, bias=False), nn.BatchNorm2d(filters))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, filters, stride):
    super().__init__()
    out = filters * 4
    self.conv1 = nn.Conv2d(cin, filters, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    self.conv3 = nn.Conv2d(filters, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    nn.init.zeros_(self.bn3.weight)
    self.down = None
    if stride != 1 or cin != out:
      self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


ARCHS = {'resnet18': ([2, 2, 2, 2], BasicBlock), 'resnet34': ([3, 4, 6, 3], BasicBlock),
         'resnet50': ([3, 4, 6, 3], Bottleneck), 'resnet101': ([3, 4, 23, 3], Bottleneck)}


class ResNet(nn.Module):
  def __init__(self, arch: str, stem: str, channels: int = 3, width: int = 64):
    super().__init__()
    stages, block = ARCHS[arch]
    if stem == 'imagenet':
      self.stem = nn.Sequential(nn.Conv2d(channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    else:
      self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                nn.ReLU(inplace=True))
    layers, cin = [], width
    for i, n in enumerate(stages):
      for j in range(n):
        layers.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = width * 2**i * block.expansion
    self.layers = nn.Sequential(*layers)
    self.out_dim = cin
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x):
    return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


def projector(dim: int, spec: str) -> nn.Sequential:
  sizes = [dim] + [int(s) for s in spec.split('-')]
  layers = []
  for a, b in zip(sizes[:-2], sizes[1:-1]):
    layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
  layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
  return nn.Sequential(*layers)


def vicreg_loss(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
  n, d = x.shape
  repr_loss = F.mse_loss(x, y)
  x, y = x - x.mean(0), y - y.mean(0)
  std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
  std_loss = (F.relu(1 - std_x).mean() + F.relu(1 - std_y).mean()) / 2
  cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
  off = ~torch.eye(d, dtype=torch.bool, device=x.device)
  cov_loss = (cov_x[off].pow(2).sum() + cov_y[off].pow(2).sum()) / d
  return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


class LARS(torch.optim.Optimizer):
  """LARS in the official VICReg order; parameters with ndim 1 get no weight decay and no trust ratio."""

  def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g['params']:
        if p.grad is None:
          continue
        dp = p.grad
        if p.ndim > 1:
          dp = dp.add(p, alpha=g['weight_decay'])
          pn, un = torch.norm(p), torch.norm(dp)
          q = torch.where((pn > 0) & (un > 0), g['eta'] * pn / un, torch.ones_like(pn))
          dp = dp.mul(q)
        state = self.state[p]
        if 'mu' not in state:
          state['mu'] = torch.zeros_like(p)
        mu = state['mu']
        mu.mul_(g['momentum']).add_(dp)
        p.add_(mu, alpha=-g['lr'])


def vit_backbone(arch: str, image_size: int, num_heads: int = 0) -> tuple[nn.Module, int]:
  """timm's ``VisionTransformer`` for one of our ViT names, and its representation's width."""
  import os
  import sys
  from timm.models.vision_transformer import VisionTransformer
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from vicreg_jax.models import timm_weights  # numpy only
  patch, width, depth, heads = timm_weights.ARCHS[arch]
  return VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth,
                           num_heads=num_heads or heads, num_classes=0), width


def time_step(*, arch: str, stem: str, image_size: int, batch: int, projector_spec: str, dtype: str,
              channels_last: bool, steps: int, warmup: int, device: str = 'cpu', num_heads: int = 0) -> dict:
  """Seconds per VICReg step (both views through backbone and projector, loss, backward, LARS) of this
  PyTorch model, after ``warmup`` untimed steps; bf16 runs under autocast (AMP)."""
  torch.manual_seed(0)
  if arch.startswith('vit_'):
    backbone, out_dim = vit_backbone(arch, image_size, num_heads)
  else:
    backbone = ResNet(arch, stem)
    out_dim = backbone.out_dim
  model = nn.Sequential(backbone, projector(out_dim, projector_spec)).to(device)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = LARS(model.parameters(), lr=0.1)
  gen = torch.Generator().manual_seed(0)
  views = [torch.randn(batch, 3, image_size, image_size, generator=gen).to(device).to(memory_format=fmt)
           for _ in range(2)]
  amp = dtype == 'bfloat16'

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16, enabled=amp):
      z1, z2 = model(views[0]), model(views[1])
    loss = vicreg_loss(z1.float(), z2.float())
    loss.backward()
    opt.step()
    return loss

  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
  for _ in range(warmup):
    step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  seconds = (time.perf_counter() - t0) / steps
  assert torch.isfinite(loss), 'the PyTorch reference step gave a non-finite loss'
  return {'seconds_per_step': seconds, 'images_per_second': batch / seconds}
