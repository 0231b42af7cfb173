#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice, with the linear-evaluation job on a TPU VM of its own.
#
#   launch/tpu_pod.sh --zone=us-central2-b --accelerator=v4-32 --bucket=gs://BUCKET up
#   launch/tpu_pod.sh --zone=us-central2-b --bucket=gs://BUCKET status   # slice state, log lines, checkpoint
#   launch/tpu_pod.sh --zone=us-central2-b logs        # the last lines of every worker's log
#   launch/tpu_pod.sh --zone=us-central2-b delete      # both TPU VMs
#
# Steps (each a command; `up` runs create, copy, install, preflight, train and eval in that order, preflight
# first with --preflight-venv):
#   create    the slice NAME (on-demand, --spot, or --queued: a queued resource, waited for) and NAME-eval, with
#             Cloud TPU Autocheckpoint where it is offered (a SIGTERM before maintenance)
#   copy      the committed code (git archive HEAD) to every worker of both, unpacked in ~/vicreg_jax
#   install   on every worker: waits for the dpkg lock (unattended-upgrades after boot) and retries, turns on
#             transparent hugepages, PYTHON (3.11, Ubuntu's package; a uv-managed Python when the image has
#             none) and a virtual environment ~/venv with jax[tpu]==JAX_VERSION and the package
#   preflight benchmarks/tpu_compile.py --check: compiles the training step for the slice's topology and stops
#             here (exit 3) when it does not fit the chips' memory; on worker 0, or here with --preflight-venv
#   train     python -m vicreg_jax.main on every worker under launch/supervise.sh, a systemd service
#             (vicreg-train) that restarts it after a crash or a reboot until WORKDIR/summary.json exists;
#             log ~/vicreg_train.log on each worker; workdir BUCKET/NAME, data BUCKET/tensorflow_datasets
#   eval      the linear-evaluation job on NAME-eval (one process owns a TPU VM's chips), following the
#             checkpoints in BUCKET/NAME; results in BUCKET/NAME_linear; log ~/vicreg_eval.log
#   status    the slice's state and health, each worker's service state and last log line, and the newest
#             checkpoint step in BUCKET/NAME/checkpoints
#   logs      the last 20 lines of every worker's logs, each line prefixed with its host
#   follow    tail -f of worker 0's training log
#   stop      the training service on every worker: SIGTERM, a checkpoint, not restarted (train starts it again)
#   delete    both TPU VMs (and queued resources)
#   recreate  after a preemption, the slice only: deleted if still there, created, copy, install, preflight,
#             train; training resumes from the newest checkpoint in the bucket, and the evaluation job,
#             untouched, keeps waiting for new checkpoints
# --train-only limits create, copy, install, status, logs and delete to the slice. --no-preflight leaves the
# pre-flight out of up and recreate. --dry-run prints every command it would run and runs none. Flags after `--`
# go to the training command (e.g. -- --config.batch_size=4096; the pre-flight compiles with its --config.*
# ones). The runtime (TPU software version) and the evaluation VM follow the accelerator's generation unless
# given.
set -euo pipefail

NAME=vicreg
ZONE=
ACCELERATOR=v4-32
EVAL_ACCELERATOR=
RUNTIME=
PYTHON=python3.11
BUCKET=
CONFIG=configs/imagenet.py
EVAL_CONFIG=configs/imagenet_linear.py
SPOT=0
QUEUED=0
TRAIN_ONLY=0
JAX_VERSION=0.10.2
DRY_RUN=0
PREFLIGHT=1
PREFLIGHT_VENV=
COMMANDS=()
EXTRA=()
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"  # the comment at the top
  cat <<EOF

Flags: --name=$NAME --zone=ZONE --accelerator=$ACCELERATOR --eval-accelerator=(v4-8, v5litepod-4, ...)
       --runtime=(tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, ...) --bucket=gs://BUCKET --config=$CONFIG
       --eval-config=$EVAL_CONFIG --python=$PYTHON --jax-version=$JAX_VERSION
       --preflight-venv=PATH (a Python environment with jax[tpu]==JAX_VERSION: PATH/bin/python)
       --spot (preemptible)  --queued (a queued resource)  --train-only  --no-preflight  --dry-run
EOF
}

# The TPU software version for an accelerator type (Cloud TPU's table for JAX; v4 and older share one).
runtime_for() {
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# A single-host TPU VM of the same generation (hence offered in the same zones) for the evaluation job.
eval_accelerator_for() {
  case "$1" in
    v2-*) echo v2-8 ;;
    v3-*) echo v3-8 ;;
    v5litepod-*|v5e-*) echo v5litepod-4 ;;
    v5p-*) echo v5p-8 ;;
    v6e-*) echo v6e-4 ;;
    *) echo v4-8 ;;
  esac
}

# Whether Cloud TPU Autocheckpoint is offered for an accelerator type: "Only TPUs (v2-v4, and v5e) created
# through the Cloud TPU API" (https://cloud.google.com/tpu/docs/autocheckpoint). With --autocheckpoint-enabled
# (gcloud's alpha track, on create and on queued-resources create), a maintenance event first sends SIGTERM to
# the process using the TPU and waits for it to exit, 5 minutes at most; without it the VM just stops.
autocheckpoint_offered() {
  case "$1" in
    v2-*|v3-*|v4-*|v5litepod-*|v5e-*) return 0 ;;
    *) return 1 ;;
  esac
}

# The compile-only topology of an accelerator type for benchmarks/tpu_compile.py --topology: v4-N and v5p-N
# have N/2 chips (N counts TensorCores, two per chip), in a 3-D torus; v5litepod-N and v6e-N have N chips in a
# 2-D grid. Cloud TPU's shapes grow from 2x2(x1) by doubling the last of the smallest sides: v4-32 is
# v4:2x2x4, v4-64 v4:2x4x4, v5litepod-16 v5e:4x4, v5litepod-8 v5e:2x4, v5p-16 v5p:2x2x2.
topology_for() {
  local kind size chips dims i low product=1
  size="${1##*-}"
  case "$1" in
    v4-*) kind=v4; chips=$((size / 2)); dims=(2 2 1) ;;
    v5p-*) kind=v5p; chips=$((size / 2)); dims=(2 2 1) ;;
    v5litepod-*|v5e-*) kind=v5e; chips="$size"; dims=(2 2) ;;
    v6e-*) kind=v6e; chips="$size"; dims=(2 2) ;;
    *) return 1 ;;
  esac
  [[ "$size" =~ ^[0-9]+$ ]] || return 1
  if ((chips == 1 && ${#dims[@]} == 2)); then echo "$kind:1x1"; return 0; fi
  for i in "${dims[@]}"; do product=$((product * i)); done
  while ((product < chips)); do
    low=$((${#dims[@]} - 1))
    for ((i = ${#dims[@]} - 1; i >= 0; i--)); do if ((dims[i] < dims[low])); then low=$i; fi; done
    dims[low]=$((dims[low] * 2))
    product=$((product * 2))
  done
  ((product == chips)) || return 1
  local IFS=x
  echo "$kind:${dims[*]}"
}

while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --eval-accelerator=*) EVAL_ACCELERATOR="${1#*=}" ;;
    --runtime=*) RUNTIME="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --train-only) TRAIN_ONLY=1 ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --eval-config=*) EVAL_CONFIG="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --jax-version=*) JAX_VERSION="${1#*=}" ;;
    --preflight-venv=*) PREFLIGHT_VENV="${1#*=}" ;;
    --no-preflight) PREFLIGHT=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|copy|install|preflight|train|eval|status|logs|follow|stop|delete) COMMANDS+=("$1") ;;
    up) COMMANDS+=(preflight-here create copy install preflight-there train eval) ;;
    recreate) TRAIN_ONLY=1; COMMANDS+=(delete-if-there preflight-here create copy install preflight-there train) ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
((${#COMMANDS[@]})) || { usage >&2; exit 2; }
if [[ -n "$PREFLIGHT_VENV" && "$PREFLIGHT_VENV" != /* ]]; then PREFLIGHT_VENV="$PWD/$PREFLIGHT_VENV"; fi
[[ -n "$ZONE" ]] || { echo "error: --zone is required (e.g. --zone=us-central2-b)" >&2; exit 2; }
needs_bucket() { [[ "$BUCKET" == gs://* ]] || { echo "error: --bucket=gs://BUCKET is required for $1" >&2; exit 2; }; }

EVAL_NAME="$NAME-eval"
EVAL_ACCELERATOR="${EVAL_ACCELERATOR:-$(eval_accelerator_for "$ACCELERATOR")}"
VMS=("$NAME" "$EVAL_NAME")
if ((TRAIN_ONLY)); then VMS=("$NAME"); fi
WORKDIR="$BUCKET/$NAME"
DATA_DIR="$BUCKET/tensorflow_datasets"
TARBALL="${TMPDIR:-/tmp}/vicreg_jax-$NAME.tar.gz"

# Prints a command (arguments with shell characters in single quotes, so it can be pasted), then runs it
# unless --dry-run.
run() {
  local arg line='+'
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$line"
  if ((!DRY_RUN)); then "$@"; fi
}

tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }

# on VM COMMAND: runs COMMAND on every worker of VM.
on() { tpu ssh "$1" --worker=all --command="$2"; }

create_vm() {  # create_vm VM ACCELERATOR
  local extra=() gcloud=(gcloud compute tpus) runtime="${RUNTIME:-$(runtime_for "$2")}" state
  if ((SPOT)); then extra=(--spot); fi
  if autocheckpoint_offered "$2"; then
    gcloud=(gcloud alpha compute tpus)
    extra+=(--autocheckpoint-enabled)
  else
    echo "note: Cloud TPU Autocheckpoint is not offered for $2: a maintenance event there is a hard stop (no" \
         "SIGTERM; the steps since the last checkpoint are lost, then the supervisor restarts training)"
  fi
  if ((QUEUED)); then
    run "${gcloud[@]}" queued-resources create "$1-qr" --node-id="$1" --zone="$ZONE" \
      --accelerator-type="$2" --runtime-version="$runtime" "${extra[@]}"
    echo "waiting for queued resource $1-qr to become ACTIVE ..."
    while ((!DRY_RUN)); do
      state="$(gcloud compute tpus queued-resources describe "$1-qr" --zone="$ZONE" --format='value(state.state)')"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDING|SUSPENDED) echo "error: queued resource $1-qr is $state" >&2; exit 1 ;;
      esac
      sleep 30
    done
  else
    run "${gcloud[@]}" tpu-vm create "$1" --accelerator-type="$2" --version="$runtime" "${extra[@]}" --zone="$ZONE"
  fi
}

delete_vm() {  # delete_vm VM (with --queued, its queued resource and the VM)
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$1-qr" --zone="$ZONE" --force --quiet
  else
    tpu delete "$1" --quiet
  fi
}

copy_code() {  # copy_code VM
  on "$1" 'rm -rf ~/vicreg_jax ~/vicreg_jax.tar.gz'
  tpu scp "$TARBALL" "$1:~/vicreg_jax.tar.gz" --worker=all
  on "$1" 'tar xzf ~/vicreg_jax.tar.gz -C ~'
}

# The command install runs on every worker, one line (so that --dry-run prints it whole):
# - apt waits for the dpkg and package-list locks (unattended-upgrades holds them for minutes after a boot), 10
#   minutes at most, through fuser and apt's own DPkg::Lock::Timeout, and each apt-get is tried 3 times;
# - transparent hugepages on (the TPU runtime starts and stops faster on v5e and newer; JAX warns when off);
# - PYTHON from Ubuntu's packages (the TPU images have 3.10; JAX 0.10 needs 3.11), or, when the image offers
#   none or its venv module is missing, a Python of that version managed by uv (installed with pip, else its
#   installer script); then ~/venv (the system Python refuses pip: PEP 668) with jax[tpu] and the package.
install_command() {
  local version="${PYTHON#python}"
  # shellcheck disable=SC2088  # a tilde that the worker's shell expands
  local steps=(
    'set -e'
    "apt_get() { for try in 1 2 3; do echo \"[\$(hostname)] apt-get \$* (try \$try of 3)\"; for _ in \$(seq 120); do sudo fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock > /dev/null 2>&1 || break; echo \"[\$(hostname)] waiting for the dpkg lock\"; sleep 5; done; sudo apt-get -qq -o DPkg::Lock::Timeout=600 \"\$@\" && return 0; sleep 30; done; return 1; }"
    'echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled > /dev/null'
    "if ! $PYTHON -c 'import ensurepip' 2> /dev/null; then apt_get update && apt_get -y install $PYTHON $PYTHON-venv || echo \"[\$(hostname)] no $PYTHON package\"; fi"
    'rm -rf ~/venv'
    "if ! { command -v $PYTHON > /dev/null && $PYTHON -m venv ~/venv; }; then rm -rf ~/venv; python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh; ~/.local/bin/uv venv --seed --python $version ~/venv; fi"
    '~/venv/bin/pip install -q --upgrade pip'
    "~/venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e ~/vicreg_jax"
  )
  local line
  printf -v line '%s; ' "${steps[@]}"
  echo "${line%; }"
}

install() {  # install VM
  on "$1" "$(install_command)"
}

start() {  # start VM LOG ARGS...: the job on every worker, in the background, surviving the ssh session
  local vm="$1" log="$2" args
  shift 2
  args="$(printf ' %q' "$@")"
  on "$vm" "cd ~/vicreg_jax && nohup ~/venv/bin/python -m vicreg_jax.main$args > ~/$log 2>&1 < /dev/null &"
}

# supervise VM ARGS...: training on every worker under launch/supervise.sh, installed as the systemd service
# vicreg-train (enabled at boot). Each worker restarts its own process; the processes find each other again
# through JAX's start-up wait (launch/README.md, Supervision).
supervise() {
  local vm="$1" args
  shift
  args="$(printf ' %q' "$@")"
  on "$vm" "cd ~/vicreg_jax && launch/supervise.sh --workdir=$(printf %q "$WORKDIR") --unit=vicreg-train --log=\$HOME/vicreg_train.log -- \$HOME/venv/bin/python -m vicreg_jax.main$args"
}

# The pre-flight: benchmarks/tpu_compile.py --check compiles the training step for the slice's topology on the
# CPU (compile-only TPU devices, JAX_PLATFORMS=cpu: the chips are not touched) with the training command's
# --config.* flags. Exit status 3 (does not fit) stops here; another failure is reported and training goes on.
preflight() {
  local topology flags=() arg status=0
  if ! topology="$(topology_for "$ACCELERATOR")"; then
    echo "note: no compile-only topology known for $ACCELERATOR: pre-flight skipped"
    return 0
  fi
  for arg in "${EXTRA[@]}"; do if [[ "$arg" == --config.* ]]; then flags+=("$arg"); fi; done
  if [[ -n "$PREFLIGHT_VENV" ]]; then
    (cd "$REPO" && run env JAX_PLATFORMS=cpu PYTHONPATH="$REPO" "$PREFLIGHT_VENV/bin/python" benchmarks/tpu_compile.py \
      --config="$CONFIG" --topology="$topology" --check "${flags[@]}") || status=$?
  else
    arg="$(printf ' %q' --config="$CONFIG" --topology="$topology" --check "${flags[@]}")"
    tpu ssh "$NAME" --worker=0 --command="cd ~/vicreg_jax && JAX_PLATFORMS=cpu ~/venv/bin/python benchmarks/tpu_compile.py$arg" || status=$?
  fi
  if ((status == 3)); then
    echo "error: the training step does not fit $ACCELERATOR (above); not started (--no-preflight skips the check)" >&2
    exit 3
  elif ((status)); then
    echo "warning: the pre-flight check failed (exit $status), which says nothing of the config; going on" >&2
  fi
}

# status: the slice's state and health, each worker's service state and last log line, the newest checkpoint.
status() {
  local vm
  for vm in "${VMS[@]}"; do tpu describe "$vm" --format='value(name.basename(),state,health,acceleratorType)'; done
  on "$NAME" "echo \"[\$(hostname)] \$(systemctl is-active vicreg-train): \$(tail -n 1 ~/vicreg_train.log 2> /dev/null)\""
  if ((!TRAIN_ONLY)); then on "$EVAL_NAME" "echo \"[\$(hostname)] \$(tail -n 1 ~/vicreg_eval.log 2> /dev/null)\""; fi
  # Orbax's step folders are WORKDIR/checkpoints/STEP/ (a save in progress has another name).
  run bash -c 'gcloud storage ls "$1" 2> /dev/null | awk -F/ -v dir="$1" '\''$(NF-1) ~ /^[0-9]+$/ && $(NF-1) + 0 >= m { m = $(NF-1) + 0; n = 1 } END { print n ? "newest checkpoint: step " m : "no checkpoint in " dir }'\''' \
    newest "$WORKDIR/checkpoints/"
}

STEPS=()
for cmd in "${COMMANDS[@]}"; do
  case "$cmd" in
    preflight-here) if ((PREFLIGHT)) && [[ -n "$PREFLIGHT_VENV" ]]; then STEPS+=(preflight); fi ;;
    preflight-there) if ((PREFLIGHT)) && [[ -z "$PREFLIGHT_VENV" ]]; then STEPS+=(preflight); fi ;;
    *) STEPS+=("$cmd") ;;
  esac
done

for cmd in "${STEPS[@]}"; do
  echo "== $cmd"
  case "$cmd" in
    create)
      create_vm "$NAME" "$ACCELERATOR"
      if ((!TRAIN_ONLY)); then create_vm "$EVAL_NAME" "$EVAL_ACCELERATOR"; fi ;;
    copy)
      run git -C "$REPO" archive --format=tar.gz --prefix=vicreg_jax/ -o "$TARBALL" HEAD
      for vm in "${VMS[@]}"; do copy_code "$vm"; done ;;
    install)
      for vm in "${VMS[@]}"; do install "$vm"; done ;;
    preflight)
      preflight ;;
    train)
      needs_bucket train
      supervise "$NAME" --config="$CONFIG" --workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR" "${EXTRA[@]}" ;;
    eval)
      needs_bucket eval
      start "$EVAL_NAME" vicreg_eval.log --config="$EVAL_CONFIG" --workdir="${WORKDIR}_linear" \
        --config.pretrain_workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR" ;;
    status)
      needs_bucket status
      status ;;
    logs)
      on "$NAME" "tail -n 20 ~/vicreg_train.log | sed \"s/^/[\$(hostname)] /\""
      if ((!TRAIN_ONLY)); then on "$EVAL_NAME" "tail -n 20 ~/vicreg_eval.log | sed \"s/^/[\$(hostname)] /\""; fi ;;
    follow)
      tpu ssh "$NAME" --worker=0 --command='tail -f ~/vicreg_train.log' ;;
    stop)
      on "$NAME" 'sudo systemctl disable --now vicreg-train' ;;
    delete)
      for vm in "${VMS[@]}"; do delete_vm "$vm"; done ;;
    delete-if-there)  # a preempted spot VM or a suspended queued resource still exists; a deleted one does not
      delete_vm "$NAME" || echo "($NAME was not there)" ;;
  esac
done
