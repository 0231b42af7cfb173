"""Compilation: the XLA options of the package's programs and JAX's persistent compilation cache.

:func:`jit` is ``jax.jit`` with :func:`compiler_options` (on CPU, XLA's own convolutions instead of YNNPACK's:
1.7x the ResNet step, docs/performance.md; nothing on accelerators). :func:`configure_cache` turns on the persistent
compilation cache where the config says (:func:`enable_cache` for a given directory), so a restart loads the
compiled programs instead of compiling them again; :func:`cache_hits` counts the loads.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

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
