"""GFLOP/s of one convolution, forward and with each gradient, three ways in the same run: the package's XLA
options (on CPU: XLA's own convolutions, :data:`vicreg_jax.compilation.CPU_COMPILER_OPTIONS`), JAX's defaults (on
CPU: YNNPACK), and PyTorch (channels_last, if torch is installed).

  python benchmarks/conv_speed.py [--batch=128 --size=32 --channels=64 --kernel=3 --stride=1]

Each figure is the best of ``--repeats`` timings. "+ input grad" and "+ weight grad" time the forward pass and
that gradient together (two convolutions' FLOPs), as a training step runs them. No TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--size', type=int, default=32, help='input height and width')
  p.add_argument('--channels', type=int, default=64, help='input and output channels')
  p.add_argument('--kernel', type=int, default=3)
  p.add_argument('--stride', type=int, default=1)
  p.add_argument('--repeats', type=int, default=5)
  return p.parse_args(argv)


def best_seconds(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def jax_figures(args, flops: float) -> dict:
  """{'ours': {...}, 'jax default': {...}}: GFLOP/s of forward, + input grad, + weight grad."""
  import jax
  import numpy as np
  from vicreg_jax import compilation

  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, args.channels)).astype(np.float32)
  w = (rng.standard_normal((args.kernel, args.kernel, args.channels, args.channels)) * 0.05).astype(np.float32)
  pad = (args.kernel - 1) // 2

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (args.stride,) * 2, [(pad, pad)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def loss(x, w):
    return (conv(x, w) ** 2).sum()

  out = {}
  for name, jit in (('ours', compilation.jit), ('jax default', jax.jit)):
    fns = {'forward': jit(conv), '+ input grad': jit(jax.grad(loss, 0)), '+ weight grad': jit(jax.grad(loss, 1))}
    out[name] = {k: (1 if k == 'forward' else 2) * flops / best_seconds(
        lambda f=f: jax.block_until_ready(f(x, w)), args.repeats) / 1e9 for k, f in fns.items()}
  return out


def torch_figures(args, flops: float) -> dict:
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  pad = (args.kernel - 1) // 2
  conv = torch.nn.Conv2d(args.channels, args.channels, args.kernel, args.stride, pad, bias=False)
  conv = conv.to(memory_format=torch.channels_last)
  x = torch.randn(args.batch, args.channels, args.size, args.size).contiguous(memory_format=torch.channels_last)
  x.requires_grad_(True)

  def forward():
    with torch.no_grad():
      conv(x)

  def grad(wrt):
    y = conv(x)
    torch.autograd.grad((y ** 2).sum(), wrt)

  fns = {'forward': forward, '+ input grad': lambda: grad(x), '+ weight grad': lambda: grad(conv.weight)}
  return {k: (1 if k == 'forward' else 2) * flops / best_seconds(f, args.repeats) / 1e9 for k, f in fns.items()}


def main(argv=None) -> None:
  args = parse_args(argv)
  out_size = (args.size + 2 * ((args.kernel - 1) // 2) - args.kernel) // args.stride + 1
  flops = 2 * args.batch * out_size ** 2 * args.channels ** 2 * args.kernel ** 2
  rows = jax_figures(args, flops)
  try:
    import torch  # noqa: F401
    rows['pytorch'] = torch_figures(args, flops)
  except ImportError:
    print('(torch is not installed: no PyTorch row; pip install ".[bench]")')
  print(f'{args.kernel}x{args.kernel}/{args.stride} convolution, {args.channels}->{args.channels} channels, '
        f'batch {args.batch}, {args.size}x{args.size}, float32: GFLOP/s (best of {args.repeats})')
  print(f'  {"":12s} {"forward":>10s} {"+ input grad":>14s} {"+ weight grad":>14s}')
  for name, r in rows.items():
    print(f'  {name:12s} {r["forward"]:10.0f} {r["+ input grad"]:14.0f} {r["+ weight grad"]:14.0f}')


if __name__ == '__main__':
  main()
