#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice, with the linear-evaluation job on a TPU VM of its own.
#
#   launch/tpu_pod.sh --zone=us-central2-b --accelerator=v4-32 --bucket=gs://BUCKET up
#   launch/tpu_pod.sh --zone=us-central2-b logs        # the last lines of every worker's log
#   launch/tpu_pod.sh --zone=us-central2-b delete      # both TPU VMs
#
# Steps (each a command; `up` runs create, copy, install, train and eval in that order):
#   create   the slice NAME (on-demand, --spot, or --queued: a queued resource, waited for) and NAME-eval
#   copy     the committed code (git archive HEAD) to every worker of both, unpacked in ~/vicreg_jax
#   install  PYTHON (3.11, Ubuntu's package: the TPU images' python3 is 3.10, too old for current JAX) and
#            a virtual environment ~/venv on every worker with jax[tpu]==JAX_VERSION and the package
#   train    python -m vicreg_jax.main on every worker (nohup; log ~/vicreg_train.log on each worker),
#            workdir BUCKET/NAME, data BUCKET/tensorflow_datasets
#   eval     the linear-evaluation job on NAME-eval (one process owns a TPU VM's chips), following the
#            checkpoints in BUCKET/NAME; results in BUCKET/NAME_linear; log ~/vicreg_eval.log
#   logs     the last 20 lines of every worker's logs, each line prefixed with its host
#   follow   tail -f of worker 0's training log
#   delete   both TPU VMs (and queued resources)
#   recreate after a preemption, the slice only: deleted if still there, created, copy, install, train;
#            training resumes from the newest checkpoint in the bucket, and the evaluation job, untouched,
#            keeps waiting for new checkpoints
# --train-only limits create, copy, install, logs and delete to the slice. --dry-run prints every command it
# would run and runs none. Flags after `--` go to the training command (e.g. -- --config.batch_size=4096).
# The runtime (TPU software version) and the evaluation VM follow the accelerator's generation unless given.
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
COMMANDS=()
EXTRA=()
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"  # the comment at the top
  cat <<EOF

Flags: --name=$NAME --zone=ZONE --accelerator=$ACCELERATOR --eval-accelerator=(v4-8, v5litepod-4, ...)
       --runtime=(tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, ...) --bucket=gs://BUCKET --config=$CONFIG
       --eval-config=$EVAL_CONFIG --python=$PYTHON --jax-version=$JAX_VERSION
       --spot (preemptible)  --queued (a queued resource)  --train-only  --dry-run
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
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|copy|install|train|eval|logs|follow|delete) COMMANDS+=("$1") ;;
    up) COMMANDS+=(create copy install train eval) ;;
    recreate) TRAIN_ONLY=1; COMMANDS+=(delete-if-there create copy install train) ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
((${#COMMANDS[@]})) || { usage >&2; exit 2; }
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
  local spot=() runtime="${RUNTIME:-$(runtime_for "$2")}" state
  if ((SPOT)); then spot=(--spot); fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$1-qr" --node-id="$1" --zone="$ZONE" \
      --accelerator-type="$2" --runtime-version="$runtime" "${spot[@]}"
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
    tpu create "$1" --accelerator-type="$2" --version="$runtime" "${spot[@]}"
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

install() {  # install VM
  # JAX needs Python >= 3.11 and the TPU images (Ubuntu 22.04) have 3.10: PYTHON and its venv module from
  # Ubuntu's packages, then a virtual environment (the system Python refuses pip: PEP 668).
  on "$1" "sudo apt-get -qq update && sudo apt-get -qq -y install $PYTHON $PYTHON-venv && $PYTHON -m venv --clear ~/venv && ~/venv/bin/pip install -q --upgrade pip && ~/venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e ~/vicreg_jax"
}

start() {  # start VM LOG ARGS...: the job on every worker, in the background, surviving the ssh session
  local vm="$1" log="$2" args
  shift 2
  args="$(printf ' %q' "$@")"
  on "$vm" "cd ~/vicreg_jax && nohup ~/venv/bin/python -m vicreg_jax.main$args > ~/$log 2>&1 < /dev/null &"
}

for cmd in "${COMMANDS[@]}"; do
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
    train)
      needs_bucket train
      start "$NAME" vicreg_train.log --config="$CONFIG" --workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR" \
        "${EXTRA[@]}" ;;
    eval)
      needs_bucket eval
      start "$EVAL_NAME" vicreg_eval.log --config="$EVAL_CONFIG" --workdir="${WORKDIR}_linear" \
        --config.pretrain_workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR" ;;
    logs)
      on "$NAME" "tail -n 20 ~/vicreg_train.log | sed \"s/^/[\$(hostname)] /\""
      if ((!TRAIN_ONLY)); then on "$EVAL_NAME" "tail -n 20 ~/vicreg_eval.log | sed \"s/^/[\$(hostname)] /\""; fi ;;
    follow)
      tpu ssh "$NAME" --worker=0 --command='tail -f ~/vicreg_train.log' ;;
    delete)
      for vm in "${VMS[@]}"; do delete_vm "$vm"; done ;;
    delete-if-there)  # a preempted spot VM or a suspended queued resource still exists; a deleted one does not
      delete_vm "$NAME" || echo "($NAME was not there)" ;;
  esac
done
