"""The data-parallel layout: the batch size check (the mesh, global arrays and gathering are exercised by every
sharded test and the multi-process runs)."""

import jax
import pytest

from vicreg_jax import errors, parallel


def test_a_batch_that_does_not_split_over_devices_or_processes_names_both(monkeypatch):
  mesh = parallel.make_mesh()  # the suite's 8 devices
  parallel.check_batch_size(24, mesh)
  with pytest.raises(errors.ConfigError, match=r'device count \(8\) and the number of processes \(1\)'):
    parallel.check_batch_size(12, mesh)
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  with pytest.raises(errors.ConfigError, match=r'processes \(3\); set --config.batch_size to a multiple of 24'):
    parallel.check_batch_size(16, mesh)
