#!/usr/bin/env bash
# What runs on each worker (host) of a Cloud TPU VM slice. launch/tpu_pod.sh
# calls it on every worker at once (`gcloud compute tpus tpu-vm ssh
# --worker=all --command='bash mf_jax/launch/tpu_worker.sh ...'`); keeping the
# worker side in one file lets it be read, and tested, without a TPU.
#
#   setup [--python=3.11] [--jax='jax[tpu]'] [--gcsfuse]
#       A Python >= 3.11 virtualenv ($MF_JAX_VENV, default ~/mf_jax_venv).
#       TPU images ship Python 3.10, older than mf_jax supports, so uv (from
#       PyPI, through the system pip) makes the venv with a uv-managed
#       CPython (or a system one it finds), then installs jax[tpu] and
#       requirements.txt under constraints.txt, the versions CI tests.
#       --gcsfuse also installs gcsfuse from Google's apt repository.
#   mount --bucket=gs://BUCKET[/DIR] [--mount_point=/mnt/mf_jax_latents]
#       Read-only gcsfuse mount of the latents, for array_record builds
#       that cannot read gs:// themselves. Idempotent; a recreated VM needs
#       it again.
#   start --workdir=W --stamp=S [--grace=60] -- MAIN_ARGS
#       Stops stale trainers and frees the TPU, then starts
#       `python -m mf_jax.main MAIN_ARGS` detached from the ssh session
#       (setsid + nohup, stdin from /dev/null): a dropped connection cannot
#       signal it. Output goes to $MF_JAX_LOG_DIR/train_S_worker<N>.log
#       (default ~/mf_jax_logs), copied to W/logs/ every
#       $MF_JAX_UPLOAD_SECS seconds (300) and at exit; the exit status goes
#       to $MF_JAX_LOG_DIR/exit_code. The caller's environment (e.g.
#       MF_JAX_DISTRIBUTED, JAX_COMPILATION_CACHE_DIR) reaches the trainer.
#   stop [--grace=300] [--workdir=W]
#       SIGTERM to the trainer: every host saves a checkpoint at one agreed
#       step and exits 0. SIGKILL after the grace period; TPU freed; logs
#       copied to W/logs/.
#   status
#       One line: `MF_WORKER <n> running <pids>`, `MF_WORKER <n> exited
#       <status>` or `MF_WORKER <n> idle`.
#   logs --workdir=W [--lines=50]
#       Copies this worker's logs to W/logs/, prints the latest one's tail.
#
# A stale trainer is a `$MF_JAX_VENV/bin/python -m mf_jax.main` process (any
# user's, hence sudo); anything else holding the TPU device files
# (/dev/accel*, /dev/vfio/N) is killed too, and libtpu's lock file removed,
# since a TPU is usable by one process only.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
CODE_DIR="$(dirname "$(dirname "$SELF")")"
VENV="${MF_JAX_VENV:-$HOME/mf_jax_venv}"
LOG_DIR="${MF_JAX_LOG_DIR:-$HOME/mf_jax_logs}"
UPLOAD_SECS="${MF_JAX_UPLOAD_SECS:-300}"
LOCKFILE="${MF_JAX_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes
SUDO=()
if ((EUID != 0)) && command -v sudo >/dev/null; then SUDO=(sudo); fi

die() { echo "tpu_worker.sh: $*" >&2; exit 2; }

# This host's index in the slice (0 .. hosts-1), as JAX's own TPU cluster
# detection reads it.
worker_id() {
  if [[ -n "${MF_JAX_WORKER_ID:-}" ]]; then echo "$MF_JAX_WORKER_ID"; return; fi
  curl -sf -m 3 -H 'Metadata-Flavor: Google' \
    "$METADATA/agent-worker-number" 2>/dev/null || hostname
}

# pgrep/pkill pattern of a trainer started from a venv of this name, in any
# user's home. Anchored at the start of the command line, so neither the ssh
# shell nor _run's wrapper (whose command lines also mention mf_jax.main)
# match it.
trainer_pattern() {
  local name
  name="$(basename "$VENV" | sed 's/[][\.*^$+?(){}|]/\\&/g')"
  echo "^/[^ ]*/${name}/bin/python[0-9.]* -m mf_jax[.]main( |\$)"
}

trainer_pids() { pgrep -f "$(trainer_pattern)" | tr '\n' ' ' || true; }

# Kills whatever holds the TPU device files and removes libtpu's lock file.
free_tpu() {
  local devices pids
  if [[ -n "${MF_JAX_TPU_DEVICES:-}" ]]; then
    read -r -a devices <<< "$MF_JAX_TPU_DEVICES"
  else
    shopt -s nullglob
    devices=(/dev/accel* /dev/vfio/[0-9]*)
    shopt -u nullglob
  fi
  if ((${#devices[@]})); then
    pids="$("${SUDO[@]}" lsof -t "${devices[@]}" 2>/dev/null | sort -u \
      | tr '\n' ' ' || true)"
    if [[ -n "${pids// /}" ]]; then
      echo "tpu_worker.sh: killing processes holding the TPU: $pids"
      # shellcheck disable=SC2086  # one argument per pid
      "${SUDO[@]}" kill -9 $pids 2>/dev/null || true
      sleep 1
    fi
  fi
  "${SUDO[@]}" rm -f "$LOCKFILE"
}

# SIGTERM (the trainer saves and exits 0), SIGKILL after $1 seconds.
stop_trainers() {
  local grace="$1" pattern waited=0
  pattern="$(trainer_pattern)"
  if pgrep -f "$pattern" >/dev/null; then
    echo "tpu_worker.sh: SIGTERM to trainer $(trainer_pids)(it saves a" \
      "checkpoint, then exits)"
    "${SUDO[@]}" pkill -TERM -f "$pattern" || true
    while pgrep -f "$pattern" >/dev/null && ((waited < grace)); do
      sleep 1
      waited=$((waited + 1))
    done
    if pgrep -f "$pattern" >/dev/null; then
      echo "tpu_worker.sh: still running after ${grace}s: SIGKILL"
      "${SUDO[@]}" pkill -KILL -f "$pattern" || true
      sleep 1
    fi
  fi
  free_tpu
}

# Copies files to WORKDIR/logs/ (gs:// through gcloud storage, else cp).
upload() {
  local dest="$1/logs"
  shift
  if [[ "$dest" == gs://* ]]; then
    if command -v gcloud >/dev/null; then
      gcloud storage cp --quiet "$@" "$dest/"
    else
      gsutil -q cp "$@" "$dest/"
    fi
  else
    mkdir -p "$dest" && cp "$@" "$dest/"
  fi
}

setup() {
  local python=3.11 jax_spec='jax[tpu]' gcsfuse=0 uv
  while (($#)); do
    case "$1" in
      --python=*) python="${1#*=}" ;;
      --jax=*) jax_spec="${1#*=}" ;;
      --gcsfuse) gcsfuse=1 ;;
      *) die "setup: unknown argument $1" ;;
    esac
    shift
  done
  cd "$CODE_DIR"
  [[ -f constraints.txt ]] || die "no constraints.txt in $CODE_DIR: it" \
    "pins the versions CI tests"
  uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
  if [[ ! -x "$uv" ]]; then
    python3 -m pip install --user --quiet --upgrade uv
  fi
  if ! venv_matches "$python"; then
    rm -rf "$VENV"
    "$uv" venv --seed --python "$python" "$VENV"
  fi
  "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$VENV has Python $("$VENV/bin/python" -V); mf_jax needs >= 3.11"
  "$uv" pip install --python "$VENV/bin/python" -c constraints.txt \
    -r requirements.txt "$jax_spec"
  if ((gcsfuse)); then install_gcsfuse; fi
  "$VENV/bin/python" -c 'import sys, jax; print("MF_WORKER", sys.argv[1],
    "ready: Python", sys.version.split()[0], "jax", jax.__version__)' \
    "$(worker_id)"
}

# True when the venv exists and runs the requested X.Y (any >= 3.11 for a
# path or other request).
venv_matches() {
  [[ -x "$VENV/bin/python" ]] || return 1
  if [[ "$1" =~ ^[0-9]+\.[0-9]+$ ]]; then
    "$VENV/bin/python" -c "import sys; sys.exit(
      '%d.%d' % sys.version_info[:2] != '$1')"
  fi
}

install_gcsfuse() {
  command -v gcsfuse >/dev/null && return 0
  local keyring=/usr/share/keyrings/cloud.google.asc
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
    | "${SUDO[@]}" tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt" \
    "gcsfuse-$(lsb_release -cs) main" \
    | "${SUDO[@]}" tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  # A fresh VM may still be running unattended upgrades: wait for the lock.
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse
}

mount_latents() {
  local bucket='' mount_point=/mnt/mf_jax_latents name dir
  while (($#)); do
    case "$1" in
      --bucket=*) bucket="${1#*=}" ;;
      --mount_point=*) mount_point="${1#*=}" ;;
      *) die "mount: unknown argument $1" ;;
    esac
    shift
  done
  [[ "$bucket" == gs://?* ]] || die "mount: --bucket=gs://BUCKET[/DIR]"
  bucket="${bucket#gs://}"
  bucket="${bucket%/}"
  name="${bucket%%/*}"
  dir=''
  [[ "$bucket" == */* ]] && dir="${bucket#*/}"
  if mountpoint -q "$mount_point"; then
    echo "tpu_worker.sh: $mount_point is already mounted"
    return 0
  fi
  "${SUDO[@]}" mkdir -p "$mount_point"
  "${SUDO[@]}" chown "$(id -u):$(id -g)" "$mount_point"
  local flags=(--implicit-dirs -o ro)
  [[ -n "$dir" ]] && flags+=(--only-dir "$dir")
  gcsfuse "${flags[@]}" "$name" "$mount_point"
}

start() {
  local workdir='' stamp='' grace=60 id log
  while (($#)); do
    case "$1" in
      --workdir=*) workdir="${1#*=}" ;;
      --stamp=*) stamp="${1#*=}" ;;
      --grace=*) grace="${1#*=}" ;;
      --) shift; break ;;
      *) die "start: unknown argument $1" ;;
    esac
    shift
  done
  [[ -n "$workdir" && -n "$stamp" ]] || die "start: --workdir and --stamp"
  [[ -x "$VENV/bin/python" ]] || die "no virtualenv at $VENV: run setup first"
  stop_trainers "$grace"
  mkdir -p "$LOG_DIR"
  id="$(worker_id)"
  log="$LOG_DIR/train_${stamp}_worker${id}.log"
  rm -f "$LOG_DIR/exit_code"
  ln -sfn "$log" "$LOG_DIR/latest.log"
  cd "$CODE_DIR"
  PYTHONUNBUFFERED=1 setsid nohup bash "$SELF" _run "$workdir" "$log" \
    "$VENV/bin/python" -m mf_jax.main "$@" > "$log" 2>&1 < /dev/null &
  echo $! > "$LOG_DIR/wrapper.pid"
  echo "MF_WORKER $id started: log $log"
}

# The detached wrapper: runs the trainer, passes SIGTERM/SIGINT/SIGHUP on to
# it, copies the log to the workdir now and then, records the exit status.
_run() {
  local workdir="$1" log="$2" pid uploader code=0
  shift 2
  "$@" &
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT HUP
  (while sleep "$UPLOAD_SECS"; do upload "$workdir" "$log" >/dev/null 2>&1 \
     || true; done) &
  uploader=$!
  # `wait` returns early when a trapped signal arrives: wait again.
  while kill -0 "$pid" 2>/dev/null; do
    code=0
    wait "$pid" || code=$?
  done
  kill "$uploader" 2>/dev/null || true
  echo "tpu_worker.sh: trainer exited with status $code ($(date -u))"
  echo "$code" > "$LOG_DIR/exit_code"
  upload "$workdir" "$log" || echo "tpu_worker.sh: log upload failed"
  exit "$code"
}

stop() {
  local grace=300 workdir=''
  while (($#)); do
    case "$1" in
      --grace=*) grace="${1#*=}" ;;
      --workdir=*) workdir="${1#*=}" ;;
      *) die "stop: unknown argument $1" ;;
    esac
    shift
  done
  stop_trainers "$grace"
  wait_for_wrapper 60
  if [[ -n "$workdir" ]]; then upload_all "$workdir"; fi
  status
}

wrapper_running() {
  [[ -f "$LOG_DIR/wrapper.pid" ]] && kill -0 "$(cat "$LOG_DIR/wrapper.pid")" \
    2>/dev/null
}

wait_for_wrapper() {
  local waited=0
  while wrapper_running && ((waited < $1 * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
}

upload_all() {
  shopt -s nullglob
  local logs=("$LOG_DIR"/train_*.log)
  shopt -u nullglob
  if ((${#logs[@]})); then upload "$1" "${logs[@]}"; fi
}

status() {
  local id pids
  id="$(worker_id)"
  pids="$(trainer_pids)"
  if [[ -n "${pids// /}" ]] || wrapper_running; then
    echo "MF_WORKER $id running ${pids:-wrapper}"
  elif [[ -f "$LOG_DIR/exit_code" ]]; then
    echo "MF_WORKER $id exited $(cat "$LOG_DIR/exit_code")"
  else
    echo "MF_WORKER $id idle"
  fi
}

logs() {
  local workdir='' lines=50 id
  while (($#)); do
    case "$1" in
      --workdir=*) workdir="${1#*=}" ;;
      --lines=*) lines="${1#*=}" ;;
      *) die "logs: unknown argument $1" ;;
    esac
    shift
  done
  id="$(worker_id)"
  if [[ ! -e "$LOG_DIR/latest.log" ]]; then
    echo "MF_WORKER $id has no training log in $LOG_DIR"
    return 0
  fi
  if [[ -n "$workdir" ]]; then upload_all "$workdir"; fi
  echo "== worker $id: $(readlink -f "$LOG_DIR/latest.log")"
  tail -n "$lines" "$LOG_DIR/latest.log"
}

command="${1:-}"
(($#)) && shift
case "$command" in
  setup) setup "$@" ;;
  mount) mount_latents "$@" ;;
  start) start "$@" ;;
  _run) _run "$@" ;;
  stop) stop "$@" ;;
  status) status ;;
  logs) logs "$@" ;;
  *) die "usage: tpu_worker.sh setup|mount|start|stop|status|logs ..." ;;
esac
