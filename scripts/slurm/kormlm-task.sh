#!/usr/bin/env bash
# One kormlm worker for one Slurm task; kormlm.sbatch starts it with srun on every node:
#     worker --rank $SLURM_PROCID --local_rank LOCAL_RANK --coordinator $KORMLM_COORDINATOR
# The token comes from KORMLM_TOKEN in the environment (never on the command line); over TLS
# (an https:// KORMLM_COORDINATOR) the worker verifies the coordinator with KORMLM_TLS_CA.
#
# LOCAL_RANK picks the GPU: with --device cuda the coordinator assigns external workers
# cuda:LOCAL_RANK among the devices this process sees. It is $SLURM_LOCALID, except when Slurm
# bound exactly one GPU to the task (CUDA_VISIBLE_DEVICES lists one device): then it is 0.
# KORMLM_LOCAL_RANK overrides it.
set -euo pipefail

die() {
    printf 'kormlm-task: error: %s\n' "$*" >&2
    exit 2
}

: "${KORMLM_BIN_DIR:?set by kormlm.sbatch}"
: "${KORMLM_COORDINATOR:?set by kormlm.sbatch}"
[ -n "${KORMLM_TOKEN:-}" ] || die "KORMLM_TOKEN is not in the task's environment (srun --export=ALL passes it)"
case $KORMLM_COORDINATOR in
https://*) [ -n "${KORMLM_TLS_CA:-}" ] || die "KORMLM_TLS_CA is not in the task's environment (srun --export=ALL passes it)" ;;
esac
rank=${SLURM_PROCID:?not started by srun}
local_rank=${KORMLM_LOCAL_RANK:-${SLURM_LOCALID:?not started by srun}}

if [ -z "${KORMLM_LOCAL_RANK:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    if [ "${#visible[@]}" -eq 1 ] && [ "$local_rank" -ne 0 ]; then
        printf 'kormlm-task: rank %s sees one GPU (CUDA_VISIBLE_DEVICES=%s); using it as cuda:0\n' \
            "$rank" "$CUDA_VISIBLE_DEVICES" >&2
        local_rank=0
    fi
fi

# libtorch's CPU thread pool: the task's CPUs, not the whole node's.
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
fi

exec "$KORMLM_BIN_DIR/worker" --rank "$rank" --local_rank "$local_rank" --coordinator "$KORMLM_COORDINATOR"
