#!/usr/bin/env bash
# GKE TPU node pools through a JobSet: one pod per TPU VM host of the slice, each running
# `ovla-jax train --distributed` (JAX finds its peers from the TPU env GKE injects). `render` prints the
# manifest; `apply` / `delete` / `logs` drive kubectl; --dry-run prints the commands (and the manifest).
set -euo pipefail
. "$(dirname "$0")/../common.sh"

usage() {
  cat <<'EOF2'
usage: launch/gke/jobset.sh VERB --name NAME --accelerator-type TYPE --image IMAGE [options] [--dry-run] [-- TRAIN_ARGS...]

verbs
  render   print the JobSet manifest (or write it with --out FILE)
  apply    kubectl apply the rendered manifest
  logs     kubectl logs of the leader pod (--all: every pod, prefixed)
  delete   kubectl delete the JobSet

options
  --name NAME               JobSet name (required)
  --accelerator-type TYPE   v5p-256, v4-128, v5e-64, v6e-256, ... (required for render/apply)
  --image IMAGE             container image with ovla-jax installed (launch/gke/Dockerfile builds one)
  --namespace NS            Kubernetes namespace (default: default)
  --spot                    schedule on Spot TPU node pools
  --grace-seconds S         SIGTERM-to-kill grace period: time to agree on a step and save (default 600)
  --out FILE                render: write the manifest here instead of stdout
  --all                     logs: every pod
  --dry-run                 print the exact commands and the manifest, run nothing
  -h, --help                this message

The train arguments (after --) must include --workdir gs://BUCKET/RUN: pods share nothing but GCS.
Preemption: GKE sends SIGTERM to every pod; the trainers agree on a step, save it and exit 0, and the
JobSet restarts (maxRestarts) resume from that checkpoint.

example
  launch/gke/jobset.sh apply --name ovla-7b --accelerator-type v5p-256 --image us-docker.pkg.dev/P/ovla/ovla-jax:latest \
      -- --config configs/train/pretrain_oxe.py --workdir gs://my-bucket/runs/openvla-7b --config.data.data_dir=gs://my-bucket/oxe
EOF2
}

VERB="${1:-}"
case "$VERB" in
  render|apply|logs|delete) shift;;
  -h|--help|"") usage; exit 0;;
  *) echo "jobset.sh: unknown verb '$VERB'" >&2; usage >&2; exit 2;;
esac

NAME=""; TYPE=""; IMAGE=""; NAMESPACE="default"; SPOT=0; GRACE=600; OUT=""; ALL=0; DRY_RUN=0; TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --accelerator-type) TYPE="$2"; shift 2;;
    --image) IMAGE="$2"; shift 2;;
    --namespace) NAMESPACE="$2"; shift 2;;
    --spot) SPOT=1; shift;;
    --grace-seconds) GRACE="$2"; shift 2;;
    --out) OUT="$2"; shift 2;;
    --all) ALL=1; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS=("$@"); break;;
    *) echo "jobset.sh: unknown option '$1' (train arguments go after --)" >&2; exit 2;;
  esac
done
[ -n "$NAME" ] || { echo "jobset.sh: --name is required" >&2; exit 2; }


render() {
  [ -n "$TYPE" ] || { echo "jobset.sh: --accelerator-type is required" >&2; return 2; }
  [ -n "$IMAGE" ] || { echo "jobset.sh: --image is required" >&2; return 2; }
  [ ${#TRAIN_ARGS[@]} -gt 0 ] || { echo "jobset.sh: train arguments are required after -- (--config ... --workdir gs://...)" >&2; return 2; }
  local workdir
  workdir="$(workdir_of "${TRAIN_ARGS[@]}")"
  [[ "$workdir" == gs://* ]] || { echo "jobset.sh: --workdir must be a gs:// path (pods share nothing but GCS), got '$workdir'" >&2; return 2; }
  local root; root="$(cd "$(dirname "$0")/../.." && pwd)"
  # chips per host and the GKE names of the slice, from the one topology table
  local spec
  spec=$(PYTHONPATH="$root" "${PYTHON:-python3}" - "$TYPE" <<'PY'
import sys
from ovla_jax.train.topology import parse_slice
s = parse_slice(sys.argv[1])
gke = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
per_host = min(s.chips, 4)
print(gke[s.chip.generation], "x".join(map(str, s.shape)), per_host, s.chips // per_host)
PY
) || return 2
  local accel topology chips_per_host hosts
  read -r accel topology chips_per_host hosts <<<"$spec"
  local args="" a
  for a in "${TRAIN_ARGS[@]}"; do args+="              - $(printf '%s' "$a" | sed 's/\\/\\\\/g; s/"/\\"/g; s/^/"/; s/$/"/')"$'\n'; done
  local spot_selector=""
  [ "$SPOT" = 1 ] && spot_selector=$'\n'"              cloud.google.com/gke-spot: \"true\""
  cat <<YAML
# ovla-jax training on GKE: $TYPE = $accel $topology, $hosts host(s) x $chips_per_host chips.
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $NAME
  namespace: $NAMESPACE
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 10
  replicatedJobs:
  - name: workers
    replicas: 1
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: $GRACE
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $accel
              cloud.google.com/gke-tpu-topology: $topology$spot_selector
            containers:
            - name: ovla-jax
              image: $IMAGE
              command: ["ovla-jax", "train", "--distributed"]
              args:
$args              ports:
              - containerPort: 8471  # TPU runtime
              - containerPort: 8476  # JAX coordination service (process 0)
              resources:
                limits:
                  google.com/tpu: $chips_per_host
YAML
}

case "$VERB" in
  render)
    if [ -n "$OUT" ]; then
      manifest=$(render) || exit 2
      tmp="$OUT.tmp-$$"; printf '%s\n' "$manifest" > "$tmp" && mv "$tmp" "$OUT"
      echo "wrote $OUT" >&2
    else
      render || exit 2
    fi
    ;;
  apply)
    manifest=$(render) || exit 2
    if [ "$DRY_RUN" = 1 ]; then
      printf '%s\n' "$manifest"
      echo "kubectl apply -f -  # the manifest above"
    else
      printf '%s\n' "$manifest" | kubectl apply -f -
    fi
    ;;
  logs)
    if [ "$ALL" = 1 ]; then
      run kubectl logs -n "$NAMESPACE" -l "jobset.sigs.k8s.io/jobset-name=$NAME" --prefix --tail=100 --max-log-requests=256
    else
      run kubectl logs -n "$NAMESPACE" -f "jobs/$NAME-workers-0"
    fi
    ;;
  delete)
    run kubectl delete jobset -n "$NAMESPACE" "$NAME"
    ;;
esac
