"""Starts ``python -m vicreg_jax.main ARGS`` jobs (or another module of the package) for the tests without paying for the imports each time: this
process imports TensorFlow, TFDS, JAX and the package once (no JAX backend, no TensorFlow runtime yet), then
forks one child per job, which takes the job's environment, working directory, argv and log files and runs the
command line as a fresh interpreter would: its own flags, devices (XLA_FLAGS and PJRT_NPROC are read when the
child first creates its JAX backend), distributed runtime, signal handling and exit status, the interpreter's
exit (non-daemon threads joined, atexit handlers run) included. A fresh ``python -m vicreg_jax.main`` spends
about 12 s of CPU importing what this process imports once (measured: ``import vicreg_jax.main,
vicreg_jax.train`` 12.6 s on 2 cores); the suite starts over a hundred jobs.

Protocol (one JSON object per line on stdin, one reply line on stdout): ``{"module", "argv", "env", "cwd",
"stdout", "stderr", "exit"}`` → ``{"pid"}``. When a child ends, its exit status (``os.waitstatus_to_exitcode``: negative
for a signal, as ``subprocess.Popen.returncode``) is written to the file ``exit`` (atomically). Used by
tests/conftest.py's :class:`Job`; the server ends when its stdin closes.
"""

import json
import os
import select
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(request: dict) -> None:
  """Becomes the job: never returns."""
  code = 1
  try:
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    for fd, path in ((1, request['stdout']), (2, request['stderr'])):
      f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # created empty by the test
      os.dup2(f, fd)
      os.close(f)
    module = request.get('module', 'vicreg_jax.main')
    code = 0
    try:
      if module == 'vicreg_jax.main':
        from vicreg_jax import main
        sys.argv = [main.__file__, *request['argv']]
        main.run()
      else:  # as `python -m MODULE`, which has not imported vicreg_jax.main: its flags would clash
        import runpy
        from absl import flags
        for flag in flags.FLAGS.flags_by_module_dict().get('vicreg_jax.main', []):
          delattr(flags.FLAGS, flag.name)
        sys.argv = [module, *request['argv']]
        runpy.run_module(module, run_name='__main__', alter_sys=True)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if e.code is not None and not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (what the interpreter prints for an uncaught exception)
      import traceback
      traceback.print_exc()
      code = 1
    # The interpreter's own exit: wait for non-daemon threads, then the atexit handlers (JAX's distributed
    # shutdown among them).
    import atexit
    import threading
    threading._shutdown()  # noqa: SLF001  (what Py_Finalize calls)
    atexit._run_exitfuncs()  # noqa: SLF001
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def _reap(exits: dict) -> None:
  """Writes the exit status of every child that has ended."""
  while exits:
    try:
      pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return
    path = exits.pop(pid, None)
    if path is not None:
      with open(path + '.tmp', 'w') as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
      os.replace(path + '.tmp', path)


def main() -> None:
  sys.path.insert(0, REPO)  # as `python -m` from the checkout: this checkout's package first
  import tensorflow  # noqa: F401  (the expensive imports, once)
  import tensorflow_datasets  # noqa: F401
  import vicreg_jax.main  # noqa: F401
  import vicreg_jax.train  # noqa: F401  (jax, flax, optax, orbax, clu)
  import vicreg_jax.evaluate.linear  # noqa: F401  (the evaluation jobs)
  print(json.dumps({'ready': os.getpid()}), flush=True)
  exits, buffered = {}, b''
  while True:
    ready, _, _ = select.select([0], [], [], 0.05)
    _reap(exits)
    if not ready:
      continue
    chunk = os.read(0, 1 << 16)
    if not chunk:  # the test process has gone
      return
    buffered += chunk
    while b'\n' in buffered:
      line, buffered = buffered.split(b'\n', 1)
      request = json.loads(line)
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(request)
      exits[pid] = request['exit']
      print(json.dumps({'pid': pid}), flush=True)


if __name__ == '__main__':
  main()
