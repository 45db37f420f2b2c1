# Everything a lent GPU's minutes go to, in one call under ten minutes (the device tool's timeout_s 600):
# the one-GPU benchmark (its goal figures first; no part starts after BENCH_DEADLINE seconds), then the
# memory planner's and [profiling]'s GPU checks, then the goal figures against their bounds, printed last.
# Usage (the lent machine: torch from its image, no network; the repository goes on PYTHONPATH here):
#   bash scripts/gpu_run.sh [OUT_FOLDER]        # OUT_FOLDER defaults to $OUT, else gpu_run_out
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_run_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 | tee "$out/gpu.txt"
# a part that starts just before the deadline may still run a minute or two: the hard limit stops it
timeout "${BENCH_LIMIT:-400}" python3 scripts/bench_gpu.py --out "$out" --compile-blocks --checkpointing \
  --deadline "${BENCH_DEADLINE:-300}" > "$out/bench.log" 2>&1
echo "bench_gpu.py exit $? (124: stopped at ${BENCH_LIMIT:-400} s; summary.json holds the parts it finished)"
timeout 110 bash scripts/check_plan_gpu.sh 2>&1 | tee "$out/check_plan.log"
timeout 70 bash scripts/check_profiling_gpu.sh 2>&1 | tee "$out/check_profiling.log"
python3 - "$out/summary.json" <<'PY'
import json, sys
sys.path.insert(0, "scripts")
from bench_gpu import goal_table

summary = json.load(open(sys.argv[1]))
print({name: seconds for name, seconds in summary.get("part_seconds", {}).items()})
print(goal_table(summary.get("goal", {})))
PY
