"""Images per second of the full train step (VICReg, or any method) on whatever devices JAX sees, its model-FLOPs
utilisation, its compile time, and (``--reference``, VICReg only) the same step in PyTorch in the same run.

  python benchmarks/step_throughput.py --model=resnet18 --stem=small --image_size=32 --batch=128 \
      --projector=2048-2048-2048 --dtype=float32 [--reference] [--json]
  python benchmarks/step_throughput.py --method=swav --projector=2048-128 --small_crops=6 --small_size=16

The step is the package's own (:func:`vicreg_jax.step.make_train_step`): two views through backbone and
projector, the method's loss (VICReg's with its all-gathered statistics by default), LARS, SyncBN, the colour
ops on the device; the online probe and the collapse diagnostics off. ``--small_crops=N`` adds N small crops of
``--small_size`` px per image (multi-crop, SwAV only; the backbone once per resolution and the heads over all
crops, ``model.views_together``, which ``--views_together`` also sets for two views). Images per second count
images (each giving two views and its small crops), as ``batch / seconds per step``.

MFU = model FLOPs of one step / step time / peak FLOP/s. Model FLOPs: XLA's cost analysis of the step compiled
without remat (so recomputation does not count), summed over devices. Peak: measured first, in this run, with
a large matrix product of the same dtype on every device (the datasheet peak is printed beside it where the
device kind is known). Compile time (lower + compile of the step) is reported apart; ``--cache_check`` runs the
benchmark twice in fresh processes sharing a new persistent compilation cache and prints both compile times.

``--reference`` times benchmarks/torch_reference.py (the same ResNet, stem, projector, loss and LARS; a ViT
``--model`` is timm's VisionTransformer of the same size; torch and timm are optional dependencies,
``pip install '.[bench]'``) with all cores' threads, in the default and channels_last
layouts, and prints ours / the better of the two. No TensorFlow is imported (accelerator hosts may lack it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Datasheet dense peaks per chip, FLOP/s, by jax's device_kind (bf16 / fp32 without TF32).
DATASHEET = {
    'TPU v4': {'bfloat16': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12},
    'TPU v5e': {'bfloat16': 197e12},
    'TPU v5p': {'bfloat16': 459e12},
    'TPU v6 lite': {'bfloat16': 918e12},
    'NVIDIA A100-SXM4-40GB': {'bfloat16': 312e12, 'float32': 19.5e12},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312e12, 'float32': 19.5e12},
    'NVIDIA H100 80GB HBM3': {'bfloat16': 989e12, 'float32': 67e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 67e12},
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet18')
  p.add_argument('--stem', default='small', choices=['small', 'imagenet'])
  p.add_argument('--num_heads', type=int, default=0, help="a ViT's heads (0: timm's for the --model)")
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--batch', type=int, default=128, help='global batch (images)')
  p.add_argument('--projector', default='2048-2048-2048')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--method', default='vicreg', help='config.method (its default section)')
  p.add_argument('--small_crops', type=int, default=0, help='small crops per image (multi-crop; SwAV)')
  p.add_argument('--small_size', type=int, default=0, help='side of the small crops (0: image_size·96/224)')
  p.add_argument('--views_together', action='store_true',
                 help='one backbone pass per resolution over all crops (implied by --small_crops)')
  p.add_argument('--num_prototypes', type=int, default=3000, help="SwAV's prototypes")
  p.add_argument('--steps', type=int, default=5, help='timed steps (after --warmup untimed ones)')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--remat', action='store_true', help='rematerialise the backbone blocks')
  p.add_argument('--matmul', type=int, default=0, help='side of the peak-measuring matmul (0: by device)')
  p.add_argument('--reference', action='store_true', help='also time the PyTorch step (needs torch)')
  p.add_argument('--torch_device', default='', help="PyTorch's device for --reference (default: cuda if any)")
  p.add_argument('--compilation_cache', default='', help='persistent compilation cache directory')
  p.add_argument('--cache_check', action='store_true',
                 help='run twice in new processes sharing a fresh compilation cache; print both compile times')
  p.add_argument('--breakdown', action='store_true',
                 help="also time one view's backbone + projector, forward and forward + backward")
  p.add_argument('--json', action='store_true', help='print one JSON object')
  return p.parse_args(argv)


def measured_peak(dtype: str, side: int) -> float:
  """FLOP/s per device of a ``side``³ matrix product of ``dtype`` on every device (best of 5)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('d',))
  n_dev = len(jax.devices())
  sharding = NamedSharding(mesh, P('d'))
  a = jax.device_put(jnp.ones((n_dev * side, side), dtype), sharding)
  b = jax.device_put(jnp.ones((n_dev * side, side), dtype), sharding)
  mm = jax.jit(jax.shard_map(lambda x, y: x @ y.T, mesh=mesh, in_specs=(P('d'), P('d')), out_specs=P('d')))
  mm(a, b).block_until_ready()
  best = float('inf')
  for _ in range(5):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * side**3 / best


def _config(args):
  from vicreg_jax import config as schema
  c = schema.base_config()
  c.batch_size = args.batch
  c.num_steps = 1000
  c.online_probe.enabled = False
  c.model.update(arch=args.model, stem=args.stem, projector=args.projector, dtype=args.dtype,
                 num_heads=args.num_heads)
  c.model.remat = bool(args.remat)
  c.data.update(image_size=args.image_size, channels=3)
  c.method = args.method
  c.swav.num_prototypes = args.num_prototypes
  c.model.views_together = bool(args.views_together or args.small_crops)
  c.augment.small_crops = args.small_crops
  c.augment.small_view['crop_size'] = small_size(args)
  schema.validate(c)
  return c


def small_size(args) -> int:
  return args.small_size or max(1, round(args.image_size * 96 / 224))


def _state_and_batch(args, config, tx, mesh):
  """A replicated initial train state and a random global batch of the benchmark's shape."""
  import jax
  import numpy as np
  from vicreg_jax import parallel, step as step_lib
  init = jax.jit(lambda key: step_lib.init_state(config, step_lib.build_model(config, None), tx, key),
                 out_shardings=parallel.replicated(mesh))
  shape = (args.batch, args.image_size, args.image_size, 3)
  rng = np.random.default_rng(0)
  sharding = parallel.data_sharding(mesh)
  batch = {'view1': jax.device_put(rng.standard_normal(shape, np.float32), sharding),
           'view2': jax.device_put(rng.standard_normal(shape, np.float32), sharding),
           'label': jax.device_put(np.zeros(args.batch, np.int32), sharding)}
  if args.small_crops:
    side = small_size(args)
    batch['small'] = jax.device_put(rng.standard_normal((args.batch, args.small_crops, side, side, 3), np.float32),
                                    sharding)
  return init(jax.random.key(0)), batch


def _seconds_per_step(compiled, state, batch, args):
  """The compiled step's mean time over ``args.steps`` steps after ``args.warmup``; the final state."""
  import jax
  import numpy as np
  for _ in range(args.warmup):
    state, metrics, _ = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics, _ = compiled(state, batch)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - t0) / args.steps
  if not bool(np.isfinite(jax.device_get(metrics['loss']))):
    raise SystemExit('the JAX step gave a non-finite loss')
  return seconds, state


def jax_step(args) -> dict:
  """Times the package's train step; returns figures."""
  import jax
  from vicreg_jax import compilation, methods, parallel, step as step_lib

  config = _config(args)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  tx, schedule = methods.make_optimizer(config, 1000, 10)
  model = step_lib.build_model(config)
  state, batch = _state_and_batch(args, config, tx, mesh)

  train_step = step_lib.make_train_step(config, model, tx, schedule, mesh, total_steps=1000)
  t0 = time.perf_counter()
  lowered = train_step.lower(state, batch)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - t0

  if args.remat:  # the model FLOPs are those of the step without recomputation
    flops_config = _config(argparse.Namespace(**{**vars(args), 'remat': False}))
    flops_step = step_lib.make_train_step(flops_config, step_lib.build_model(flops_config), tx, schedule, mesh,
                                          total_steps=1000)
    cost = flops_step.lower(state, batch).compile().cost_analysis()
  else:
    cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_device = float(cost.get('flops', 0.0))

  seconds, state = _seconds_per_step(compiled, state, batch, args)
  breakdown = _breakdown(config, state, batch['view1'], args) if args.breakdown else {}

  devices = jax.devices()
  kind = devices[0].device_kind
  side = args.matmul or (8192 if devices[0].platform != 'cpu' else 1024)
  peak = measured_peak(args.dtype, side)
  n_dev = len(devices)
  out = {
      'images_per_second': args.batch / seconds,
      'seconds_per_step': seconds,
      'compile_seconds': compile_seconds,
      'model_flops_per_step': flops_per_device * n_dev,
      'measured_peak_flops_per_device': peak,
      'mfu': flops_per_device / seconds / peak,
      'device_kind': kind,
      'platform': devices[0].platform,
      'num_devices': n_dev,
      'jax_version': jax.__version__,
      'dtype': args.dtype,
      'method': args.method,
      'small_crops': args.small_crops,
      'views_together': config.model.views_together,
      'compiler_options': compilation.compiler_options(),  # the package's XLA options (on CPU: no YNNPACK convs)
      **breakdown,
  }
  sheet = DATASHEET.get(kind, {}).get(args.dtype)
  if sheet:
    out['datasheet_peak_flops_per_device'] = sheet
    out['mfu_datasheet'] = flops_per_device / seconds / sheet
  return out


def _breakdown(config, state, view, args) -> dict:
  """Seconds (best of ``args.steps``) of one view's backbone + projector in training mode, forward and forward
  + backward, with the step's XLA options: the step runs this twice, plus the loss and LARS."""
  import jax
  import jax.numpy as jnp
  from vicreg_jax import compilation, parallel, step as step_lib
  model = step_lib.build_model(config)

  def forward(params, x):
    (_, z, _), _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, x, train=True, heads=True,
                               mutable=['batch_stats'])
    return jnp.sum(z ** 2)

  mesh = parallel.make_mesh()
  spec = (jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(parallel.AXIS))
  out = {}
  for name, fn in (('view_forward_seconds', forward), ('view_forward_backward_seconds', jax.grad(forward))):
    run = compilation.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec[0], check_vma=False))
    jax.block_until_ready(run(state.params, view))
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(run(state.params, view))
      times.append(time.perf_counter() - t0)
    out[name] = min(times)
  return out


def torch_step(args) -> dict:
  """The PyTorch reference, default and channels_last layouts; the better one counts."""
  import torch
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_reference
  device = args.torch_device or ('cuda' if torch.cuda.is_available() else 'cpu')
  if device == 'cpu':
    torch.set_num_threads(os.cpu_count() or 1)
  runs = {}
  for layout in ('default', 'channels_last'):
    runs[layout] = torch_reference.time_step(
        arch=args.model, stem=args.stem, image_size=args.image_size, batch=args.batch,
        projector_spec=args.projector, dtype=args.dtype, channels_last=layout == 'channels_last',
        steps=args.steps, warmup=args.warmup, device=device, num_heads=args.num_heads)['images_per_second']
  best = max(runs, key=runs.get)
  return {'torch_images_per_second': runs[best], 'torch_layout': best, 'torch_runs': runs,
          'torch_version': torch.__version__, 'torch_device': device, 'torch_threads': torch.get_num_threads()}


def cache_check(args) -> dict:
  """Two fresh processes sharing a new persistent compilation cache: the first compiles and writes it, the
  second should read it."""
  with tempfile.TemporaryDirectory() as cache:
    argv = [a for a in sys.argv[1:] if a not in ('--cache_check', '--reference', '--json')]
    times = []
    for _ in range(2):
      out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--json', '--steps=1', '--warmup=0',
                            f'--compilation_cache={cache}'], check=True, capture_output=True, text=True).stdout
      times.append(json.loads(out.strip().splitlines()[-1])['compile_seconds'])
  return {'first_start_compile_seconds': times[0], 'second_start_compile_seconds': times[1]}


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.cache_check:
    result = cache_check(args)
    if args.json:
      print(json.dumps(result))
    else:
      print(f'compile time, first start {result["first_start_compile_seconds"]:.1f} s, second start (cache hit) '
            f'{result["second_start_compile_seconds"]:.1f} s')
    return
  if args.compilation_cache:
    from vicreg_jax import compilation
    compilation.enable_cache(args.compilation_cache)
  if args.reference and (args.method != 'vicreg' or args.small_crops):
    raise SystemExit('--reference times the VICReg two-view step only')
  result = jax_step(args)
  if args.reference:
    result.update(torch_step(args))
    result['ratio_vs_torch'] = result['images_per_second'] / result['torch_images_per_second']
  if args.json:
    print(json.dumps(result))
    return
  crops = f' + {args.small_crops}×{small_size(args)} px' if args.small_crops else ''
  together = ', views together' if args.views_together or args.small_crops else ''
  what = (f'{args.model} ({args.stem} stem), 2×{args.image_size} px{crops}{together}, global batch {args.batch}, '
          f'projector {args.projector}, {args.dtype}{", remat" if args.remat else ""}')
  print(f'{args.method} step, {what}, on {result["num_devices"]} × {result["device_kind"]} '
        f'(jax {result["jax_version"]})')
  if result['compiler_options']:
    print(f'  XLA options of the step: {result["compiler_options"]}')
  print(f'  JAX:     {result["images_per_second"]:8.1f} images/s  ({result["seconds_per_step"] * 1e3:.1f} ms/step; '
        f'compile {result["compile_seconds"]:.1f} s)')
  peak = f'measured peak {result["measured_peak_flops_per_device"] / 1e12:.3f} TFLOP/s per device'
  if 'datasheet_peak_flops_per_device' in result:
    peak += f', datasheet {result["datasheet_peak_flops_per_device"] / 1e12:.0f} (MFU {result["mfu_datasheet"]:.1%})'
  print(f'  MFU {result["mfu"]:.1%} of the {peak}; model FLOPs per step {result["model_flops_per_step"] / 1e9:.1f} G')
  if args.breakdown:
    print(f'  one view, backbone + projector: forward {result["view_forward_seconds"]:.2f} s, forward + backward '
          f'{result["view_forward_backward_seconds"]:.2f} s (the step: {result["seconds_per_step"]:.2f} s)')
  if args.reference:
    runs = '  '.join(f'{k} {v:.1f}' for k, v in result['torch_runs'].items())
    print(f'  PyTorch: {result["torch_images_per_second"]:8.1f} images/s  ({result["torch_layout"]}; {runs}; '
          f'torch {result["torch_version"]}, {result["torch_device"]}, {result["torch_threads"]} threads)')
    print(f'  JAX / PyTorch = {result["ratio_vs_torch"]:.2f}')


if __name__ == '__main__':
  main()
