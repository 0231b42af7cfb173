"""launch/supervise.sh with a fake trainer in the trainer's place: a bash script that follows a plan (one line per
start: run until killed, finish, exit 0 without finishing, a user error, a crash) and records each start; SIGTERM
makes it "save" (write a file after a short delay) and exit 0, as the trainer does."""

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import REPO

SUPERVISE = REPO / 'launch' / 'supervise.sh'

FAKE_TRAINER = r'''#!/usr/bin/env bash
d="$1"
echo "$$ $(date +%s.%N)" >> "$d/starts"
trap 'sleep 0.5; echo saved > "$d/saved"; exit 0' TERM
case "$(sed -n "$(wc -l < "$d/starts")p" "$d/plan")" in
  finish) echo '{}' > "$d/summary.json"; exit 0 ;;
  finish_gs) touch "$d/gs_summary"; exit 0 ;;
  stopped) exit 0 ;;
  user_error) echo 'error: a mistake' >&2; exit 2 ;;
  crash) exit 1 ;;
esac
while :; do sleep 0.05; done
'''

FAKE_GCLOUD = r'''#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/gcloud_calls"
[[ -e "$FAKE_DIR/gs_summary" ]]
'''


def wait_for(condition, what, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.02)


class Supervised:
  """The supervisor on the fake trainer in ``tmp_path``, its output in supervise.log."""

  def __init__(self, tmp_path, plan, *flags, workdir=None, path=None):
    self.dir = tmp_path
    (tmp_path / 'plan').write_text('\n'.join(plan) + '\n')
    fake = tmp_path / 'trainer.sh'
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    env = dict(os.environ, FAKE_DIR=str(tmp_path), PATH=path or os.environ['PATH'])
    self.log_file = open(tmp_path / 'supervise.log', 'w')
    self.proc = subprocess.Popen(
        ['bash', str(SUPERVISE), f'--workdir={workdir or tmp_path}', '--backoff=0.2', '--max-backoff=5',
         '--reset-after=600', *flags, '--', str(fake), str(tmp_path)],
        stdout=self.log_file, stderr=subprocess.STDOUT, env=env)

  def starts(self) -> list:
    """(pid, wall time) of each start of the trainer."""
    path = self.dir / 'starts'
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), float(t)) for pid, t in (line.split() for line in lines)]

  def wait_starts(self, n: int) -> list:
    wait_for(lambda: len(self.starts()) >= n, f'start {n}')
    return self.starts()

  def finish(self, timeout=30) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
      self.log_file.close()

  def log(self) -> str:
    return (self.dir / 'supervise.log').read_text()


def test_a_trainer_killed_twice_is_restarted_twice_with_growing_waits(tmp_path):
  s = Supervised(tmp_path, ['run', 'run', 'finish'])
  killed = []
  for n in (1, 2):
    pid, _ = s.wait_starts(n)[-1]
    killed.append(time.time())
    os.kill(pid, signal.SIGKILL)
  assert s.finish() == 0, s.log()
  starts = s.starts()
  assert len(starts) == 3, s.log()
  waits = [float(w) for w in re.findall(r'the command exited 137 after \d+ s; restart \d in ([\d.]+) s', s.log())]
  assert waits == [0.2, 0.4], s.log()  # the wait doubled
  for kill_time, (_, start_time), wait in zip(killed, starts[1:], waits):
    assert start_time - kill_time >= wait  # and each wait took place before the restart
  assert 'the run has finished' in s.log()


def test_a_finished_run_is_not_restarted(tmp_path):
  s = Supervised(tmp_path, ['finish'])
  assert s.finish() == 0 and len(s.starts()) == 1, s.log()
  again = Supervised(tmp_path, ['run'])  # summary.json is there: the command is not even started
  assert again.finish() == 0 and len(again.starts()) == 1, again.log()
  assert again.log().count('the run has finished') == 1


def test_an_exit_0_without_summary_is_restarted(tmp_path):
  """A SIGTERM that reached the trainer alone (a maintenance event) also ends in exit 0 with a checkpoint."""
  s = Supervised(tmp_path, ['stopped', 'finish'])
  assert s.finish() == 0 and len(s.starts()) == 2, s.log()
  assert 'the command exited 0' in s.log() and 'restart 1 in 0.2 s' in s.log()


def test_a_user_error_is_not_restarted(tmp_path):
  s = Supervised(tmp_path, ['user_error', 'finish'])
  assert s.finish() == 2 and len(s.starts()) == 1, s.log()
  assert 'error: a mistake' in s.log() and 'not restarted' in s.log()


def test_crashes_in_a_row_give_up_after_max_restarts(tmp_path):
  s = Supervised(tmp_path, ['crash'] * 5, '--max-restarts=2', '--backoff=0.05')
  assert s.finish() == 1 and len(s.starts()) == 3, s.log()
  assert 'gave up after 2 restarts in a row' in s.log()


def test_sigterm_is_forwarded_and_the_save_completes_before_the_supervisor_exits(tmp_path):
  s = Supervised(tmp_path, ['run', 'finish'])
  s.wait_starts(1)
  s.proc.send_signal(signal.SIGTERM)
  assert s.finish() == 0, s.log()
  assert (tmp_path / 'saved').read_text() == 'saved\n'  # written 0.5 s after the trainer got SIGTERM
  assert len(s.starts()) == 1 and 'stopped by a signal; the command exited 0' in s.log(), s.log()


def test_sigterm_during_the_wait_before_a_restart_ends_it(tmp_path):
  s = Supervised(tmp_path, ['crash', 'finish'], '--backoff=120', '--max-backoff=120')
  wait_for(lambda: 'restart 1 in 120 s' in s.log(), 'the restart message')
  s.proc.send_signal(signal.SIGTERM)
  assert s.finish(timeout=30) == 0 and len(s.starts()) == 1, s.log()


def test_a_gs_workdir_is_checked_with_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
  (bin_dir / 'gcloud').chmod(0o755)
  s = Supervised(tmp_path, ['stopped', 'finish_gs'], workdir='gs://bkt/run', path=f'{bin_dir}:/usr/bin:/bin')
  assert s.finish() == 0 and len(s.starts()) == 2, s.log()
  calls = (tmp_path / 'gcloud_calls').read_text().splitlines()
  assert calls and all(c == 'storage ls gs://bkt/run/summary.json' for c in calls), calls


def test_the_systemd_unit(tmp_path):
  r = subprocess.run(['bash', str(SUPERVISE), '--workdir=gs://bkt/run', '--backoff=5', '--unit=vicreg-train',
                      f'--log={tmp_path}/train.log', '--print-unit', '--', '/venv/bin/python', '-m',
                      'vicreg_jax.main', '--config.x=50%$HOME'], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  unit = dict(line.split('=', 1) for line in r.stdout.splitlines() if '=' in line)
  assert unit['ExecStart'] == (f'"{SUPERVISE}" "--workdir=gs://bkt/run" "--backoff=5" "--" "/venv/bin/python" "-m" '
                               '"vicreg_jax.main" "--config.x=50%%$$HOME"')  # systemd's % and $ escaped
  assert unit['StandardOutput'] == f'append:{tmp_path}/train.log'
  assert unit['KillMode'] == 'mixed'  # systemd's SIGTERM goes to the supervisor, which forwards it
  assert unit['Restart'] == 'on-abnormal' and unit['WantedBy'] == 'multi-user.target'
  assert 'transparent_hugepage' in unit['ExecStartPre']
  assert not (tmp_path / 'train.log').exists()  # --print-unit installs nothing


@pytest.mark.parametrize('args, message', [
    (['--', 'true'], '--workdir'),
    (['--workdir=x'], 'give the command'),
    (['--workdir=x', '--backoff=soon', '--', 'true'], 'not a number'),
    (['--workdir=x', '--unit=u', '--log=relative.log', '--', 'true'], '--log=/ABSOLUTE/PATH'),
])
def test_bad_arguments_are_one_line_and_status_2(args, message):
  r = subprocess.run(['bash', str(SUPERVISE), *args], capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and r.stderr.startswith('error: ') and message in r.stderr, r.stderr
