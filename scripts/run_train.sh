#!/usr/bin/env bash
# Train with torchrun on this machine. Extra arguments are --section.key overrides.
#   NGPU=8 CONFIG_FILE=train_configs/dsv4_flash.toml ./scripts/run_train.sh --training.steps 100
# Without GPUs it runs NGPU (default 2) CPU processes with gloo.
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh" ""
CONFIG_FILE="${CONFIG_FILE:-$ROOT/train_configs/debug_model.toml}"
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPU="${NGPU:-$(nvidia-smi -L | wc -l)}"
else
  NGPU="${NGPU:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}"
fi
# Each rank tokenizes its next batches on a thread pool: give it the rank's share of the cores.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(( $(nproc) / NGPU > 1 ? $(nproc) / NGPU : 1 ))}"
cd "$ROOT"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
  -m titan_dsv4.train --job.config_file "$CONFIG_FILE" "$@"
