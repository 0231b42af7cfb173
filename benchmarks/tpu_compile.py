"""Compiles the real train step for a Cloud TPU topology on this machine and reports what XLA says of it.

  pip install 'jax[tpu]==<the jax version>'      # libtpu: compile-only TPU devices, no TPU needed
  python benchmarks/tpu_compile.py --config=configs/imagenet.py --topology=v5e:4x4 [--json] [--check]
  python benchmarks/tpu_compile.py --config=configs/imagenet_linear.py --job=linear --topology=v5e:2x2 \\
      --config.batch_size=4096

``jax.experimental.topologies.get_topology_desc`` gives compile-only devices of the topology; the package's own
:func:`vicreg_jax.step.make_train_step` (or the linear job's step) is lowered on ``ShapeDtypeStruct`` inputs with
the trainer's shardings and compiled by the TPU compiler. Printed, per chip: memory (arguments, outputs, aliased,
temporaries, peak against the chip's HBM), FLOPs and HBM bytes accessed (XLA's cost analysis), a roofline step
time (the larger of FLOPs / peak and bytes / bandwidth: a lower bound, an estimate until a slice measures it),
the collectives (kind, count, bytes) and the largest fusions by bytes (operands + result, from the compiled HLO).
``--check``: exit status 3 with one line when the step does not fit the chip's HBM (the pre-flight of
``launch/tpu_pod.sh``); a step whose temporaries alone exceed the HBM, which XLA refuses to compile, exits 3 with
its line and the advice in any case. The compile needs no dataset: the training split's size comes from :data:`SPLIT_SIZES`
or ``--num_examples``. A ResNet-50 step compiles in about 10 minutes on 2 cores.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Per chip: HBM (GiB), peak bf16 FLOP/s, HBM bandwidth (bytes/s), Cloud TPU's system-architecture page.
CHIPS = {
    'v4': (32, 275e12, 1228e9, 'https://cloud.google.com/tpu/docs/v4'),
    'v5e': (16, 197e12, 819e9, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': (95, 459e12, 2765e9, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': (32, 918e12, 1640e9, 'https://cloud.google.com/tpu/docs/v6e'),
}
# HBM the runtime keeps for itself (programs, the collectives' buffers): a step fits when its peak is below the
# chip's HBM less this.
RESERVED_GIB = 0.5
# Training-split sizes of the datasets the configs name, so that no dataset is needed to compile.
SPLIT_SIZES = {('imagenet2012', 'train'): 1_281_167, ('imagenet2012_subset/1pct', 'train'): 12_811,
               ('imagenet2012_subset/10pct', 'train'): 128_116, ('cifar10', 'train'): 50_000}
NUM_CLASSES = {'imagenet2012': 1000, 'imagenet2012_subset/1pct': 1000, 'imagenet2012_subset/10pct': 1000,
               'cifar10': 10}
NOT_FIT = 3  # exit status of --check when the step does not fit

def define_flags() -> None:
  """The command line's flags (defined when the script runs, so that importing it defines none)."""
  config_flags.DEFINE_config_file('config', 'configs/imagenet.py', 'The config to compile.')
  flags.DEFINE_string('topology', 'v5e:4x4', 'TYPE:AxB[xC] (v4 as megacore chips: v4:2x2x4 is v4-32).')
  flags.DEFINE_enum('job', 'auto', ['auto', 'pretrain', 'linear'], "The step to compile ('auto': the config's).")
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of the report.')
  flags.DEFINE_bool('check', False, f'Exit {NOT_FIT} with one line when the step does not fit.')
  flags.DEFINE_integer('num_examples', 0, 'Training-split size (0: from SPLIT_SIZES).')
  flags.DEFINE_integer('top', 20, 'How many of the largest fusions to list.')
  flags.DEFINE_bool('plain_mesh', False, "The devices in their own order (not jax.make_mesh's ring).")
  flags.DEFINE_float('hbm_gib', 0.0, "The chip's HBM in GiB (0: the table's), e.g. to try --check.")
  flags.DEFINE_bool('table', False, "Also print launch/README.md's time-and-cost row for the config's run.")
  flags.DEFINE_string('analyse', '', 'Only print the collectives and kernels of this saved HLO text.')
  flags.DEFINE_string('hlo', '', 'Also write the compiled HLO text to this file.')


# --- the topology ---------------------------------------------------------------------------------------------

def chip_of(topology: str) -> tuple:
  """(generation, chips) of a topology name such as 'v5e:4x4' or 'v4:2x2x4'."""
  kind, _, shape = topology.partition(':')
  if kind not in CHIPS or not re.fullmatch(r'\d+(x\d+)+', shape):
    raise SystemExit(f'--topology={topology!r}: expected TYPE:AxB[xC] with TYPE one of {sorted(CHIPS)}')
  return kind, math.prod(int(n) for n in shape.split('x'))


def topology_devices(topology: str) -> list:
  """Compile-only devices of ``topology`` (libtpu's)."""
  from jax.experimental import topologies
  kind, _ = chip_of(topology)
  extra = {'chip_config_name': 'megacore'} if kind == 'v4' else {}
  return list(topologies.get_topology_desc(topology, **extra).devices)


# --- the compiled HLO -----------------------------------------------------------------------------------------

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|c64)\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*?)\)(?:, (.*))?$')
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_SKIPPED = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all', 'partition-id',
            'replica-id'}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (an array, or every array of a tuple)."""
  return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d) for t, dims in _ARRAY.findall(shape))


@dataclasses.dataclass
class Op:
  name: str
  opcode: str
  out_bytes: int
  in_bytes: int
  kernel: bool  # runs as a kernel of its own (not an instruction inside a fusion's body)
  where: str    # op_name from the metadata: which line of the model made it

  @property
  def bytes(self) -> int:
    """Bytes the kernel reads and writes: operands + result; a slice or an asynchronous copy moves only its
    result (the start's result tuple holds its operand too)."""
    if self.opcode in ('slice-start', 'copy-start'):
      return 2 * max(self.out_bytes - self.in_bytes, 0)
    if self.opcode in ('slice', 'dynamic-slice'):
      return 2 * self.out_bytes
    return self.in_bytes + self.out_bytes


def hlo_ops(text: str) -> list:
  """The instructions of the compiled module with their result and operand bytes (all but parameters,
  constants, tuples and bitcasts); ``kernel`` marks those of computations that are not a fusion's body."""
  bodies = set(re.findall(r'calls=%([\w.\-]+)', text))
  shapes, ops, computation = {}, [], None
  for line in text.splitlines():
    header = re.match(r'^(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    if header:
      computation = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, operands, attrs = m.groups()
    shapes[name] = shape_bytes(shape)
    if opcode in _SKIPPED:
      continue
    where = re.search(r'op_name="([^"]*)"', attrs or '')
    in_bytes = sum(shapes.get(o, 0) for o in re.findall(r'%([\w.\-]+)', operands))
    ops.append(Op(name, opcode, shapes[name], in_bytes, computation not in bodies, where.group(1) if where else ''))
  return ops


def collectives(ops: list) -> dict:
  """{kind: (count, result bytes)} of the collectives among ``ops``, wherever they are (TPU wraps some in
  asynchronous fusions); an asynchronous pair counted once, at its start."""
  out = collections.defaultdict(lambda: [0, 0])
  for op in ops:
    kind = op.opcode.removesuffix('-start')
    if kind in COLLECTIVES and not op.opcode.endswith('-done'):
      out[kind][0] += 1
      out[kind][1] += op.out_bytes
  return {k: tuple(v) for k, v in sorted(out.items())}


def largest(ops: list, top: int) -> list:
  """The ``top`` kernels with the most bytes (operands + result), largest first."""
  return sorted(kernels(ops), key=lambda o: o.bytes, reverse=True)[:top]


def kernels(ops: list) -> list:
  """The ops that run as kernels (an asynchronous pair once)."""
  return [o for o in ops if o.kernel and not o.opcode.endswith('-done')]


def phase(op: Op) -> str:
  """'forward', 'backward' (the transpose of the forward), or 'rest' (colour ops, loss, optimiser, copies)."""
  if 'transpose(jvp' in op.where:
    return 'backward'
  return 'forward' if 'jvp(' in op.where else 'rest'


def by_phase(ops: list) -> dict:
  """GB of kernel bytes in each :func:`phase`."""
  out = collections.Counter()
  for o in kernels(ops):
    out[phase(o)] += o.bytes / 1e9
  return dict(out)


# --- the programs ---------------------------------------------------------------------------------------------

def _train_examples(config, num_examples: int = 0) -> int:
  if num_examples:
    return num_examples
  key = (config.data.name, config.data.train_split)
  if key not in SPLIT_SIZES:
    raise SystemExit(f'no size known for {key}: give --num_examples')
  return SPLIT_SIZES[key]


def _batch_specs(config, mesh) -> dict:
  """ShapeDtypeStructs of a global pretraining batch as the input pipeline delivers it."""
  import jax
  import jax.numpy as jnp
  from vicreg_jax import parallel
  sharding = parallel.data_sharding(mesh)
  b, size, ch = config.batch_size, config.data.image_size, config.data.channels
  dtype = jnp.uint8 if config.augment.on_device else jnp.float32
  side = config.augment.view1['crop_size'] or size
  specs = {'view1': (b, side, side, ch), 'view2': (b, side, side, ch)}
  if config.augment.small_crops:
    small = config.augment.small_view['crop_size']
    specs['small'] = (b, config.augment.small_crops, small, small, ch)
  out = {k: jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for k, s in specs.items()}
  out['label'] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)
  return out


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def pretrain_program(config, mesh, num_examples: int = 0):
  """(jitted step, its abstract arguments) of the pretraining job."""
  import jax
  from vicreg_jax import methods, runs, step as step_lib
  from vicreg_jax.data import sources
  total, warmup, per_epoch = runs.schedule_steps(config, _train_examples(config, num_examples))
  tx, schedule = methods.make_optimizer(config, total, warmup, per_epoch)
  online = step_lib.make_probe(config, NUM_CLASSES.get(config.data.name) or
                               sources.get(config.data).num_classes(config.data))
  init = lambda key: step_lib.init_state(config, step_lib.build_model(config, None), tx, key, online_probe=online)
  state = jax.eval_shape(init, jax.random.key(config.seed))
  shardings = step_lib.state_shardings(config, mesh, state)
  fn = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh, online, total)
  return fn, (_abstract(state, shardings), _batch_specs(config, mesh))


def linear_program(config, mesh, num_examples: int = 0):
  """(jitted step, its abstract arguments) of the linear-evaluation job's head training on a frozen backbone
  (images through the backbone each step, as with ``features.cache=False``)."""
  import jax
  import jax.numpy as jnp
  from vicreg_jax import config as schema, parallel
  from vicreg_jax.evaluate import classifier, protocols
  from vicreg_jax.models import backbones, heads
  pre = schema.imagenet_config()
  if config.protocol != 'none':
    config = protocols.resolve(config, pre.method)[0]
  cl, b = config.classifier, config.batch_size
  model = classifier.backbone_model(pre, cl)
  backbone = backbones.from_config(model)
  size = config.transforms.eval.crop or pre.data.image_size
  image = jax.ShapeDtypeStruct((b, size, size, pre.data.channels), jnp.float32, sharding=parallel.data_sharding(mesh))
  variables = jax.eval_shape(lambda k: backbone.init(k, jnp.zeros((1, size, size, pre.data.channels)),
                                                    train=False), jax.random.key(0))
  frozen = {k: variables[k] for k in ('params', 'batch_stats')}
  feat_dim = jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False), frozen, image).shape[-1]
  classes = NUM_CLASSES[pre.data.name]
  head = heads.Head(classes, cl.head_init_std)
  steps = _train_examples(pre, num_examples) // b
  params = {'head': jax.eval_shape(lambda k: classifier.init_head(cl, classes, k, feat_dim), jax.random.key(0))}
  tx = classifier.make_optimizer(cl, params, steps, config.epochs, b)
  state = classifier.ClassifierState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, batch_stats={},
                                     opt_state=jax.eval_shape(tx.init, params))
  replicated = lambda tree: _abstract(tree, jax.tree.map(lambda _: parallel.replicated(mesh), tree))
  fn = classifier.make_train_step(head, backbone, tx, mesh, False, cl.batchnorm, config.reductions,
                                  cl.ghost_batch_size)
  batch = {'image': image, 'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=parallel.data_sharding(mesh))}
  return fn, (replicated(state), replicated(frozen), batch)


# --- the report ----------------------------------------------------------------------------------------------

def hlo_summary(text: str, top: int) -> dict:
  """The collectives, the kernels' bytes by phase and the ``top`` largest kernels of a compiled module's text."""
  ops = hlo_ops(text)
  return {
      'collectives': {k: {'count': n, 'mib': b / 2**20} for k, (n, b) in collectives(ops).items()},
      'largest_kernels': [{'name': o.name, 'opcode': o.opcode, 'mb': o.bytes / 1e6, 'out_mb': o.out_bytes / 1e6,
                           'where': o.where[-90:]} for o in largest(ops, top)],
      'kernel_gb_total': sum(o.bytes for o in kernels(ops)) / 1e9,
      'kernel_gb_by_phase': by_phase(ops),
  }


def report(compiled, text: str, topology: str, seconds: float, top: int, hbm_gib: float = 0.0) -> dict:
  """Per-chip figures of a compiled program whose HLO text is ``text`` (see the module docstring)."""
  kind, chips = chip_of(topology)
  table_hbm, peak_flops, bandwidth, source = CHIPS[kind]
  hbm_gib = hbm_gib or table_hbm
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 1 << 30
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  flops, hbm_bytes = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  return {
      'topology': topology, 'chips': chips, 'compile_seconds': round(seconds, 1),
      'memory_gib': {'arguments': mem.argument_size_in_bytes / gib, 'outputs': mem.output_size_in_bytes / gib,
                     'aliased': mem.alias_size_in_bytes / gib, 'temporaries': mem.temp_size_in_bytes / gib,
                     'peak': peak / gib, 'hbm': hbm_gib, 'usable': hbm_gib - RESERVED_GIB},
      'fits': peak / gib <= hbm_gib - RESERVED_GIB,
      'tflop': flops / 1e12, 'hbm_gb_accessed': hbm_bytes / 1e9,
      'roofline_seconds': max(flops / peak_flops, hbm_bytes / bandwidth),
      'compute_seconds': flops / peak_flops, 'memory_seconds': hbm_bytes / bandwidth,
      'chip': {'peak_bf16_flops': peak_flops, 'hbm_bytes_per_second': bandwidth, 'source': source},
      **hlo_summary(text, top),
  }


def print_report(r: dict, what: str) -> None:
  m = r['memory_gib']
  print(f'{what} on {r["topology"]} ({r["chips"]} chips), compiled in {r["compile_seconds"]:.0f} s; per chip:')
  print(f'  memory GiB: arguments {m["arguments"]:.2f}, outputs {m["outputs"]:.2f} (aliased {m["aliased"]:.2f}), '
        f'temporaries {m["temporaries"]:.2f}; peak {m["peak"]:.2f} of {m["hbm"]} HBM '
        f'({"fits" if r["fits"] else "does NOT fit"}: {m["usable"]:.2f} usable)')
  print(f'  {r["tflop"]:.2f} TFLOP, {r["hbm_gb_accessed"]:.1f} GB of HBM accessed; roofline '
        f'{r["roofline_seconds"]:.3f} s/step (compute {r["compute_seconds"]:.3f}, memory {r["memory_seconds"]:.3f}; '
        f'{r["chip"]["peak_bf16_flops"] / 1e12:.0f} TFLOP/s, {r["chip"]["hbm_bytes_per_second"] / 1e9:.0f} GB/s: '
        f'{r["chip"]["source"]}); an estimate until a slice measures it')
  for kind, c in r['collectives'].items():
    print(f'  {kind}: {c["count"]} x, {c["mib"]:.1f} MiB')
  phases = ', '.join(f'{k} {v:.1f}' for k, v in sorted(r['kernel_gb_by_phase'].items()))
  print(f'  kernels\' bytes (operands + result, XLA\'s memory spaces not told apart): {r["kernel_gb_total"]:.1f} GB '
        f'({phases}); the largest:')
  for k in r['largest_kernels']:
    print(f'    {k["mb"]:9.1f} MB  {k["opcode"]:<14} {k["name"]:<28} {k["where"]}')


# On-demand list prices per chip-hour (https://cloud.google.com/tpu/pricing); they change, spot and committed-use
# prices are far lower.
PRICES = {'v4': 3.22, 'v5e': 1.20}
SLICE_NAMES = {'v4': lambda chips: f'v4-{2 * chips}', 'v5e': lambda chips: f'v5litepod-{chips}',
               'v5p': lambda chips: f'v5p-{2 * chips}', 'v6e': lambda chips: f'v6e-{chips}'}


def time_and_cost(r: dict, steps: int) -> dict:
  """The run's wall time and cost for ``steps`` steps of the compiled step ``r``, as a range: from the roofline
  (compute and HBM traffic fully overlapped) to their sum (not overlapped); collectives and the input pipeline
  not counted."""
  kind, chips = chip_of(r['topology'])
  low, high = r['roofline_seconds'], r['compute_seconds'] + r['memory_seconds']
  hours = (low * steps / 3600, high * steps / 3600)
  price = PRICES.get(kind)
  return {'slice': SLICE_NAMES[kind](chips), 'step_seconds': (low, high), 'hours': hours,
          'chip_hours': (hours[0] * chips, hours[1] * chips),
          'cost': None if price is None else (hours[0] * chips * price, hours[1] * chips * price)}


def table_row(r: dict, steps: int) -> str:
  """One markdown row of launch/README.md's time-and-cost table."""
  t = time_and_cost(r, steps)
  cost = '—' if t['cost'] is None else f'${t["cost"][0]:,.0f}–{t["cost"][1]:,.0f}'
  return (f'| {t["slice"]} | {r["chips"]} | {r["batch_size"] // r["chips"]} | {r["memory_gib"]["peak"]:.2f} of '
          f'{r["memory_gib"]["hbm"]} | {r["tflop"]:.2f} / {r["hbm_gb_accessed"]:.0f} | '
          f'{t["step_seconds"][0]:.3f}–{t["step_seconds"][1]:.3f} s | {t["hours"][0]:.1f}–{t["hours"][1]:.1f} h | '
          f'{t["chip_hours"][0]:.0f}–{t["chip_hours"][1]:.0f} | {cost} |')


def advice(config, r: dict) -> str:
  per_chip = config.batch_size // r['chips']
  return (f'per-chip batch {per_chip}: compiled peak {r["memory_gib"]["peak"]:.2f} GiB against '
          f'{r["memory_gib"]["usable"]:.2f} GiB usable of {r["memory_gib"]["hbm"]} GiB HBM; set '
          '--config.grad_accum_steps=K (K micro-batches per step) or --config.model.remat=True, or use more chips')


def main(argv):
  del argv
  import jax
  from vicreg_jax import compilation, config as schema, parallel, runs
  f = flags.FLAGS
  if f.analyse:
    with open(f.analyse) as fh:
      print(json.dumps(hlo_summary(fh.read(), f.top), indent=1))
    return
  config = f.config
  schema.validate(config)
  compilation.use_default_options()  # the CPU compiler's options are not the TPU compiler's
  devices = topology_devices(f.topology)
  mesh = (jax.sharding.Mesh(devices, ('data',), axis_types=(jax.sharding.AxisType.Auto,)) if f.plain_mesh
          else parallel.make_mesh(devices))
  job = config.job if f.job == 'auto' else f.job
  fn, args = (linear_program if job == 'linear' else pretrain_program)(config, mesh, f.num_examples)
  t0 = time.time()
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:  # XLA's own verdict: the temporaries alone exceed the chip's HBM
    if (oom := compilation.out_of_memory(e, config.batch_size // len(devices))) is None:
      raise
    print(f'error: does not fit on {f.topology}: {oom}', file=sys.stderr)
    sys.exit(NOT_FIT)
  seconds, text = time.time() - t0, compiled.as_text()
  r = report(compiled, text, f.topology, seconds, f.top, f.hbm_gib)
  r.update(job=job, batch_size=config.batch_size, jax=jax.__version__)
  if f.hlo:
    with open(f.hlo, 'w') as fh:
      fh.write(text)
  if f.json:
    print(json.dumps(r))
  else:
    print_report(r, f'{job} step of {config.method if job != "linear" else "linear evaluation"}, batch '
                    f'{config.batch_size}')
  if f.table and job != 'linear':
    print(table_row(r, runs.schedule_steps(config, _train_examples(config, f.num_examples))[0]))
  if f.check and not r['fits']:
    print(f'error: does not fit on {f.topology}: {advice(config, r)}', file=sys.stderr)
    sys.exit(NOT_FIT)


if __name__ == '__main__':
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # no TPU VM metadata server here
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compile-only: several compiles may run at once
  define_flags()
  app.run(main)
