#!/usr/bin/env bash
# Cloud TPU VM pod slices through gcloud: create a slice (queued resource), install ovla-jax on every
# worker, train on every worker, read the logs, ssh, stop, delete. Every command is printed before it
# runs; --dry-run prints them and runs nothing.
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh VERB --name NAME --zone ZONE --accelerator-type TYPE [options] [--dry-run] [-- TRAIN_ARGS...]

verbs
  create   request the slice as a queued resource (waits in the queue until capacity is there)
  status   show the queued resource and its node
  setup    copy this checkout (git HEAD) to every worker and install it there (the README install + [tpu])
  train    start `ovla-jax train --distributed TRAIN_ARGS` on every worker, detached; each worker keeps
           its log in ~/ovla-logs/train.log (earlier logs are rotated to train-<time>.log)
  logs     print the last lines of every worker's log (--follow: follow worker --worker)
  ssh      open a shell on one worker (--worker, default 0)
  stop     SIGTERM the trainers on every worker: they agree on a step, save it and exit 0
  delete   delete the queued resource and its slice

options
  --name NAME               slice / queued-resource name (required)
  --zone ZONE               e.g. us-east5-a (required)
  --accelerator-type TYPE   e.g. v5p-256, v4-8, v5litepod-64 (required for create)
  --project PROJECT         gcloud project (default: gcloud's configured one)
  --runtime-version V       TPU VM image (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e,
                            v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
  --spot | --reserved       capacity type for create (default: on-demand)
  --worker W                worker for ssh / logs --follow (default 0)
  --follow                  logs: follow one worker's log
  --lines N                 logs: lines per worker (default 40)
  --allow-local-workdir     train: accept a non-gs:// --workdir (workers share nothing but GCS, so
                            a multi-host run needs a gs:// workdir)
  --dry-run                 print the exact commands, run nothing
  -h, --help                this message

examples
  launch/tpu_vm.sh create --name ovla --zone us-east5-a --accelerator-type v5p-256 --spot
  launch/tpu_vm.sh setup  --name ovla --zone us-east5-a
  launch/tpu_vm.sh train  --name ovla --zone us-east5-a -- --config configs/train/pretrain_oxe.py \
      --workdir gs://my-bucket/runs/openvla-7b --config.data.data_dir=gs://my-bucket/oxe
EOF
}

VERB="${1:-}"
case "$VERB" in
  create|status|setup|train|logs|ssh|stop|delete) shift;;
  -h|--help|"") usage; exit 0;;
  *) echo "tpu_vm.sh: unknown verb '$VERB'" >&2; usage >&2; exit 2;;
esac

NAME=""; ZONE=""; TYPE=""; PROJECT=""; RUNTIME=""; CAPACITY=""; WORKER=0; FOLLOW=0; LINES=40
DRY_RUN=0; ALLOW_LOCAL=0; TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --accelerator-type) TYPE="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --runtime-version) RUNTIME="$2"; shift 2;;
    --spot) CAPACITY="--spot"; shift;;
    --reserved) CAPACITY="--reserved"; shift;;
    --worker) WORKER="$2"; shift 2;;
    --follow) FOLLOW=1; shift;;
    --lines) LINES="$2"; shift 2;;
    --allow-local-workdir) ALLOW_LOCAL=1; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS=("$@"); break;;
    *) echo "tpu_vm.sh: unknown option '$1' (train arguments go after --)" >&2; exit 2;;
  esac
done
[ -n "$NAME" ] || { echo "tpu_vm.sh: --name is required" >&2; exit 2; }
[ -n "$ZONE" ] || { echo "tpu_vm.sh: --zone is required" >&2; exit 2; }

GLOBAL=(--zone "$ZONE")
[ -n "$PROJECT" ] && GLOBAL+=(--project "$PROJECT")
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}")


default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite;;
    v6e-*) echo v2-alpha-tpuv6e;;
    v4-*) echo tpu-ubuntu2204-base;;
    *) echo "tpu_vm.sh: no default runtime for accelerator type '$1'; pass --runtime-version" >&2; return 2;;
  esac
}

REMOTE_DIR='$HOME/ovla-jax'  # expanded by the worker's shell
REMOTE_VENV='$HOME/ovla-venv'
REMOTE_LOGS='$HOME/ovla-logs'
case "$VERB" in
  create)
    [ -n "$TYPE" ] || { echo "tpu_vm.sh: create needs --accelerator-type (e.g. v5p-256)" >&2; exit 2; }
    RUNTIME="${RUNTIME:-$(default_runtime "$TYPE")}"
    CMD=(gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${GLOBAL[@]}"
         --accelerator-type "$TYPE" --runtime-version "$RUNTIME")
    [ -n "$CAPACITY" ] && CMD+=("$CAPACITY")
    run "${CMD[@]}"
    ;;
  status)
    run gcloud compute tpus queued-resources describe "$NAME" "${GLOBAL[@]}"
    ;;
  setup)
    ROOT="$(cd "$(dirname "$0")/.." && pwd)"
    ARCHIVE="${TMPDIR:-/tmp}/ovla-jax-$NAME.tar.gz"
    run git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
    run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:ovla-jax.tar.gz" "${GLOBAL[@]}" --worker=all
    INSTALL="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR $REMOTE_LOGS && tar -xzf ovla-jax.tar.gz -C $REMOTE_DIR"
    INSTALL+=" && { python3 -m venv $REMOTE_VENV || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv"
    INSTALL+=" && python3 -m venv $REMOTE_VENV; }; } && . $REMOTE_VENV/bin/activate && pip install -q --upgrade pip"
    INSTALL+=" && pip install -q -e \"$REMOTE_DIR[tpu]\" && python -c 'import jax; print(jax.devices())'"
    run "${SSH[@]}" --worker=all --command "$INSTALL"
    ;;
  train)
    [ ${#TRAIN_ARGS[@]} -gt 0 ] || { echo "tpu_vm.sh: train needs train arguments after -- (--config ... --workdir gs://...)" >&2; exit 2; }
    WORKDIR="$(workdir_of "${TRAIN_ARGS[@]}")"
    [ -n "$WORKDIR" ] || { echo "tpu_vm.sh: the train arguments need --workdir gs://BUCKET/RUN" >&2; exit 2; }
    if [[ "$WORKDIR" != gs://* ]] && [ "$ALLOW_LOCAL" = 0 ]; then
      echo "tpu_vm.sh: --workdir $WORKDIR is not on GCS; the workers of a slice share nothing but GCS, so every" \
           "process must save to the same gs:// directory (pass --allow-local-workdir for a one-host slice)" >&2
      exit 2
    fi
    QUOTED=$(printf '%q ' "${TRAIN_ARGS[@]}")
    LOG="$REMOTE_LOGS/train.log"
    START="cd $REMOTE_DIR && . $REMOTE_VENV/bin/activate && mkdir -p $REMOTE_LOGS"
    START+=" && { [ ! -f $LOG ] || mv $LOG $REMOTE_LOGS/train-\$(date +%Y%m%d-%H%M%S).log; }"
    START+=" && setsid nohup ovla-jax train --distributed $QUOTED> $LOG 2>&1 < /dev/null &"
    run "${SSH[@]}" --worker=all --command "$START"
    if [ "$DRY_RUN" = 0 ]; then
      echo "started on every worker; follow with: launch/tpu_vm.sh logs --name $NAME --zone $ZONE --follow" >&2
    fi
    ;;
  logs)
    if [ "$FOLLOW" = 1 ]; then
      run "${SSH[@]}" --worker="$WORKER" --command "tail -n $LINES -F $REMOTE_LOGS/train.log"
    else
      run "${SSH[@]}" --worker=all --command "echo \"== \$(hostname)\"; tail -n $LINES $REMOTE_LOGS/train.log"
    fi
    ;;
  ssh)
    run "${SSH[@]}" --worker="$WORKER"
    ;;
  stop)
    run "${SSH[@]}" --worker=all --command "pkill -TERM -f 'ovla-jax train' || true"
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" "${GLOBAL[@]}" --force --quiet
    ;;
esac
