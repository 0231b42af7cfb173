"""Start-up of multi-process runs: cluster detection, the one-line errors (no coordinator, a peer that never
comes, SLURM without srun, incomplete flags), the stderr filter on the runtime's real fatal reports; the private
JAX attributes vicreg_jax/distributed.py relies on, each still there."""

import ast
import subprocess
import sys
import time

import pytest

from conftest import REPO, Job, free_port, job_env
from vicreg_jax import _stderr_filter, distributed

SRUN = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1',
        'SLURM_LOCALID': '0', 'SLURM_STEP_NUM_TASKS': '2'}


def test_a_single_machine_initialises_nothing(monkeypatch):
  for k in list(SRUN) + ['TPU_WORKER_HOSTNAMES', 'OMPI_MCA_orte_hnp_uri', 'KUBERNETES_SERVICE_HOST']:
    monkeypatch.delenv(k, raising=False)
  assert distributed._detected_cluster() is None
  assert distributed.initialize() is False
  assert distributed.initialize('localhost:1234', 1, 0) is False  # one process of one: nothing to start


def test_srun_is_detected_and_sbatch_without_srun_is_an_error(monkeypatch):
  for k, v in SRUN.items():
    monkeypatch.setenv(k, v)
  assert distributed._detected_cluster() == ('SlurmCluster', 2)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '1')
  assert distributed._detected_cluster() is None  # one task: a single machine
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.delenv('SLURM_STEP_NUM_TASKS')  # the batch script itself, not a task started by srun
  with pytest.raises(distributed.DistributedStartError, match='not started by srun'):
    distributed._detected_cluster()


def test_flags_are_all_three_or_none():
  with pytest.raises(distributed.DistributedStartError, match='all three'):
    distributed.initialize('localhost:1234', None, 0)
  with pytest.raises(distributed.DistributedStartError, match='process_id'):
    distributed.initialize('localhost:1234', 2, 2)


# Reports the runtime printed in real two-process runs on this machine (jax 0.10.2) before aborting: a peer
# killed (seen by process 0), and the coordinator killed (seen by process 1); stack traces shortened.
PEER_LOST = '''I1201 08:30:11.100000 2355 train.py:264] step 19/100  loss 21.0
E1201 08:30:21.523027    2361 coordination_service.cc:1549] [3207986576247071696] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1201 08:30:21.523700    2372 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1201 08:30:21.523917    2372 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
*** Check failure stack trace: ***
    @     0x7fc054f0cd5b  std::_Function_handler<>::_M_invoke()
    @     0x7fc0602a71f5  (unknown)
'''
COORDINATOR_LOST = '''I1201 08:35:09.900000 3375 train.py:264] step 16/100  loss 21.0
E1201 08:35:10.486056    3661 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1201 08:35:10.486286    3661 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues. Check earlier logs from 1) this task, 2) the leader (usually slice 0 task 0), and 3) cluster scheduler to debug further.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}
*** Check failure stack trace: ***
    @     0x7fc054f0cd5b  std::_Function_handler<>::_M_invoke()
'''
NO_COORDINATOR = '''I1201 09:11:46.188932 139689579568000 distributed.py:172] Connecting to JAX distributed service on localhost:45999
F1201 09:11:56.191938   11188 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/RegisterTask
*** Check failure stack trace: ***
Fatal Python error: Aborted

Current thread 0x00007f0c03c4db80 (most recent call first):
  File "/work/venv/lib/python3.11/site-packages/jax/_src/distributed.py", line 173 in initialize
'''
BENIGN = '''W1201 08:40:00.000000 1 something.cc:12] a warning stays
E1201 08:40:01.000000 1 coordination_service.cc:99] a report that is not followed by a fatal error
  its second line
Python output that follows it
error: our own line
'''


def run_filter(text: str) -> str:
  return subprocess.run([sys.executable, '-I', _stderr_filter.__file__, 'HINT'], input=text, capture_output=True,
                        text=True, timeout=30).stdout


@pytest.mark.parametrize('report, expected', [
    (PEER_LOST, 'error: distributed run stopped: process 1 stopped responding (crashed, killed or preempted); '
                'see its log'),
    (COORDINATOR_LOST, 'error: distributed run stopped: lost the coordinator (process 0): it crashed, was '
                       'preempted or cannot be reached; see its log'),
    (NO_COORDINATOR, 'error: could not start the distributed run (coordinator localhost:45999) within the start-up '
                     'timeout: HINT')])
def test_the_runtime_fatal_report_becomes_one_line(report, expected):
  out = run_filter(report).splitlines()
  assert out == [report.splitlines()[0], expected]


def test_the_filter_passes_everything_else_through():
  out = run_filter(BENIGN).splitlines()
  # A runtime error report not followed by a fatal error is shown in full (held, then released); one that an
  # error line of ours follows is superseded by it.
  assert out == ['W1201 08:40:00.000000 1 something.cc:12] a warning stays', 'error: our own line']
  released = run_filter(BENIGN.replace('error: our own line\n', 'I1201 08:40:02.0 1 x.py:1] next\n')).splitlines()
  assert released == BENIGN.splitlines()[:4] + ['I1201 08:40:02.0 1 x.py:1] next']


@pytest.mark.slow
def test_start_up_failures_end_in_one_line_within_the_timeout(tmp_path):
  """No coordinator (process 1 alone), a peer that never comes (process 0 alone), SLURM without srun,
  incomplete flags: each one line on stderr and a non-zero exit, the first two within the start-up timeout."""
  timeout = 5
  args = ['--config.num_steps=1', f'--workdir={tmp_path / "run"}', f'--distributed_init_timeout={timeout}']
  cases = {
      'no_coordinator': ([f'--coordinator_address=localhost:{free_port()}', '--num_processes=2', '--process_id=1'],
                         {}, 'error: could not start the distributed run (coordinator localhost:'),
      'missing_peer': ([f'--coordinator_address=localhost:{free_port()}', '--num_processes=2', '--process_id=0'],
                       {}, 'error: could not start the distributed run (coordinator localhost:'),
      'sbatch': ([], {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2'}, 'error: SLURM_NTASKS=2 but this process was not '
                                                                 'started by srun'),
      'flags': (['--num_processes=2'], {}, 'error: give all three of --coordinator_address'),
  }
  started = time.time()
  jobs = {name: Job(args + flags, tmp_path, name=name, env=env) for name, (flags, env, _) in cases.items()}
  for name, job in jobs.items():
    (code,) = job.wait(120)
    elapsed = time.time() - started
    err = job.stderr()
    lines = err.strip().splitlines()
    print(f'{name}: exit {code} after {elapsed:.0f} s: {lines[-1]}')
    assert code != 0 and lines[-1].startswith(cases[name][2]), err[-2000:]
    assert 'Traceback' not in err and len([ln for ln in lines if ln.startswith('error')]) == 1, err[-2000:]
  assert time.time() - started < 90  # start-up (imports) plus the 5 s timeout, not the default 300 s


# --- JAX's private API (jax._src), used by vicreg_jax/distributed.py only ------------------------------------

def _missing(root, root_name: str, path: str, call: bool = False) -> list:
  """[a message naming ``root_name.path``] when that attribute (dotted ``path``) is gone, or not callable
  though ``call``; else []."""
  obj, name = root, root_name
  for part in path.split('.'):
    name += '.' + part
    if not hasattr(obj, part):
      return [f'{name} is gone']
    obj = getattr(obj, part)
  return [f'{name} is no longer callable'] if call and not callable(obj) else []


def test_jax_private_attributes_used_by_distributed_exist():
  """vicreg_jax/distributed.py reads JAX's cluster detectors and the runtime's client from jax._src; a JAX that
  moved or renamed any of them fails here, naming it, instead of in the middle of a multi-process start-up."""
  from jax._src import clusters  # as distributed._cluster_types imports it
  from jax._src import distributed as jax_distributed  # as distributed._runtime_client imports it
  problems = _missing(clusters, 'jax._src.clusters', 'ClusterEnv._cluster_types')
  if not problems:
    envs = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
    if not envs or 'SlurmCluster' not in [env.__name__ for env in envs]:
      problems.append(f'jax._src.clusters.ClusterEnv._cluster_types holds no SlurmCluster: {envs}')
    for env in envs:
      name = f'jax._src.clusters.{env.__name__}'
      problems += _missing(env, name, 'opt_in_only_method')
      problems += _missing(env, name, 'is_env_present', call=True)
      problems += _missing(env, name, 'get_process_count', call=True)
  problems += _missing(jax_distributed, 'jax._src.distributed', 'global_state.client')
  assert not problems, 'JAX changed its private API that vicreg_jax/distributed.py uses: ' + '; '.join(problems)
  assert distributed._cluster_types() == list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access


RUNTIME_CLIENT = """
import jax
from vicreg_jax import distributed
jax.distributed.initialize('localhost:{port}', 1, 0, initialization_timeout=60)
client = distributed._runtime_client()
for name in ('key_value_set', 'blocking_key_value_get'):
  assert callable(getattr(client, name, None)), (
      f'jax._src.distributed.global_state.client.{{name}} is gone or not callable ({{type(client).__name__}})')
client.key_value_set('vicreg_jax/test', '[1, 2]')
print(client.blocking_key_value_get('vicreg_jax/test', 10000))
"""


def test_the_runtime_client_has_a_key_value_store():
  """The client of a one-process distributed runtime (a process of its own) has the key-value calls
  share_from_process_0 makes, and a value set is read back."""
  out = subprocess.run([sys.executable, '-c', RUNTIME_CLIENT.format(port=free_port())], capture_output=True,
                       text=True, timeout=120, cwd=REPO, env=job_env(1))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == '[1, 2]', out.stdout


def test_only_distributed_uses_jax_private_modules():
  """jax._src is imported in vicreg_jax/distributed.py only, and there only the modules checked above."""
  found = []
  for path in sorted((REPO / 'vicreg_jax').rglob('*.py')):
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jax._src'):
        found += [(path.name, node.module, alias.name) for alias in node.names]
      elif isinstance(node, ast.Import):
        found += [(path.name, alias.name, '') for alias in node.names if alias.name.startswith('jax._src')]
    assert path.name == 'distributed.py' or 'jax._src' not in text, f'{path} mentions jax._src'
  assert sorted(found) == [('distributed.py', 'jax._src', 'clusters'), ('distributed.py', 'jax._src', 'distributed')]
