#!/usr/bin/env bash
# ftl-engine with torchrun on one node or several (c10d rendezvous), outside SLURM.
#
#   launch/torchrun.sh my.yaml --set train.max_steps=2000                       # this node, all GPUs
#   NNODES=2 MASTER_ADDR=node001 launch/torchrun.sh my.yaml                       # run on each of 2 nodes
#   DRY_RUN=1 NPROC_PER_NODE=4 launch/torchrun.sh my.yaml                         # print the command only
#
# Arguments are those of `ftl train` (CONFIG and --set overrides). Variables:
#   NPROC_PER_NODE  ranks on this node (default: all GPUs, or 1 on a CPU machine)
#   NNODES          nodes in the job (default 1). With more than one, run this script on every node
#                   with the same MASTER_ADDR/MASTER_PORT/RDZV_ID; the rendezvous numbers the nodes.
#   MASTER_ADDR     address of the first node, reachable from all nodes (required when NNODES > 1)
#   MASTER_PORT     rendezvous port on MASTER_ADDR (default 29400; one per concurrent job on that node)
#   RDZV_ID         a name for this job, the same on every node (default ftl-<MASTER_PORT>)
#   MAX_RESTARTS    restart all ranks this many times after a failure (default 0)
#   PYTHON          a Python that has ftl-engine installed (default python3)
#   OMP_NUM_THREADS CPU threads per rank (default: this node's CPUs / NPROC_PER_NODE)
#   NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME: see docs/clusters.md.
#   DRY_RUN=1       print the torchrun command instead of running it
# On SIGUSR1/SIGTERM every rank saves a checkpoint and the script exits 75 (run it again to resume).
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
args=(-m engine.cli launch --nnodes "$NNODES" --max-restarts "${MAX_RESTARTS:-0}")
if [[ -n ${NPROC_PER_NODE:-} ]]; then args+=(--nproc-per-node "$NPROC_PER_NODE"); fi
if ((NNODES > 1)); then
    if [[ -z ${MASTER_ADDR:-} ]]; then
        echo "torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (an address of the first node)" >&2
        exit 2
    fi
    port=${MASTER_PORT:-29400}
    args+=(--rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "${RDZV_ID:-ftl-$port}")
fi
if [[ -n ${DRY_RUN:-} ]]; then args+=(--dry-run); fi
exec "$PYTHON" "${args[@]}" "$@"
