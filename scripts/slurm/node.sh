#!/bin/bash
# One node's torchrun, started by srun on every node of the allocation (see train.sbatch).
# Environment: SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (set by SLURM; outside SLURM one
# node, this host); optional MASTER_ADDR / MASTER_PORT (rendezvous host, default the first node, port 29500),
# NPROC_PER_NODE (default SLURM_GPUS_ON_NODE or 8), LOG_DIR (default logs/JOB_ID), PYTHON.
# The config is checked against the job's world size first (node 0 prints a mistake; every node exits 2).
# DRY_RUN=1 checks the config and prints the command instead of running it.
set -eu
CONFIG_FILE="$1"
shift
JOB_ID="${SLURM_JOB_ID:-local}"
NNODES="${SLURM_NNODES:-1}"
NODE_ID="${SLURM_NODEID:-0}"
if [ -n "${MASTER_ADDR:-}" ]; then
  HEAD="$MASTER_ADDR"
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else
  HEAD="$(hostname)"
fi
PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
LOG_DIR="${LOG_DIR:-logs/$JOB_ID}/node$NODE_ID"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# NCCL: fail fast with a readable error instead of hanging, dump the flight recorder on timeouts.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Each rank tokenizes its next batches on a thread pool: give it the rank's share of the node's cores.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(( $(nproc) / NPROC > 1 ? $(nproc) / NPROC : 1 ))}"

status=0
if [ "$NODE_ID" = 0 ]; then
  "$PYTHON" -m titan_dsv4.check --ngpu $(( NNODES * NPROC )) --job.config_file "$CONFIG_FILE" "$@" || status=$?
else
  "$PYTHON" -m titan_dsv4.check --ngpu $(( NNODES * NPROC )) --job.config_file "$CONFIG_FILE" "$@" 2>/dev/null \
    || status=$?
fi
[ "$status" = 0 ] || exit "$status"

cmd=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --node_rank "$NODE_ID" --nproc_per_node "$NPROC"
  --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$JOB_ID" --max_restarts 0
  --log_dir "$LOG_DIR" --redirects 3 --tee 3 --local_ranks_filter 0
  -m titan_dsv4.train --job.config_file "$CONFIG_FILE" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
