#!/usr/bin/env bash
# Trains mf_jax on a Cloud TPU VM slice (one Python process per TPU host),
# through a queued resource that survives preemption.
#
#   launch/tpu_pod.sh up --name=mf-xl --zone=us-central2-b --type=v4-64 \
#       --config=configs/imagenet256_xl.py --workdir=gs://BUCKET/runs/xl \
#       [--spot] [--latents_bucket=gs://BUCKET/latents] [--dry-run] \
#       [-- --config.mesh.fsdp=-1 ...]
#
# Commands (each a few gcloud calls; --dry-run prints them, shell-quoted for
# copy-paste, and runs nothing):
#   up      create the slice if needed (queued resource, waits for ACTIVE),
#           set up every worker, start training
#   create  only the slice: `queued-resources create`, then wait for ACTIVE;
#           a SUSPENDED (preempted) or FAILED one is deleted and recreated
#   setup   put the code on every worker (a tarball of this checkout's
#           tracked files, or `git clone` of --repo at --branch) and run
#           `tpu_worker.sh setup`: a Python >= 3.11 venv made by uv with
#           jax[tpu] and requirements.txt under constraints.txt (gcsfuse too
#           with --latents_bucket)
#   train   (re)start training on every worker, detached from ssh, after
#           stopping stale trainers and freeing the TPU; a relaunch resumes
#           from the workdir's latest checkpoint
#   status  the queued resource's state and each worker's trainer
#   logs    copy every worker's logs to WORKDIR/logs/ and show their tails
#   stop    SIGTERM on every worker: all hosts save one agreed step, exit 0
#   delete  stop (if the slice is ACTIVE), then delete the queued resource
#           and its TPU VMs
#   watch   keep the run alive: recreate a preempted slice, set it up and
#           relaunch; relaunch after a crash; return when every worker's
#           trainer exited 0 (finished, or stopped with `stop`)
# Without a command, `up`.
#
# Every worker runs launch/tpu_worker.sh (read it for what happens on a
# host). Training gets MF_JAX_DISTRIBUTED=1 (start jax.distributed, detect
# the slice) and JAX_COMPILATION_CACHE_DIR=WORKDIR/jax_cache (compiled
# programs shared by all hosts and relaunches); its log on each worker is
# ~/mf_jax_logs/train_<stamp>_worker<N>.log, copied to WORKDIR/logs/.
#
# Flags (environment-variable defaults in brackets):
#   --name [TPU_NAME]         node and queued-resource name (required)
#   --zone [ZONE]             e.g. us-central2-b (required)
#   --project [PROJECT]       gcloud project (default: gcloud's)
#   --type [ACCELERATOR_TYPE] v4-N, v5litepod-N, v5p-N, v6e-N [v4-8]
#   --version [RUNTIME_VERSION]  TPU software version; default by type:
#                             v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                             v5e v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base
#   --spot | --reserved       capacity [SPOT=1 | RESERVED=1]; default on-demand
#   --config [CONFIG]         config file with optional :ARG
#                             [configs/imagenet256_xl.py]
#   --workdir [WORKDIR]       gs://... run directory (required)
#   --latents_bucket [LATENTS_BUCKET]  [gs://]BUCKET[/DIR] mounted read-only by
#                             gcsfuse at /mnt/mf_jax_latents on every worker,
#                             passed as --config.data.latents_dir
#   --repo [REPO_URL]         git URL to clone instead of copying this checkout
#   --branch [BRANCH]         branch or tag for --repo [main]
#   --python [PYTHON]         venv interpreter: X.Y or a path [3.11]
#   --jax [JAX_SPEC]          pip spec of jax for TPUs ["jax[tpu]"]
#   --env=KEY=VALUE           extra environment for training (repeatable)
#   --internal-ip             ssh/scp to internal IPs (from a VM in the VPC)
#   --poll [POLL_SECS]        seconds between state checks [60]
#   --grace [GRACE_SECS]      stop: seconds before SIGKILL [300]
#   --lines [LOG_LINES]       logs: lines per worker [50]
#   --max-restarts [MAX_RESTARTS]  watch: recreations + relaunches [20]
#   --dry-run                 print the commands [DRY_RUN=1]
#   -- ARGS                   passed on to mf_jax.main
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
RESERVED="${RESERVED:-0}"
CONFIG="${CONFIG:-configs/imagenet256_xl.py}"
WORKDIR="${WORKDIR:-}"
LATENTS_BUCKET="${LATENTS_BUCKET:-}"
REPO_URL="${REPO_URL:-}"
BRANCH="${BRANCH:-main}"
PYTHON="${PYTHON:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
INTERNAL_IP="${INTERNAL_IP:-0}"
POLL_SECS="${POLL_SECS:-60}"
GRACE_SECS="${GRACE_SECS:-300}"
LOG_LINES="${LOG_LINES:-50}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR="mf_jax"  # on each worker, relative to the home directory
WORKER="bash $REMOTE_DIR/launch/tpu_worker.sh"
LATENTS_MOUNT=/mnt/mf_jax_latents
EXTRA_ENV=()
EXTRA_ARGS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
say() { echo "tpu_pod.sh: $*" >&2; }

COMMAND=up
case "${1:-}" in
  up|create|setup|train|status|logs|stop|delete|watch) COMMAND="$1"; shift ;;
  -h|--help|help) usage; exit 0 ;;
  -*|'') ;;
  *) die "unknown command $1 (see --help)" ;;
esac

while (($#)); do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --latents_bucket=*) LATENTS_BUCKET="${1#*=}" ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --jax=*) JAX_SPEC="${1#*=}" ;;
    --env=*=*)
      [[ "${1#--env=}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad $1"
      EXTRA_ENV+=("${1#--env=}") ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --poll=*) POLL_SECS="${1#*=}" ;;
    --grace=*) GRACE_SECS="${1#*=}" ;;
    --lines=*) LOG_LINES="${1#*=}" ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --skip-setup) COMMAND=train ;;  # older spelling of `train`
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

# The TPU software version for an accelerator type (Cloud TPU's table of
# runtimes for JAX: each generation has its own image).
runtime_for_type() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

[[ -n "$TPU_NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or ZONE) is required"
if [[ -z "$RUNTIME_VERSION" ]]; then
  RUNTIME_VERSION="$(runtime_for_type "$ACCELERATOR_TYPE")" || die \
    "no TPU software version known for --type=$ACCELERATOR_TYPE: pass" \
    "--version (see cloud.google.com/tpu/docs/runtimes)"
fi
[[ "$SPOT$RESERVED" != 11 ]] || die "--spot and --reserved exclude each other"
case "$COMMAND" in
  up|train|logs|watch)
    [[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required" ;;
esac
if [[ -n "$WORKDIR" && "$WORKDIR" != gs://* ]]; then
  say "warning: workdir $WORKDIR is not gs://; each worker writes its own"
fi
if [[ -n "$LATENTS_BUCKET" ]]; then
  [[ "$LATENTS_BUCKET" == gs://* ]] || LATENTS_BUCKET="gs://$LATENTS_BUCKET"
  [[ "$LATENTS_BUCKET" =~ ^gs://[a-z0-9][-_.a-z0-9]*(/.*)?$ ]] || die \
    "--latents_bucket must be [gs://]BUCKET[/DIR], got $LATENTS_BUCKET"
  for arg in "${EXTRA_ARGS[@]}"; do
    [[ "$arg" != --config.data.latents_dir=* ]] || die \
      "--latents_bucket sets --config.data.latents_dir; pass one of them"
  done
fi

QR=(gcloud compute tpus queued-resources)
VM=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && SCOPE+=(--project="$PROJECT")
SSH_SCOPE=("${SCOPE[@]}")
((INTERNAL_IP)) && SSH_SCOPE+=(--internal-ip)
# What --dry-run pretends `describe` says: a slice to create for the
# commands that create one, an ACTIVE one for the others.
case "$COMMAND" in
  up|create|watch) DRY_STATES=(ABSENT) ;;
  *) DRY_STATES=(ACTIVE) ;;
esac

# Its arguments as one shell command line: words with characters a shell
# would act on are single-quoted.
quote() {
  local word words=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${words[*]}"
}

# Prints the command (shell-quoted, so it can be pasted) and runs it.
run() {
  printf '+ %s\n' "$(quote "$@")"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

# Sets STATE to the queued resource's state: ACTIVE, WAITING_FOR_RESOURCES,
# SUSPENDED, ..., ABSENT (no such resource) or UNKNOWN (gcloud failed). A
# dry run prints the query and pretends.
query_state() {
  local describe=("${QR[@]}" describe "$TPU_NAME" "${SCOPE[@]}"
                  --format='value(state.state)') errors
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    STATE="${DRY_STATES[0]}"
    DRY_STATES=(ACTIVE)
    return 0
  fi
  errors="$(mktemp)"
  if STATE="$("${describe[@]}" 2>"$errors")"; then
    STATE="${STATE:-UNKNOWN}"
  elif grep -qi 'not.found' "$errors"; then
    STATE=ABSENT
  else
    say "describe failed: $(tail -n 1 "$errors")"
    STATE=UNKNOWN
  fi
  rm -f "$errors"
}

create_qr() {
  local capacity=()
  ((SPOT)) && capacity=(--spot)
  ((RESERVED)) && capacity=(--reserved)
  run "${QR[@]}" create "$TPU_NAME" "${SCOPE[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"
}

# Deletes the queued resource with its TPU VMs, and waits until it is gone
# (a new one of the same name cannot be created before).
delete_qr() {
  run "${QR[@]}" delete "$TPU_NAME" "${SCOPE[@]}" --force --quiet || return
  [[ "$DRY_RUN" == 1 ]] && return
  while query_state; [[ "$STATE" != ABSENT ]]; do
    say "queued resource $TPU_NAME is $STATE; waiting for it to go"
    sleep "$POLL_SECS"
  done
}

# True for a queued resource that will never become ACTIVE again: spot
# capacity reclaimed (SUSPENDING/SUSPENDED), a failed request, a preempted
# node.
is_lost() {
  case "$1" in
    SUSPENDING|SUSPENDED|FAILED|PREEMPTED|TERMINATED) return 0 ;;
    *) return 1 ;;
  esac
}

# Makes sure an ACTIVE slice exists: creates it, or deletes and recreates a
# lost one, then waits for ACTIVE. `ensure_slice known` starts from the
# STATE just queried. (Failures return, also where `set -e` is off.)
ensure_slice() {
  [[ "${1:-}" == known ]] || query_state
  while [[ "$STATE" != ACTIVE ]]; do
    if [[ "$STATE" == ABSENT ]]; then
      create_qr || return
    elif is_lost "$STATE"; then
      say "queued resource $TPU_NAME is $STATE: deleting and recreating it"
      delete_qr || return
      create_qr || return
    else
      say "queued resource $TPU_NAME is $STATE; waiting for ACTIVE"
      [[ "$DRY_RUN" == 1 ]] || sleep "$POLL_SECS"
    fi
    query_state
  done
  say "queued resource $TPU_NAME is ACTIVE"
}

require_active() {
  [[ "$DRY_RUN" == 1 ]] && return
  query_state
  [[ "$STATE" == ACTIVE ]] || die "queued resource $TPU_NAME is $STATE, not" \
    "ACTIVE (run \`$0 create\` or \`up\`)"
}

# Runs a shell command on every worker of the slice; up to 3 tries, as
# ssh to freshly created VMs can fail for a minute (every command sent is
# safe to repeat).
on_all_workers() {
  local try
  for try in 1 2 3; do
    run "${VM[@]}" ssh "$TPU_NAME" "${SSH_SCOPE[@]}" --worker=all \
      --command="$1" "${@:2}" && return 0
    ((try < 3)) || return 1
    say "ssh to the workers failed (try $try of 3); retrying"
    sleep "$((POLL_SECS < 30 ? POLL_SECS : 30))"
  done
}

ship_code() {
  if [[ -n "$REPO_URL" ]]; then
    on_all_workers "set -e; if [ -d $REMOTE_DIR/.git ]; then \
git -C $REMOTE_DIR fetch --depth=1 origin $(quote "$BRANCH") && \
git -C $REMOTE_DIR checkout -f FETCH_HEAD; else \
git clone --depth=1 --branch=$(quote "$BRANCH") $(quote "$REPO_URL") \
$REMOTE_DIR; fi"
    return
  fi
  local root tarball
  root="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="${TMPDIR:-/tmp}/mf_jax_code.tar.gz"
  [[ -f "$root/constraints.txt" ]] || say "warning: $root has no" \
    "constraints.txt; setup on the workers needs it"
  # Tracked files only: no virtualenvs, build outputs or local run dirs.
  run bash -c "cd $(quote "$root") && git ls-files -z | \
tar --null -czf $(quote "$tarball") -T -" || return
  run "${VM[@]}" scp "$tarball" "$TPU_NAME:mf_jax_code.tar.gz" \
    "${SSH_SCOPE[@]}" --worker=all || return
  on_all_workers "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && \
tar -xzf mf_jax_code.tar.gz -C $REMOTE_DIR"
}

setup_workers() {
  local flags=(--python="$PYTHON" --jax="$JAX_SPEC")
  [[ -n "$LATENTS_BUCKET" ]] && flags+=(--gcsfuse)
  ship_code || return
  on_all_workers "$WORKER setup $(quote "${flags[@]}")"
}

train_workers() {
  local stamp main_args env pair cmd=''
  stamp="$(date -u +%Y%m%d-%H%M%S)"
  main_args=(--config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")
  env=(MF_JAX_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR="$WORKDIR/jax_cache"
       "${EXTRA_ENV[@]}")
  if [[ -n "$LATENTS_BUCKET" ]]; then
    cmd="$WORKER mount $(quote --bucket="$LATENTS_BUCKET" \
      --mount_point="$LATENTS_MOUNT") && "
    main_args+=(--config.data.latents_dir="$LATENTS_MOUNT")
  fi
  for pair in "${env[@]}"; do  # NAME=value: quote the value only
    cmd+="${pair%%=*}=$(quote "${pair#*=}") "
  done
  cmd+="$WORKER start $(quote --workdir="$WORKDIR" --stamp="$stamp") -- \
$(quote "${main_args[@]}")"
  on_all_workers "$cmd"
}

# Local folder for per-worker command output (gcloud --output-directory).
output_dir() {
  local dir="${TMPDIR:-/tmp}/mf_jax_pod_$TPU_NAME/$1"
  if [[ "$DRY_RUN" != 1 ]]; then rm -rf "$dir" && mkdir -p "$dir"; fi
  echo "$dir"
}

# Prints each worker's output file, worker by worker.
show_outputs() {
  [[ "$DRY_RUN" == 1 ]] && return
  local worker
  for worker in $(cd "$1" && printf '%s\n' *.log | sort -n); do
    echo "== worker ${worker%.log}"
    cat "$1/$worker"
  done
}

# Sets WORKERS to "running", "finished" (every trainer exited 0), "failed"
# (one exited non-zero, or none started) or "unknown" (ssh failed).
query_workers() {
  local dir lines
  dir="$(output_dir status)"
  if ! on_all_workers "$WORKER status" --output-directory="$dir" \
      >/dev/null 2>&1; then
    WORKERS=unknown
    return
  fi
  lines="$(cat "$dir"/*.log 2>/dev/null | grep '^MF_WORKER ' || true)"
  if [[ -z "$lines" ]]; then
    WORKERS=unknown
  elif grep -q ' running' <<< "$lines"; then
    WORKERS=running
  elif ! grep -vq ' exited 0$' <<< "$lines"; then
    WORKERS=finished
  else
    WORKERS=failed
  fi
}

cmd_status() {
  query_state
  echo "queued resource $TPU_NAME: $STATE"
  if [[ "$STATE" == ACTIVE || "$DRY_RUN" == 1 ]]; then
    local dir
    dir="$(output_dir status)"
    on_all_workers "$WORKER status" --output-directory="$dir"
    show_outputs "$dir"
  fi
}

cmd_logs() {
  require_active
  local dir
  dir="$(output_dir logs)"
  on_all_workers "$WORKER logs $(quote --workdir="$WORKDIR" \
    --lines="$LOG_LINES")" --output-directory="$dir"
  show_outputs "$dir"
  echo "tpu_pod.sh: logs copied to $WORKDIR/logs/"
}

cmd_stop() {
  local flags=(--grace="$GRACE_SECS")
  [[ -n "$WORKDIR" ]] && flags+=(--workdir="$WORKDIR")
  on_all_workers "$WORKER stop $(quote "${flags[@]}")"
}

cmd_delete() {
  query_state
  if [[ "$STATE" == ACTIVE ]]; then
    cmd_stop || say "stop failed; deleting anyway"
  fi
  [[ "$STATE" == ABSENT && "$DRY_RUN" != 1 ]] && {
    say "no queued resource $TPU_NAME"
    return 0
  }
  delete_qr
}

# Keeps the run going until every worker's trainer exited 0.
cmd_watch() {
  local restarts=0 unknown=0
  while true; do
    query_state
    if [[ "$STATE" == ACTIVE ]]; then
      query_workers
    else
      WORKERS=gone
    fi
    case "$WORKERS" in
      running)
        unknown=0 ;;
      finished)
        say "every worker's trainer exited 0: done"
        return 0 ;;
      unknown)
        unknown=$((unknown + 1))
        say "could not read the workers' state ($unknown)"
        if ((unknown >= 5)); then WORKERS=failed; fi ;;
    esac
    if [[ "$WORKERS" == gone && "$STATE" != ABSENT ]] \
        && ! is_lost "$STATE"; then
      say "queued resource $TPU_NAME is $STATE; waiting"
    elif [[ "$WORKERS" == gone || "$WORKERS" == failed ]]; then
      restarts=$((restarts + 1))
      ((restarts <= MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS" \
        "restarts (--max-restarts)"
      say "restart $restarts: queued resource $STATE, trainers $WORKERS"
      if ensure_slice known && setup_workers && train_workers; then
        unknown=0
      else
        say "restart $restarts failed; trying again"
      fi
    fi
    [[ "$DRY_RUN" == 1 ]] && return 0
    sleep "$POLL_SECS"
  done
}

case "$COMMAND" in
  up) ensure_slice; setup_workers; train_workers ;;
  create) ensure_slice ;;
  setup) require_active; setup_workers ;;
  train) require_active; train_workers ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  stop) require_active; cmd_stop ;;
  delete) cmd_delete ;;
  watch) cmd_watch ;;
esac
