#!/usr/bin/env bash
# Train with torchrun on this machine. Extra arguments are --section.key overrides.
#   NGPU=8 CONFIG_FILE=train_configs/flash_lora_1x8_h100.toml ./scripts/run_train.sh --training.steps 100
# Without GPUs it runs NGPU (default 2) CPU processes with gloo. The config is checked against the world size
# before torchrun starts: a mistake is one message and exit code 2.
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh" ""
CONFIG_FILE="${CONFIG_FILE:-$ROOT/train_configs/debug_model.toml}"
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPU="${NGPU:-$(nvidia-smi -L | wc -l)}"
else
  NGPU="${NGPU:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}"
  # ranks sharing cores: OpenMP threads that spin while waiting take the cores the other ranks need
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
fi
# Each rank tokenizes its next batches on a thread pool: give it the rank's share of the cores.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(( $(nproc) / NGPU > 1 ? $(nproc) / NGPU : 1 ))}"
cd "$ROOT"
for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    exec "$PY" -m titan_dsv4.train --job.config_file "$CONFIG_FILE" "$@"
  fi
done
"$PY" -m titan_dsv4.check --ngpu "$NGPU" --job.config_file "$CONFIG_FILE" "$@" || exit $?
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
  -m titan_dsv4.train --job.config_file "$CONFIG_FILE" "$@"
