#!/usr/bin/env bash
# N training processes on this host, each with its own CPU devices, joined by jax.distributed: the
# multi-host rehearsal of a pod run (data shares per process, orbax saves from every process, SIGTERM to
# any one process stops all at the same step), on a laptop.
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/local.sh N [--devices-per-process D] [--port P] [--log-dir DIR] [--dry-run] [--] TRAIN_ARGS...

Starts N `python -m ovla_jax train` processes on this host (process i gets --process_id i), each with D
simulated CPU devices (default 4), coordinated through jax.distributed on 127.0.0.1:P (default: a free
port). TRAIN_ARGS go to every process unchanged (--config, --workdir, --config.x=y ...).

Output: each process's lines are prefixed "[pI]" on this terminal and appended to DIR/process-I.log
(DIR defaults to <workdir>/logs for a local workdir, else ./logs; a resumed run appends). The script prints each process's
pid, forwards SIGTERM/SIGINT to all of them, and exits with the first non-zero exit status (0 if all
processes exit 0, as they do after a preemption save).

  --dry-run   print the exact commands (with their environment) and run nothing
  -h, --help  this message

example: launch/local.sh 2 --config configs/train/debug.py --workdir runs/two-process
EOF
}

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; exit 0; fi
N="$1"; shift
case "$N" in ''|*[!0-9]*) echo "local.sh: N must be a positive integer, got '$N'" >&2; usage >&2; exit 2;; esac
[ "$N" -ge 1 ] || { echo "local.sh: N must be >= 1" >&2; exit 2; }

DEVICES=4; PORT=""; LOG_DIR=""; DRY_RUN=0; TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --devices-per-process) DEVICES="$2"; shift 2;;
    --port) PORT="$2"; shift 2;;
    --log-dir) LOG_DIR="$2"; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS+=("$@"); break;;
    *) TRAIN_ARGS+=("$1"); shift;;
  esac
done

PYTHON="${PYTHON:-python3}"
if [ -z "$PORT" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [ -z "$LOG_DIR" ]; then
  WORKDIR="$(workdir_of "${TRAIN_ARGS[@]}")"
  if [ -n "$WORKDIR" ] && [[ "$WORKDIR" != *://* ]]; then LOG_DIR="$WORKDIR/logs"; else LOG_DIR="logs"; fi
fi

# A forced host device count in XLA_FLAGS would override the per-process device count: drop it.
CLEAN_XLA_FLAGS=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')

command_for() {  # the command line of process $1
  CMD=(env JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$DEVICES" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "XLA_FLAGS=$CLEAN_XLA_FLAGS"
       "$PYTHON" -m ovla_jax train --coordinator "127.0.0.1:$PORT" --num_processes "$N" --process_id "$1"
       "${TRAIN_ARGS[@]}")
}

if [ "$DRY_RUN" = 1 ]; then
  for ((i = 0; i < N; i++)); do
    command_for "$i"
    printf '%q ' "${CMD[@]}"; printf '>> %q 2>&1 &\n' "$LOG_DIR/process-$i.log"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() { kill -TERM "${PIDS[@]}" 2>/dev/null || true; }
trap stop_all TERM INT
for ((i = 0; i < N; i++)); do
  command_for "$i"
  echo "=== local.sh: process $i of $N, $(date '+%Y-%m-%d %H:%M:%S') ===" >> "$LOG_DIR/process-$i.log"
  "${CMD[@]}" > >(tee -a "$LOG_DIR/process-$i.log" | sed -u "s/^/[p$i] /") 2>&1 &
  PIDS+=("$!")
  echo "local.sh: process $i pid $! (log $LOG_DIR/process-$i.log)" >&2
done
STATUS=0
for pid in "${PIDS[@]}"; do
  while true; do  # wait returns early when a trapped signal arrives: wait again for the real exit
    set +e; wait "$pid"; code=$?; set -e
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$code" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$code; fi
done
wait 2>/dev/null || true  # the log pipes
exit "$STATUS"
