#!/usr/bin/env bash
# Trains mf_jax on a Cloud TPU VM slice: one Python process per TPU host.
#
#   launch/tpu_pod.sh --name=mf-xl --zone=us-central2-b --type=v4-64 \
#       --config=configs/imagenet256_xl.py --workdir=gs://BUCKET/runs/xl \
#       [--dry-run] [-- --config.data.latents_dir=gs://BUCKET/latents ...]
#
# Steps (each a gcloud command; --dry-run prints them and runs nothing):
#   1. create the TPU VM slice unless it exists (--spot for a spot slice);
#   2. put the code on every worker: a tarball of this checkout's tracked
#      files (default), or `git clone` of --repo at --branch;
#   3. install jax[tpu] and requirements.txt on every worker;
#   4. run the same `python -m mf_jax.main` on every worker (--worker=all).
# Every worker must run the same command: JAX on a pod is one program with
# one process per host. The workdir must be shared storage (gs://...), and a
# relaunch resumes from its latest checkpoint, so rerunning this script after
# a preemption continues the run (--skip-setup skips steps 1-3).
#
# Every flag has an environment-variable default (in brackets below).
#   --name [TPU_NAME]            TPU VM name (required)
#   --zone [ZONE]                e.g. us-central2-b (required)
#   --project [PROJECT]          gcloud project (default: gcloud's)
#   --type [ACCELERATOR_TYPE]    e.g. v4-32, v5litepod-16, v5p-16 [v4-8]
#   --version [RUNTIME_VERSION]  TPU VM image [tpu-ubuntu2204-base]
#   --config [CONFIG]            config file with optional :ARG [configs/imagenet256_xl.py]
#   --workdir [WORKDIR]          gs://... run directory (required)
#   --repo [REPO_URL]            git URL to clone instead of copying this checkout
#   --branch [BRANCH]            branch or tag for --repo [main]
#   --jax [JAX_SPEC]             pip spec of jax for TPUs ["jax[tpu]"]
#   --spot                       create a spot slice [SPOT=1]
#   --skip-setup                 only step 4 [SKIP_SETUP=1]
#   --dry-run                    print the commands [DRY_RUN=1]
#   -- ARGS                      passed on to mf_jax.main
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/imagenet256_xl.py}"
WORKDIR="${WORKDIR:-}"
REPO_URL="${REPO_URL:-}"
BRANCH="${BRANCH:-main}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
SPOT="${SPOT:-0}"
SKIP_SETUP="${SKIP_SETUP:-0}"
DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR="mf_jax"  # on each worker, relative to the home directory
EXTRA_ARGS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --jax=*) JAX_SPEC="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[[ -n "$TPU_NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or ZONE) is required"
[[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required"
[[ "$WORKDIR" == gs://* ]] || echo "tpu_pod.sh: warning: workdir $WORKDIR" \
  "is not gs://; each worker will write its own local copy" >&2

GCLOUD=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && SCOPE+=(--project="$PROJECT")

# Prints the command (shell-quoted, so it can be pasted) and runs it.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

# Runs a shell command on every worker of the slice.
on_all_workers() {
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all --command="$1"
}

create_slice() {
  if [[ "$DRY_RUN" != 1 ]] && \
      "${GCLOUD[@]}" describe "$TPU_NAME" "${SCOPE[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: reusing existing TPU VM $TPU_NAME"
    return
  fi
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run "${GCLOUD[@]}" create "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    "${extra[@]}"
}

ship_code() {
  if [[ -n "$REPO_URL" ]]; then
    on_all_workers "set -e; if [ -d $REMOTE_DIR/.git ]; then \
git -C $REMOTE_DIR fetch --depth=1 origin $BRANCH && \
git -C $REMOTE_DIR checkout -f FETCH_HEAD; else \
git clone --depth=1 --branch=$BRANCH $REPO_URL $REMOTE_DIR; fi"
    return
  fi
  local root tarball
  root="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="${TMPDIR:-/tmp}/mf_jax_code.tar.gz"
  # Tracked files only: no virtualenvs, build outputs or local run dirs.
  run bash -c "cd $(printf %q "$root") && git ls-files -z | \
tar --null -czf $(printf %q "$tarball") -T -"
  run "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:mf_jax_code.tar.gz" \
    "${SCOPE[@]}" --worker=all
  on_all_workers "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && \
tar -xzf mf_jax_code.tar.gz -C $REMOTE_DIR"
}

install_deps() {
  on_all_workers "set -e; cd $REMOTE_DIR && \
python3 -m pip install -q -U '$JAX_SPEC' && \
python3 -m pip install -q -r requirements.txt"
}

train() {
  local args
  args="--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")"
  if ((${#EXTRA_ARGS[@]})); then
    args+="$(printf ' %q' "${EXTRA_ARGS[@]}")"
  fi
  on_all_workers "cd $REMOTE_DIR && python3 -m mf_jax.main $args"
}

if [[ "$SKIP_SETUP" != 1 ]]; then
  create_slice
  ship_code
  install_deps
fi
train
