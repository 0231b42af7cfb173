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
#   install  a virtual environment ~/venv on every worker with jax[tpu]==JAX_VERSION and the package
#   train    python -m vicreg_jax.main on every worker (nohup; log ~/vicreg_train.log on each worker),
#            workdir BUCKET/NAME, data BUCKET/tensorflow_datasets
#   eval     the linear-evaluation job on NAME-eval (one process owns a TPU VM's chips), following the
#            checkpoints in BUCKET/NAME; results in BUCKET/NAME_linear; log ~/vicreg_eval.log
#   logs     the last 20 lines of every worker's logs, each line prefixed with its host
#   follow   tail -f of worker 0's training log
#   delete   both TPU VMs (and queued resources)
# --dry-run prints every command it would run and runs none. Flags after `--` go to the training command
# (e.g. -- --config.batch_size=4096). After a preemption: `create copy install train` again; training resumes
# from the newest checkpoint in the bucket, and the evaluation job simply keeps waiting for new checkpoints.
set -euo pipefail

NAME=vicreg
ZONE=
ACCELERATOR=v4-32
EVAL_ACCELERATOR=v4-8
RUNTIME=tpu-ubuntu2204-base
BUCKET=
CONFIG=configs/imagenet.py
EVAL_CONFIG=configs/imagenet_linear.py
SPOT=0
QUEUED=0
JAX_VERSION=0.10.2
DRY_RUN=0
COMMANDS=()
EXTRA=()
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<EOF

Flags: --name=$NAME --zone=ZONE --accelerator=$ACCELERATOR --eval-accelerator=$EVAL_ACCELERATOR
       --runtime=$RUNTIME --bucket=gs://BUCKET --config=$CONFIG --eval-config=$EVAL_CONFIG
       --spot (preemptible)  --queued (a queued resource)  --jax-version=$JAX_VERSION  --dry-run
EOF
}

while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --eval-accelerator=*) EVAL_ACCELERATOR="${1#*=}" ;;
    --runtime=*) RUNTIME="${1#*=}" ;;
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
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
((${#COMMANDS[@]})) || { usage >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "error: --zone is required (e.g. --zone=us-central2-b)" >&2; exit 2; }
needs_bucket() { [[ "$BUCKET" == gs://* ]] || { echo "error: --bucket=gs://BUCKET is required for $1" >&2; exit 2; }; }

EVAL_NAME="$NAME-eval"
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
  local spot=()
  if ((SPOT)); then spot=(--spot); fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$1-qr" --node-id="$1" --zone="$ZONE" \
      --accelerator-type="$2" --runtime-version="$RUNTIME" "${spot[@]}"
    echo "waiting for queued resource $1-qr to become ACTIVE ..."
    if ((!DRY_RUN)); then
      until [[ "$(gcloud compute tpus queued-resources describe "$1-qr" --zone="$ZONE" \
                  --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
    fi
  else
    tpu create "$1" --accelerator-type="$2" --version="$RUNTIME" "${spot[@]}"
  fi
}

copy_code() {  # copy_code VM
  on "$1" 'rm -rf ~/vicreg_jax ~/vicreg_jax.tar.gz'
  tpu scp "$TARBALL" "$1:~/vicreg_jax.tar.gz" --worker=all
  on "$1" 'tar xzf ~/vicreg_jax.tar.gz -C ~'
}

install() {  # install VM
  # Ubuntu's system Python refuses pip (PEP 668) and may lack the venv module: a virtual environment, with
  # python3-venv installed first where creating one fails.
  on "$1" "{ python3 -m venv ~/venv || { sudo apt-get -qq update && sudo apt-get -qq -y install python3-venv && python3 -m venv --clear ~/venv; }; } && ~/venv/bin/pip install -q --upgrade pip && ~/venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e ~/vicreg_jax"
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
      create_vm "$EVAL_NAME" "$EVAL_ACCELERATOR" ;;
    copy)
      run git -C "$REPO" archive --format=tar.gz --prefix=vicreg_jax/ -o "$TARBALL" HEAD
      copy_code "$NAME"
      copy_code "$EVAL_NAME" ;;
    install)
      install "$NAME"
      install "$EVAL_NAME" ;;
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
      on "$EVAL_NAME" "tail -n 20 ~/vicreg_eval.log | sed \"s/^/[\$(hostname)] /\"" ;;
    follow)
      tpu ssh "$NAME" --worker=0 --command='tail -f ~/vicreg_train.log' ;;
    delete)
      for vm in "$NAME" "$EVAL_NAME"; do
        if ((QUEUED)); then
          run gcloud compute tpus queued-resources delete "$vm-qr" --zone="$ZONE" --force --quiet
        else
          tpu delete "$vm" --quiet
        fi
      done ;;
  esac
done
