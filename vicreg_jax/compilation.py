"""Compilation: the XLA options of the package's programs, JAX's persistent compilation cache, out of memory.

:func:`jit` is ``jax.jit`` with :func:`compiler_options` (on CPU, XLA's own convolutions instead of YNNPACK's:
1.7x the ResNet step, docs/performance.md; nothing on accelerators; :func:`use_default_options` when compiling for
another backend than the default one). :func:`configure_cache` turns on the persistent compilation cache where
the config says (:func:`enable_cache` for a given directory), so a restart loads the compiled programs instead of
compiling them again; :func:`cache_hits` counts the loads. :func:`out_of_memory` turns XLA's out-of-memory error
into one line with the advice.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from vicreg_jax import errors

# --- XLA options ----------------------------------------------------------------------------------------------

# XLA:CPU (jaxlib 0.10) hands convolutions, matrix products and reductions to YNNPACK. Its own (Eigen)
# convolutions ran this package's ResNet-18 step 1.7x as fast on an x86 CPU (docs/performance.md), so on CPU the
# package's programs keep YNNPACK for matrix products and reductions only.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
_compiler_options: dict = {}  # {'options': what compiler_options() decided}, once per process


def compiler_options() -> Optional[dict]:
  """The XLA options of the package's jitted programs on the default backend: :data:`CPU_COMPILER_OPTIONS` on
  CPU; None on accelerators (the CPU compiler's options are never handed to another backend's), when
  ``XLA_FLAGS`` chooses the YNNPACK fusion types itself (the user's choice wins), or when this XLA does not
  know the option (checked once by compiling a tiny program with it)."""
  if 'options' not in _compiler_options:
    options = None
    if jax.default_backend() == 'cpu' and 'ynn_fusion_type' not in os.environ.get('XLA_FLAGS', ''):
      try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(np.float32(0)).compile()
        options = dict(CPU_COMPILER_OPTIONS)
      except Exception:  # pylint: disable=broad-except  # another XLA: its defaults then
        pass
    _compiler_options['options'] = options
  return _compiler_options['options']


def use_default_options() -> None:
  """XLA's default options for every program jitted after this: for compiling for a backend other than the
  default one (benchmarks/tpu_compile.py compiles for TPU on a CPU host); :func:`targets_cpu` is False after it."""
  _compiler_options['options'] = None
  _compiler_options['other_backend'] = True


def targets_cpu() -> bool:
  """Whether the programs traced now will run on this CPU: the default backend is the CPU and no other backend
  was chosen (:func:`use_default_options`). Models pick CPU-friendly forms of an op by it (vicreg_jax/models/vit.py)."""
  return jax.default_backend() == 'cpu' and not _compiler_options.get('other_backend')


def jit(fun: Callable, **kwargs) -> Callable:
  """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


# --- the persistent compilation cache -------------------------------------------------------------------------

_cache_hits = {'count': 0}


def _count_cache_hit(event: str, **kwargs) -> None:
  del kwargs
  if event == '/jax/compilation_cache/cache_hits':
    _cache_hits['count'] += 1


# Registered at import, so that loads count also when the cache was set outside (JAX_COMPILATION_CACHE_DIR).
jax.monitoring.register_event_listener(_count_cache_hit)


def enable_cache(path: str, min_compile_seconds: float = 1.0) -> None:
  """JAX's persistent compilation cache in ``path`` (a directory, ``gs://`` allowed): a restart loads the
  compiled programs instead of compiling them again (minutes for a ResNet-50 step on a pod host). Programs that
  compiled in less than ``min_compile_seconds`` are not stored. :func:`cache_hits` counts loads."""
  from jax.experimental.compilation_cache import compilation_cache
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update('jax_compilation_cache_dir', path)
    compilation_cache.reset_cache()  # JAX reads the directory once, at the first compilation after this
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_seconds))


def configure_cache(config, workdir: str) -> None:
  """Turns on JAX's persistent compilation cache where ``config.compilation_cache`` says: 'workdir' is
  WORKDIR/compilation_cache unless JAX already has a cache directory (``JAX_COMPILATION_CACHE_DIR``), which
  it then keeps; another value is the directory itself; '' leaves JAX's setting alone."""
  where = config.compilation_cache
  if not where or (where == 'workdir' and jax.config.jax_compilation_cache_dir):
    return
  path = os.path.join(workdir, 'compilation_cache') if where == 'workdir' else where
  enable_cache(path, config.compilation_cache_min_seconds)
  logging.info('Compilation cache: %s.', path)


def cache_hits() -> int:
  """How many programs this process has loaded from the persistent compilation cache."""
  return _cache_hits['count']


# --- out of memory --------------------------------------------------------------------------------------------

_OOM = re.compile(r'RESOURCE_EXHAUSTED.*?(?:Ran out of memory|Out of memory|out of memory)', re.S)
_USED = re.compile(r'Used ([\d.]+[KMGT]?i?B?) of ([\d.]+[KMGT]?i?B?) (\w+)')
_REQUIRED = re.compile(r'required for HLO temporaries \(([\d.]+[KMGT]?i?B?)\) exceeds available (\w+) \(([\d.]+[KMGT]?i?B?)\)')


def out_of_memory(error: BaseException, per_chip_batch: int) -> Optional[errors.ConfigError]:
  """A one-line :class:`errors.ConfigError` for XLA's out-of-memory ``error`` (a program that does not fit the
  accelerator's memory, found when it is compiled or run): the per-chip batch, what XLA says it needed against
  what the chip has, and what to change; None for any other error."""
  text = str(error)
  if not _OOM.search(text):
    return None
  used, required = _USED.search(text), _REQUIRED.search(text)
  if used:
    need = f'compiled peak {used.group(1)} of {used.group(2)} {used.group(3)}'
  elif required:
    need = f'temporaries {required.group(1)} of {required.group(3)} {required.group(2)}'
  else:
    need = 'the program does not fit'
  return errors.ConfigError(
      f'out of accelerator memory at {per_chip_batch} examples per chip ({need}); set '
      '--config.grad_accum_steps=K (the batch in K micro-batches), --config.model.remat=True, or use more chips '
      '(benchmarks/tpu_compile.py reports the peak per chip before a run)')
