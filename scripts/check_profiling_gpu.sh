#!/usr/bin/env bash
# [profiling] on one GPU: CUDA kernels in the profiler traces and allocator snapshots of the debug model, both
# read back; then a run held to 0.1% of the GPU's memory (140 MB: the weights fit, 11 GiB of activations do
# not) runs out in step 1 and leaves iteration_1_oom.
# Usage: bash scripts/check_profiling_gpu.sh [OUT_FOLDER]
set -eu
cd "$(dirname "$0")/.."
out=${1:-/tmp/profiling_gpu}
rm -rf "$out"
python3 -m titan_dsv4.train --job.config_file train_configs/debug_model.toml \
  --parallelism.pipeline_parallel_degree 1 --training.steps 4 --job.dump_folder "$out" \
  --profiling.enable_profiling --profiling.profile_freq 2 --profiling.profiler_warmup 1 \
  --profiling.enable_memory_snapshot > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
python3 - "$out" <<'PY'
import json, pickle, sys
from pathlib import Path

out = Path(sys.argv[1])
for step in (2, 4):
    events = json.loads((out / f"profile_traces/iteration_{step}/rank0_trace.json").read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    with open(out / f"memory_snapshot/iteration_{step}/rank0_memory_snapshot.pickle", "rb") as f:
        snapshot = pickle.load(f)
    allocations = sum(len(trace) for trace in snapshot["device_traces"])
    print(f"step {step}: {len(kernels)} CUDA kernels traced; snapshot of {len(snapshot['segments'])} segments "
          f"and {allocations} allocator events")
    assert kernels and snapshot["segments"] and allocations
PY
rm -rf "$out"
if python3 -c "import sys, torch; torch.cuda.set_per_process_memory_fraction(0.001)
from titan_dsv4.train import main; sys.exit(main(sys.argv[1:]))" \
    --job.config_file train_configs/debug_model.toml --parallelism.pipeline_parallel_degree 1 \
    --training.steps 2 --training.seq_len 8192 --validation.enable false --job.dump_folder "$out" \
    --profiling.enable_memory_snapshot \
    > "$out.log" 2>&1; then
  echo "the run held to 0.1% of the memory did not fail"; exit 1
fi
grep -q "OutOfMemoryError" "$out.log" || { tail -20 "$out.log"; exit 1; }
ls -l "$out/memory_snapshot/iteration_1_oom/rank0_memory_snapshot.pickle"
