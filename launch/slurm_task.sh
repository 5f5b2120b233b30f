#!/usr/bin/env bash
# One task (process) of launch/slurm_gpu.sbatch's job step: tells JAX which
# of the GPUs it sees are its own, then runs the command (mf_jax.main).
#
# JAX's SLURM detection gives a task the one GPU numbered SLURM_LOCALID.
# That is right only when every task sees all of its node's GPUs and there
# is one task per GPU. Two other layouts are common and would break:
#   - GPUs bound per task (sbatch --gpus-per-task=1, or --gpu-bind): Slurm
#     sets CUDA_VISIBLE_DEVICES to the task's own GPU(s), which CUDA then
#     numbers from 0, so GPU number SLURM_LOCALID (say 5) does not exist;
#   - one task per node: JAX would use GPU 0 only.
# So each task sets JAX_LOCAL_DEVICE_IDS (read by jax.distributed.initialize,
# jax >= 0.4.32), in CUDA's numbering of the GPUs it sees:
#   - it sees fewer GPUs than its node has (bound), or it is the node's only
#     task: all of them (0 .. seen-1);
#   - several tasks share all the node's GPUs: an equal block each, task L
#     taking L*k .. L*k+k-1 with k = GPUs / tasks on the node.
# A JAX_LOCAL_DEVICE_IDS already set is left alone.
set -euo pipefail

die() { echo "slurm_task.sh: $*" >&2; exit 2; }

# The number of this step's tasks on this node, from a Slurm list such as
# "8(x2),4" (8 tasks on each of 2 nodes, then 4).
tasks_on_node() {
  local spec="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}"
  local node="${SLURM_NODEID:-0}" first=0 part count repeats parts
  if [[ -z "$spec" ]]; then
    echo "${SLURM_NTASKS_PER_NODE:-1}"
    return
  fi
  IFS=, read -r -a parts <<< "$spec"
  for part in "${parts[@]}"; do
    if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      count="${BASH_REMATCH[1]}"
      repeats="${BASH_REMATCH[2]}"
    else
      count="$part"
      repeats=1
    fi
    if ((node < first + repeats)); then
      echo "$count"
      return
    fi
    first=$((first + repeats))
  done
  die "node $node is not in SLURM_STEP_TASKS_PER_NODE=$spec"
}

# The node's GPU count in the job's allocation.
gpus_on_node() {
  local gpus="${SLURM_GPUS_ON_NODE:-}"
  if [[ -z "$gpus" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    gpus="${SLURM_GPUS_PER_NODE##*:}"  # "a100:8" or "8"
  fi
  echo "${gpus:-$1}"
}

local_device_ids() {
  local seen=() tasks node_gpus local_id="${SLURM_LOCALID:-0}" first k
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" \
        && "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]]; then
    IFS=, read -r -a seen <<< "$CUDA_VISIBLE_DEVICES"
  fi
  node_gpus="$(gpus_on_node "${#seen[@]}")"
  ((${#seen[@]})) || mapfile -t seen < <(seq 0 $((node_gpus - 1)))
  ((${#seen[@]})) || return 0  # no GPUs: JAX runs on CPU
  tasks="$(tasks_on_node)"
  if ((tasks > 1 && ${#seen[@]} >= node_gpus)); then
    ((node_gpus % tasks == 0)) || die "$tasks tasks cannot share the" \
      "node's $node_gpus GPUs evenly: use --ntasks-per-node=N with N" \
      "dividing the GPUs per node (or --gpus-per-task)"
    k=$((node_gpus / tasks))
    first=$((local_id * k))
  else
    k="${#seen[@]}"
    first=0
  fi
  seq -s, "$first" $((first + k - 1))
}

if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
  ids="$(local_device_ids)"
  if [[ -n "$ids" ]]; then export JAX_LOCAL_DEVICE_IDS="$ids"; fi
fi
if [[ "${SLURM_PROCID:-0}" == 0 ]]; then
  echo "slurm_task.sh: $(tasks_on_node) tasks on node ${SLURM_NODEID:-0}," \
    "task 0 sees CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}," \
    "uses JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-all}"
fi
exec "$@"
