"""Test setup: 8 simulated CPU devices. Runs before any test module (and hence jax) is imported."""

import os
import tempfile

# The suite is compile-bound (tiny models): without LLVM's optimisations XLA compiles faster (measured: 126 -> 84 s
# for two trainer tests, 226 -> 203 s for three modules), and the programs still compute the same things. Also in
# the jobs of tiny models the tests start as processes (job_env).
FAST_COMPILE = '--xla_backend_optimization_level=0'
# XLA_FLAGS given to pytest reach the jobs the tests start as processes too (job_env), but for the device count.
USER_XLA_FLAGS = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                          if not f.startswith('--xla_force_host_platform_device_count'))
# The simulated devices are threads; on a busy 2-core machine (tests that run two jobs at once) a collective can
# wait on a starved thread far longer than XLA's default before it aborts the process, so allow 10 minutes.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
                           ' --xla_cpu_collective_timeout_seconds=600 ' + FAST_COMPILE).strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
# One persistent compilation cache for the suite and the jobs it starts as processes: the same tiny models are
# compiled by many tests (each builds its own jit closures) and by every job process; a hit skips the compile.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='vicreg_jax_test_compile_cache_'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Keep TensorFlow (tf.data in the input pipeline) off any GPU without paying for its import here; JAX is on
# the CPU anyway.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import hypothesis  # noqa: E402
import pytest  # noqa: E402

# The property tests draw the same examples on every run (a failure in CI reproduces at once); run them with
# --hypothesis-profile=explore to draw new ones.
hypothesis.settings.register_profile('suite', derandomize=True)
hypothesis.settings.register_profile('explore', derandomize=False)
hypothesis.settings.load_profile('suite')

REPO = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def mock_tfds_dataset(name: str, data_dir, splits: dict, num_examples: int):
  """A TFDS dataset that looks prepared under ``data_dir`` (metadata written from TFDS's own code, with the
  given split sizes) and yields ``num_examples`` random examples through ``tfds.testing.mock_data``."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
      for s, n in splits.items()]))
  pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir)):
    yield


# The longest modules first, so that pytest-xdist (setup.cfg runs two workers) starts them at once and the
# shorter ones fill in around them.
_FIRST = ('test_multiprocess.py', 'test_reliability.py', 'test_notebook.py', 'test_evaluate.py', 'test_vit.py',
          'test_errors.py')


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: _FIRST.index(item.path.name) if item.path.name in _FIRST else len(_FIRST))


@pytest.fixture
def mock_tfds():
  return mock_tfds_dataset


# --- jobs as their own processes (the command line; several JAX processes on localhost) ---------------------

# XLA:CPU aborts a process (SIGABRT) when its devices' threads have not all joined a collective within 40 s (its
# default). In a job of several processes on a busy 2-core machine, one process can reach a collective that much
# later than the other (restoring a checkpoint, compiling), so the jobs allow 10 minutes too. A lost peer still
# ends a job soon: its collectives fail at once, and the runtime's heartbeat ends the rest.
JOB_TIMEOUTS = ('--xla_cpu_collective_call_warn_stuck_timeout_seconds=120'
                ' --xla_cpu_collective_call_terminate_timeout_seconds=600')


def job_env(devices: int, fast_compile: bool = True) -> dict:
  """The environment of a job run as its own process with ``devices`` simulated CPU devices (not the suite's 8),
  the XLA_FLAGS pytest was started with (:data:`USER_XLA_FLAGS`) and :data:`JOB_TIMEOUTS`. ``fast_compile``
  (-O0) suits tiny models only: it runs the default digits model 6 times slower."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join([JOB_TIMEOUTS, USER_XLA_FLAGS, f'--xla_force_host_platform_device_count={devices}',
                               FAST_COMPILE if fast_compile else '']).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class ForkedProcess:
  """A job forked by tests/job_server.py, with the part of ``subprocess.Popen``'s interface the tests use:
  ``pid``, ``poll``, ``wait``, ``kill``, ``send_signal``, ``returncode`` (the server, its parent, writes the exit
  status to ``exit_path``)."""

  def __init__(self, pid: int, exit_path: pathlib.Path):
    self.pid, self.exit_path, self.returncode = pid, exit_path, None

  def poll(self):
    if self.returncode is None and self.exit_path.exists():
      self.returncode = int(self.exit_path.read_text())
    return self.returncode

  def wait(self, timeout=None):
    import subprocess
    import time
    deadline = None if timeout is None else time.time() + timeout
    while self.poll() is None:
      if deadline is not None and time.time() > deadline:
        raise subprocess.TimeoutExpired(f'job {self.pid}', timeout)
      time.sleep(0.02)
    return self.returncode

  def send_signal(self, sig) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    import signal
    self.send_signal(signal.SIGKILL)


# Environment variables read when a module is imported (JAX's and TensorFlow's configuration, TFDS's data
# directory): a job whose environment differs from the job server's in one of them runs as a fresh interpreter.
_IMPORT_TIME_ENV = ('JAX_', 'TF_', 'TFDS_', 'PYTHON', 'CUDA_', 'KERAS')


class _JobServer:
  """This test process's tests/job_server.py (started at the first job; one per pytest worker)."""
  proc = None
  env = None

  @classmethod
  def usable(cls, env: dict) -> bool:
    if os.environ.get('VICREG_JAX_TEST_FRESH_JOBS'):
      return False
    if cls.proc is None or cls.proc.poll() is not None:
      import json
      import subprocess
      import sys
      cls.env = job_env(1)
      cls.proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'job_server.py')], cwd=REPO, env=cls.env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
      json.loads(cls.proc.stdout.readline())  # {'ready': pid} once the imports are done
    keys = {k for k in set(env) | set(cls.env) if k.startswith(_IMPORT_TIME_ENV)}
    return all(env.get(k) == cls.env.get(k) for k in keys)

  @classmethod
  def fork(cls, argv, env: dict, stdout, stderr, exit_path: pathlib.Path,
           module: str = 'vicreg_jax.main') -> ForkedProcess:
    import json
    request = {'module': module, 'argv': argv, 'env': env, 'cwd': str(REPO), 'stdout': str(stdout),
               'stderr': str(stderr), 'exit': str(exit_path)}
    cls.proc.stdin.write(json.dumps(request) + '\n')
    cls.proc.stdin.flush()
    return ForkedProcess(json.loads(cls.proc.stdout.readline())['pid'], exit_path)


def run_module(args, env: dict, timeout: float, module: str = 'vicreg_jax.main'):
  """``subprocess.run([python, -m, module, *args], capture_output=True, text=True)`` from the checkout, forked by
  the job server when ``env`` allows it (:class:`Job`): a ``subprocess.CompletedProcess`` with the exit status,
  stdout and stderr; ``subprocess.TimeoutExpired`` (the job killed) after ``timeout`` seconds."""
  import subprocess
  import sys
  import tempfile
  if not _JobServer.usable(env):
    return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  with tempfile.TemporaryDirectory(prefix='job_') as d:
    out, err, exit_path = (pathlib.Path(d) / k for k in ('out', 'err', 'exit'))
    out.write_text(''), err.write_text('')
    proc = _JobServer.fork(list(args), env, out, err, exit_path, module)
    try:
      code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(30)
      raise
    return subprocess.CompletedProcess([module, *args], code, out.read_text(), err.read_text())


class Job:
  """``python -m vicreg_jax.main ARGS`` as ``processes`` JAX processes on localhost (``jax.distributed`` over a
  free port; each with ``devices`` simulated CPU devices), stdout and stderr in files under ``logs``. Each
  process is forked by tests/job_server.py, which has the package imported already (a fresh interpreter spends
  ~12 s importing it), unless the job's environment changes what an import reads, or
  ``VICREG_JAX_TEST_FRESH_JOBS=1`` is set: then each is ``python -m vicreg_jax.main`` itself."""

  def __init__(self, args, logs, *, processes: int = 1, devices: int = 2, name: str = 'job', env=None,
               fast_compile: bool = True):
    import subprocess
    import sys
    port = free_port()
    self.logs = pathlib.Path(logs)
    self.logs.mkdir(parents=True, exist_ok=True)
    self.name, self.procs, self.files = name, [], []
    job_environment = dict(job_env(devices, fast_compile), **(env or {}))
    forked = _JobServer.usable(job_environment)
    for i in range(processes):
      dist = ([f'--coordinator_address=localhost:{port}', f'--num_processes={processes}', f'--process_id={i}']
              if processes > 1 else [])
      out, err = (self.logs / f'{name}{i}.{k}' for k in ('out', 'err'))
      if forked:
        exit_path = self.logs / f'{name}{i}.exit'
        exit_path.unlink(missing_ok=True)
        out.write_text(''), err.write_text('')  # there from the start, as Popen's
        self.procs.append(_JobServer.fork([*args, *dist], job_environment, out, err, exit_path))
        continue
      out, err = open(out, 'w'), open(err, 'w')
      self.files += [out, err]
      self.procs.append(subprocess.Popen([sys.executable, '-m', 'vicreg_jax.main', *args, *dist], cwd=REPO,
                                         env=job_environment, stdout=out, stderr=err, text=True))

  def stderr(self, i: int = 0) -> str:
    return (self.logs / f'{self.name}{i}.err').read_text()

  def failure(self, i: int = 0, chars: int = 4000) -> str:
    """The end of process ``i``'s stderr for a failure message, without the list of extension modules that
    Python's fault handler appends to a crash report (it alone would fill the message)."""
    text = re.sub(r'(?m)^Extension modules: .*(\n[^\n]*\(total: \d+\))?$', '[extension modules]', self.stderr(i))
    return text[-chars:]

  def stdout(self, i: int = 0) -> str:
    return (self.logs / f'{self.name}{i}.out').read_text()

  def wait(self, timeout: float = 600) -> list:
    """Waits for every process; returns their exit codes (a process still running at ``timeout`` is killed,
    and the test fails)."""
    import subprocess
    import time
    deadline = time.time() + timeout
    try:
      codes = [p.wait(max(deadline - time.time(), 1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f'{self.name} still running after {timeout} s:\n' + self.failure(0, 3000))
    finally:
      for f in self.files:
        f.close()
    return codes

  def check(self, timeout: float = 600) -> 'Job':
    """Waits and asserts that every process exited 0."""
    for i, code in enumerate(self.wait(timeout)):
      assert code == 0, f'{self.name} process {i} exited {code}:\n' + self.failure(i)
    return self

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()


def checkpoint_arrays(path) -> dict:
  """A checkpoint written on any number of devices or processes, as numpy arrays (``path`` = .../STEP/default)."""
  from vicreg_jax import checkpoints
  return checkpoints.numpy_arrays(path)


def scalar_events(workdir) -> dict:
  """``{tag: [(step, value), ...]}`` of every scalar in the TensorBoard event files of ``workdir``, by step."""
  import glob
  import tensorflow as tf
  out = {}
  for path in sorted(glob.glob(os.path.join(str(workdir), 'events.out.tfevents*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor') and not value.tensor.tensor_shape.dim and value.tensor.dtype == 1:  # float
          out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
  return {tag: sorted(points) for tag, points in out.items()}


def max_abs_difference(a, b) -> float:
  import jax
  import numpy as np
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


# --- helpers shared by the test modules ---------------------------------------------------------------------

def sharded_value_and_grad(loss, w, xa, xb, devices: int = 8):
  """``loss(w, xa, xb, axis_name)`` under ``shard_map`` over ``devices`` simulated devices, the rows of ``xa``
  and ``xb`` split between them: (every replica's loss value [devices], the pmean of the replicated weight's
  gradients)."""
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P

  def body(w, a, b):
    value, g = jax.value_and_grad(loss)(w, a, b, 'data')
    return value[None], jax.lax.pmean(g, 'data')

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ('data',))
  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=(P('data'), P()),
                    check_vma=False)
  return jax.jit(f)(w, xa, xb)


def load_config(name):
  """``get_config()`` of ``configs/NAME.py``."""
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_digits(**overrides):
  """The default digits config with a tiny model (ConvNet ×1/4: 8-16-32 channels; projector 32³), batch 64, no
  final probe, a log line every step; ``overrides`` as dotted keys (``tiny_digits(**{'optim.base_lr': 0.1})``)."""
  c = load_config('digits')
  c.model.update(width_multiplier=0.25, projector='32-32-32')
  c.batch_size = 64
  c.final_probe.enabled = False
  c.log_every_steps = 1
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def write_folder(root, counts: dict, shape=(6, 8), fmt='mixed', start=0):
  """``counts[class]`` constant-colour images per class under ``root/class/`` (JPEG and PNG alternating for
  'mixed'); image k (from ``start``, over all classes) has grey level 8·k, so a decoded image names itself."""
  import tensorflow as tf
  k = start
  for name, n in counts.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      image = tf.fill(list(shape) + [3], tf.constant(8 * k, tf.uint8))
      png = fmt == 'png' or (fmt == 'mixed' and i % 2)
      data = tf.io.encode_png(image) if png else tf.io.encode_jpeg(image, quality=100)
      (root / name / f'img{i:03d}.{"png" if png else "jpg"}').write_bytes(data.numpy())
      k += 1
  (root / 'notes.txt').write_text('not a class')  # files at the top are ignored
  return root


def convert_and_back(tmp_path, entries: dict, method: str, backbone: dict, capsys) -> tuple:
  """An official checkpoint's ``entries`` (saved as .npz) converted by ``convert_weights`` into a workdir recording
  ``method`` (a folder of four images as its dataset), then exported back: asserts both succeed and the export
  holds the ``backbone`` state dict's tensors; returns (the workdir, the converter's stdout)."""
  import numpy as np
  from vicreg_jax import convert_weights
  np.savez(tmp_path / 'official.npz', **entries)
  images = write_folder(tmp_path / 'images', {'a': 2, 'b': 2}, shape=(32, 32))
  pre, back = tmp_path / 'pre', tmp_path / 'back.npz'
  status = convert_weights.main(['convert_weights', f'--torch={tmp_path / "official.npz"}', f'--workdir={pre}',
                                 f'--config.method={method}', '--config.data.source=folder',
                                 f'--config.data.data_dir={images}'])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert convert_weights.main(['convert_weights', f'--from_workdir={pre}', f'--to_torch={back}']) == 0
  with np.load(back) as z:
    assert all(np.array_equal(z[k], v) for k, v in backbone.items() if k in z.files and not k.endswith('tracked'))
  return pre, out


def train_steps(config, batches, devices=None):
  """The state and the last metrics after one step on each of ``batches`` (host arrays) from ``config``'s
  initial state, on a mesh of ``devices`` (default: every device), with the trainer's step and optimiser."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from vicreg_jax import methods, parallel
  from vicreg_jax import step as step_lib
  mesh = Mesh(np.asarray(devices or jax.devices()), (parallel.AXIS,))
  tx, schedule = methods.make_optimizer(config, 10, 2)
  online = step_lib.make_probe(config, 10)
  state = step_lib.init_state(config, step_lib.build_model(config, None), tx, jax.random.key(0), online)
  state = jax.device_put(state, parallel.replicated(mesh))
  step = step_lib.make_train_step(config, step_lib.build_model(config), tx, schedule, mesh, online, total_steps=10)
  for batch in batches:
    state, metrics, _ = step(state, jax.device_put(batch, parallel.data_sharding(mesh)))
  return jax.device_get(state), jax.device_get(metrics)


def ref_sinkhorn(scores, eps=0.05, iters=3):
  """The official SwAV ``distributed_sinkhorn`` (facebookresearch/swav main_swav.py:L353-L376) on one process,
  in float64: the codes [B, K] of ``scores`` [B, K]."""
  import numpy as np
  q = np.exp(np.asarray(scores, np.float64) / eps).T  # K × B
  k, b = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def numeric_grad(f, x, h=1e-6):
  """Central differences of the float64 scalar ``f`` at every entry of ``x``."""
  import numpy as np
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


def finetune_setup():
  """A quarter-width digits backbone with a fresh head (host copies of its parameters and variables), the
  fine-tuning classifier section of configs/digits_semi.py as its protocol resolves, and a batch of 32 random
  8×8 images: ``(pretraining config, head, params, variables, classifier, batch)``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vicreg_jax.evaluate import protocols
  from vicreg_jax.models import backbones, heads
  pre = load_config('digits')
  pre.model.update(width_multiplier=0.25)
  backbone = backbones.from_config(pre.model)
  variables = backbone.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  head = heads.Head(10)
  dim = backbone.apply(variables, jnp.zeros((1, 8, 8, 1)), train=False).shape[-1]
  params = {'head': head.init(jax.random.key(1), jnp.zeros((1, dim)))['params'], 'backbone': variables['params']}
  params, variables = jax.device_get((params, variables))  # host copies: the steps donate their input state
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((32, 8, 8, 1), np.float32), 'label': rng.integers(0, 10, 32).astype(np.int32)}
  return pre, head, params, variables, protocols.resolve(load_config('digits_semi'), None)[0].classifier, batch

