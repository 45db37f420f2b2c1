#!/usr/bin/env bash
# The memory planner against torch.cuda.max_memory_allocated of real one-GPU training runs (debug model,
# long sequences so activations dominate). Usage: bash scripts/check_plan_gpu.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for overrides in "--training.seq_len 4096 --training.local_batch_size 4" \
                 "--training.seq_len 4096 --training.local_batch_size 4 --activation_checkpoint.mode full" \
                 "--training.seq_len 4096 --training.local_batch_size 4 --model.expert_qat fp4" \
                 "--model.flavor debugmodel_mtp2 --training.seq_len 8192 --training.local_batch_size 2"; do
  args="--job.config_file $PWD/train_configs/debug_model.toml --parallelism.pipeline_parallel_degree 1 $overrides"
  (cd tests && python3 memory_worker.py /tmp/plan_gpu.json $args --job.dump_folder /tmp/plan_gpu_run >/tmp/plan_gpu.log 2>&1) \
    || { tail -20 /tmp/plan_gpu.log; continue; }
  python3 - "$args" <<'PY'
import json, sys
from titan_dsv4.config import load_config
from titan_dsv4.plan import plan_memory
measured = json.load(open("/tmp/plan_gpu.json"))[0]["peak"]
planned = plan_memory(load_config(sys.argv[1].split()), 1, "cuda")[0].total
print(f"{sys.argv[1].split('--parallelism.pipeline_parallel_degree 1 ')[1]:80s} measured {measured / 2**20:8.1f} MiB"
      f"  planned {planned / 2**20:8.1f} MiB ({planned / measured - 1:+.1%})", flush=True)
PY
done
