#!/bin/bash
# One node's torchrun, started by srun on every node of the allocation (see train.sbatch).
# Environment: SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (set by SLURM);
# optional MASTER_ADDR / MASTER_PORT (rendezvous host, default the first node, port 29500),
# NPROC_PER_NODE (default SLURM_GPUS_ON_NODE or 8), LOG_DIR (default logs/JOB_ID), PYTHON.
# DRY_RUN=1 prints the command instead of running it.
set -eu
CONFIG_FILE="$1"
shift
HEAD="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
LOG_DIR="${LOG_DIR:-logs/$SLURM_JOB_ID}/node$SLURM_NODEID"
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

cmd=("$PYTHON" -m torch.distributed.run
  --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC"
  --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" --max_restarts 0
  --log_dir "$LOG_DIR" --redirects 3 --tee 3 --local_ranks_filter 0
  -m titan_dsv4.train --job.config_file "$CONFIG_FILE" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
