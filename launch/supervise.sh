#!/usr/bin/env bash
# Keeps a training command going on one machine until its run has finished: restarts it after a crash or a
# reboot, with growing waits, and stops for good when the run is done or the command made a user's mistake.
#
#   launch/supervise.sh --workdir=gs://BUCKET/run -- ~/venv/bin/python -m vicreg_jax.main --workdir=gs://BUCKET/run ...
#   launch/supervise.sh --workdir=gs://BUCKET/run --unit=vicreg-train --log=$HOME/vicreg_train.log -- COMMAND...
#
# Flags: --workdir=DIR (local or gs://)  --done=FILE (instead of DIR/summary.json)  --backoff=10  --max-backoff=120
#        --reset-after=600  --max-restarts=20 (seconds may have decimals)  --unit=NAME --log=/ABSOLUTE/FILE
#        --print-unit
#
# The command resumes by itself from the newest checkpoint in its workdir, so a restart is the same command
# again. After each exit of the command:
#   WORKDIR/summary.json exists  the run has finished: exit 0, never restarted (the file is checked, not the
#                                status: a run stopped by SIGTERM with a checkpoint also exits 0)
#   status 2                     a user's mistake (vicreg_jax/main.py), which a restart repeats: exit 2
#   anything else                restarted after --backoff seconds, doubled at each restart in a row up to
#                                --max-backoff; a run that lasted --reset-after seconds starts the count again;
#                                after --max-restarts restarts in a row the supervisor gives up (exit 1)
# SIGTERM or SIGINT to the supervisor is forwarded to the command, and the supervisor exits when the command has
# (so its checkpoint save completes), with the command's status; nothing is restarted after it.
#
# On a slice of several workers, each worker runs its own supervisor and the processes find each other again
# by themselves: a process that crashes ends the run on every worker within the trainer's
# --distributed_heartbeat_timeout (100 s), each supervisor restarts its own process, and the restarted
# processes wait up to --distributed_init_timeout (300 s) for the others at start-up. This needs no machine
# outside the slice to stay up; it holds while --max-backoff (120 s) + the heartbeat timeout stay below the
# start-up timeout, so that the first process restarted still waits for the last one.
#
# --unit=NAME installs the supervisor (with the same flags and command) as the systemd service NAME, enabled at
# boot, and (re)starts it: a rebooted worker (maintenance) starts training again without anyone logging in, and
# systemd stops it on shutdown with SIGTERM to the supervisor only (KillMode=mixed), which forwards it.
# Output is appended to --log. --print-unit prints the unit file and installs nothing.
set -euo pipefail

WORKDIR=
DONE=
BACKOFF=10
MAX_BACKOFF=120
RESET_AFTER=600
MAX_RESTARTS=20
UNIT=
LOG=
PRINT_UNIT=0
FLAGS=()

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }  # the comment at the top

say() { printf 'supervise %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}"; FLAGS+=("$1") ;;
    --done=*) DONE="${1#*=}"; FLAGS+=("$1") ;;
    --backoff=*) BACKOFF="${1#*=}"; FLAGS+=("$1") ;;
    --max-backoff=*) MAX_BACKOFF="${1#*=}"; FLAGS+=("$1") ;;
    --reset-after=*) RESET_AFTER="${1#*=}"; FLAGS+=("$1") ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}"; FLAGS+=("$1") ;;
    --unit=*) UNIT="${1#*=}" ;;
    --log=*) LOG="${1#*=}" ;;
    --print-unit) PRINT_UNIT=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
(($#)) || { echo 'error: give the command after -- (see --help)' >&2; exit 2; }
[[ -n "$DONE" || -n "$WORKDIR" ]] || { echo 'error: give --workdir=DIR (or --done=FILE)' >&2; exit 2; }
DONE="${DONE:-$WORKDIR/summary.json}"
for value in "$BACKOFF" "$MAX_BACKOFF" "$RESET_AFTER"; do
  [[ "$value" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "error: $value is not a number of seconds" >&2; exit 2; }
done
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || { echo "error: --max-restarts=$MAX_RESTARTS is not a count" >&2; exit 2; }

# An argument for systemd's ExecStart: in double quotes, with \ " $ % escaped as systemd reads them.
unit_quote() {
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//\$/\$\$}"
  printf '"%s"' "${s//%/%%}"
}

# The systemd service running this supervisor (same flags) on COMMAND. Each start also turns transparent
# hugepages on (a reboot turns them off; JAX warns when they are off on TPU v5e and newer).
unit_file() {
  local arg line
  line="$(unit_quote "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")")"
  for arg in "${FLAGS[@]}" -- "$@"; do line+=" $(unit_quote "$arg")"; done
  cat <<EOF
[Unit]
Description=vicreg_jax training, restarted until its run has finished (launch/supervise.sh)
Wants=network-online.target
After=network-online.target

[Service]
User=$(id -un)
WorkingDirectory=$(pwd)
Environment=$(unit_quote "PATH=$PATH")
ExecStartPre=+-/bin/sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled'
ExecStart=$line
StandardOutput=append:$LOG
StandardError=inherit
KillMode=mixed
TimeoutStopSec=600
Restart=on-abnormal
RestartSec=30

[Install]
WantedBy=multi-user.target
EOF
}

install_unit() {  # install_unit COMMAND...: writes, enables and (re)starts the service UNIT
  [[ "$UNIT" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "error: --unit=$UNIT is not a unit name" >&2; exit 2; }
  [[ "$LOG" == /* ]] || { echo "error: --unit needs --log=/ABSOLUTE/PATH (got '$LOG')" >&2; exit 2; }
  if ((PRINT_UNIT)); then unit_file "$@"; exit 0; fi
  : >> "$LOG"  # created by this user (systemd would create it as root)
  unit_file "$@" | sudo tee "/etc/systemd/system/$UNIT.service" > /dev/null
  sudo systemctl daemon-reload
  sudo systemctl enable "$UNIT"
  sudo systemctl restart "$UNIT"
  say "systemd service $UNIT (re)started; output appended to $LOG"
  exit 0
}

finished() {  # whether DONE exists (gs:// through gcloud storage, else the local file system)
  if [[ "$DONE" == gs://* ]]; then gcloud storage ls "$DONE" > /dev/null 2>&1; else [[ -e "$DONE" ]]; fi
}

child=
sleeper=
stopping=0
on_signal() {  # SIGTERM/SIGINT: forwarded to the command (or the wait cut short); the loop then exits
  stopping=1
  if [[ -n "$child" ]]; then kill -TERM "$child" 2> /dev/null || true; fi
  if [[ -n "$sleeper" ]]; then kill "$sleeper" 2> /dev/null || true; fi
}

run_once() {  # run_once COMMAND...: runs it in the background and waits for it through any signal; sets status
  "$@" &
  child=$!
  if ((stopping)); then kill -TERM "$child" 2> /dev/null || true; fi  # a signal before child was set
  while kill -0 "$child" 2> /dev/null; do wait "$child" || true; done
  status=0
  wait "$child" || status=$?
  child=
}

pause() {  # pause SECONDS: a wait that SIGTERM cuts short
  sleep "$1" &
  sleeper=$!
  wait "$sleeper" || true
  sleeper=
}

if [[ -n "$UNIT" ]]; then install_unit "$@"; fi
trap on_signal TERM INT
restarts=0
delay="$BACKOFF"
while :; do
  if finished; then say "the run has finished ($DONE exists)"; exit 0; fi
  if ((stopping)); then say 'stopped by a signal'; exit 0; fi
  say "starting: $*"
  started=$SECONDS
  run_once "$@"
  ran=$((SECONDS - started))
  if ((stopping)); then say "stopped by a signal; the command exited $status"; exit "$status"; fi
  if finished; then say "the run has finished ($DONE exists)"; exit 0; fi
  if ((status == 2)); then say 'the command exited 2 (a user error): not restarted'; exit 2; fi
  if ((status == 0 || ran >= ${RESET_AFTER%.*})); then restarts=0; delay="$BACKOFF"; fi
  if ((restarts >= MAX_RESTARTS)); then say "the command exited $status; gave up after $restarts restarts in a row"; exit 1; fi
  restarts=$((restarts + 1))
  say "the command exited $status after $ran s; restart $restarts in $delay s"
  pause "$delay"
  if ((stopping)); then say 'stopped by a signal while waiting to restart'; exit 0; fi
  delay="$(awk -v d="$delay" -v m="$MAX_BACKOFF" 'BEGIN { d *= 2; print (d > m ? m : d) }')"
done
