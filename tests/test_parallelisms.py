"""FSDP2, HSDP, expert parallelism and activation checkpointing, each with MTP on and pipeline parallelism
where it applies (and quantisation-aware experts): one real Trainer step on 4 gloo processes against a
single-process model (fp32).

Tolerances: fp32 alone moves the worst gradient by ~1.5e-3 of its scale against fp64 (measured on this
model), so gradients are compared at 3e-3 of each tensor's largest entry — a lost or doubled contribution
from any rank is off by tens of percent. Expert-bias updates are sign-based on integer loads: exact.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from launch import REPO, free_port
from titan_dsv4.models.deepseek_v4.lora import adapter_names, is_adapter
from titan_dsv4.models.deepseek_v4.moe import RoutedExperts

CASES = {
    "fsdp2_pp2": "pp:2",
    "ep2_fsdp2": "ep:2",  # EP borrows 2 of the 4 FSDP ranks
    "ep2_pp2": "pp:2,ep:2",
    "hsdp2x2": "dp_replicate:2",
    "ep2_hsdp2x2": "dp_replicate:2,ep:2",
    "ep2_fsdp2_ac_selective": "ep:2,ac:selective",
    "fsdp2_pp2_ac_full_mtp2": "pp:2,ac:full,mtp:2",
    "ep4_ac_full": "ep:4,ac:full",  # every FSDP rank taken by EP
    "ep2_pp2_zbv": "pp:2,ep:2,schedule:ZBVZeroBubble",
    "indexer_kl_fsdp2_pp2_ac_full": "pp:2,ac:full,indexer:1.0",  # the indexer trains inside a middle stage
    "indexer_kl_ep2_pp2_zbv": "pp:2,ep:2,schedule:ZBVZeroBubble,indexer:1.0",
    # op-level selective checkpointing (projection GEMMs kept): experts' FSDP unit inside the checkpoint
    "ep2_pp2_ac_op_mtp2": "pp:2,ep:2,ac:selective,sac:op,mtp:2",
    # FP4 quantisation-aware experts, each rank rounding the experts it holds (one process rounds all)
    "qat_fp4_ep2_pp2_ac_full": "pp:2,ep:2,ac:full,qat:fp4",
    # LoRA adapters alone training, every other weight frozen inside the FSDP units (experts too)
    "lora_ep2_pp2_ac_full_mtp2": "pp:2,ep:2,ac:full,mtp:2,lora:8",
    # context parallelism: each sequence in 2 shards of 64 tokens (the batch's documents cross them), FSDP over
    # dp_shard x cp; and under PP with EP borrowing the cp ranks, MTP depth 2 and the indexer training
    "cp2_fsdp2": "cp:2,seq:128",
    "cp2_ep2_pp2_ac_full_mtp2_indexer_kl": "cp:2,pp:2,ep:2,seq:128,ac:full,mtp:2,indexer:1.0",
    # last: compiling the loss's chunk functions lasts for the process. aot_eager traces the graphs inductor
    # would get. Whole blocks compiled under FSDP, PP and full AC; and with EP (the experts an FSDP unit of
    # their own: the rest of each block compiled around them), the trained indexer inside
    "compiled_fsdp2_pp2_ac_full_mtp2": "pp:2,ac:full,mtp:2,compile:aot_eager",
    "compiled_ep2_pp2_ac_full_indexer_kl": "pp:2,ep:2,ac:full,indexer:1.0,compile:aot_eager",
    # and op-level checkpointing there: each compiled part around the experts checkpointed on its own
    "compiled_ep2_ac_op_indexer_kl": "ep:2,ac:selective,sac:op,indexer:1.0,compile:aot_eager",
    # and the sequence shards' collectives inside compiled, checkpointed blocks
    "compiled_cp2_fsdp2_ac_full": "cp:2,seq:128,ac:full,compile:aot_eager",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "out.json"
    return _run_worker("parallel_worker.py", 4, out, *(f"{name}={spec}" for name, spec in CASES.items()))


def _run_worker(script: str, nproc: int, out, *args: str):
    """``tests/script`` under torchrun on ``nproc`` gloo processes; what it wrote to ``out`` (JSON)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend",
           "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(REPO / "tests" / script), str(out), *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_equals_single_process(results, case):
    r = results[case]
    assert r["uncovered_params"] == 0 and r["unexpected_grads"] == 0, r  # every gradient compared once
    assert r["loss_rel_err"] < 1e-5, r  # main, per-depth MTP and (when trained) indexer losses
    assert r["grad_rel_err"] < 3e-3, r  # every gradient after clipping, gathered from its shards
    assert r["norm_rel_err"] < 1e-4, r  # the clipping norm over pp / ep / fsdp counts each parameter once
    assert r["expert_bias_err"] == 0.0 < r["expert_bias_moved"], r  # backbone and MTP balancing biases
    if any(item.startswith("ep:") for item in CASES[case].split(",")):  # experts really are split by expert
        assert "dp_shard_in_ep" in r["expert_mesh"], r
    if "compile:" in CASES[case] and "ep:" in CASES[case]:  # the experts are not compiled: nothing breaks
        assert r["graph_breaks"] == [], r
    elif "compile:" in CASES[case]:  # only the CPU's per-expert loop (counts.tolist(), a host sync; the GPU
        # paths have no break, test_compile.py)
        assert all("aten._local_scalar_dense" in reason for reason in r["graph_breaks"]), r


@pytest.mark.slow
def test_context_parallel_equals_whole_sequences_in_fp64(tmp_path):
    """4 sequence shards of 64 tokens, documents starting inside shards, on a boundary and spanning one, MTP
    depth 2, the indexer training: the objective, the logged indexer KL and every gradient equal the whole
    sequence's in fp64 (so no entry, halo token, query or gradient is lost or counted twice)."""
    r = _run_worker("context_parallel_worker.py", 4, tmp_path / "out.json", "torch_fp64")["torch_fp64"]
    assert r["missing_grads"] == [] and r["indexer_kl"] > 0, r
    assert r["loss_rel_err"] < 1e-12 and r["indexer_kl_rel_err"] < 1e-12 and r["grad_rel_err"] < 1e-9, r


@pytest.mark.slow
def test_context_parallel_through_the_fused_kernels(tmp_path):
    """The same with the fused Triton attention and indexer kernels (run by Triton's interpreter), 2 shards, in
    fp32: they take the shard's halo and the gathered entries like the torch path."""
    r = _run_worker("context_parallel_worker.py", 2, tmp_path / "out.json", "triton_fp32")["triton_fp32"]
    assert r["missing_grads"] == [] and r["loss_rel_err"] < 1e-6 and r["indexer_kl_rel_err"] < 1e-5, r
    assert r["grad_rel_err"] < 1e-3, r


@pytest.mark.parametrize("lora", [False, True])
def test_grouped_gemm_path_equals_the_per_expert_loop(lora):
    """torch._grouped_mm (the CUDA path) runs on CPU in fp32 too: same rows and gradients as the loop,
    including experts that receive no token; with LoRA adapters on every expert matrix too."""
    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 32, limit=7.0)
    if lora:
        for name in ("w1", "w2", "w3"):
            n_experts, out_features, in_features = getattr(experts, name).shape
            a, b = adapter_names(name)
            experts.register_parameter(a, torch.nn.Parameter(torch.empty(n_experts, 8, in_features)))
            experts.register_parameter(b, torch.nn.Parameter(torch.empty(n_experts, out_features, 8)))
        experts.lora_scaling = 2.0
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.3)
    counts = torch.tensor([3, 0, 5, 2])
    xs = torch.randn(10, 16, requires_grad=True)
    ws = torch.rand(10, 1, requires_grad=True)
    grad_out = torch.randn(10, 16)
    results = []
    for grouped in (False, True):
        experts.use_grouped_mm = grouped
        out = experts(xs, ws, counts)
        results.append((out, *torch.autograd.grad(out, (xs, ws, *experts.parameters()), grad_out)))
    for loop, grouped in zip(*results):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)


def test_shutdown_frees_the_gloo_process_group(tmp_path):
    """After functional collectives (which import dynamo on first use; dynamo took references to every
    process group that existed then) and DTensor ops (whose caches keep the device mesh, which holds its
    groups), ``shutdown_distributed`` still leaves no gloo thread running."""
    assert _run_worker("teardown_worker.py", 2, tmp_path / "out.json") == []


def test_expert_parallel_moves_bf16_rows_both_ways(tmp_path):
    """bf16 experts split over 2 gloo ranks: the rows go to their experts and come back as bf16 (the
    experts' outputs are bf16 GEMM results; MoE sums them in fp32 after the combine), so the combine's
    all-to-all moves half the bytes of fp32 rows, and its backward sends bf16 gradients. Outputs and the
    rows' and routing weights' gradients equal one process holding every expert exactly; expert weight
    gradients up to bf16 accumulation (one backward over all rows against one per rank)."""
    for rank in _run_worker("expert_parallel_worker.py", 2, tmp_path / "out.json"):
        assert rank["wire"] == ["torch.bfloat16", "torch.float32", "torch.bfloat16"]  # rows, weights, back
        assert rank["out_dtype"] == "torch.bfloat16"
        diffs = rank["diffs"]
        assert diffs["out"] == diffs["grad_xs"] == diffs["grad_ws"] == 0.0, diffs
        assert all(diffs[w] < 2**-6 for w in ("w1", "w2", "w3")), diffs


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_the_released_fp32_tensors_in_fp32(tmp_path):
    """FSDP2 gathers parameters in bf16 for compute, except the tensors the release keeps in fp32 (mHC mixes,
    sinks, compressor position biases): every rank keeps those whole, in fp32, and their gradients are
    summed over the data-parallel ranks. 2 gloo processes against one process holding the same dtype split
    by hand, fed each rank's batch: objectives and the fp32 parameters' summed gradients agree."""
    r = _run_worker("mixed_precision_worker.py", 2, tmp_path / "out.json")
    replicated = set(r["replicated_names"])
    assert any(n.endswith("hc_attn.fn") for n in replicated) and any(n.endswith("attn_sink") for n in replicated)
    assert any(n.endswith("compressor.ape") for n in replicated)
    assert set(r["kept_whole"]) == replicated and r["kept_dtypes"] == ["torch.float32"]
    assert r["seen"], "no forward observed"
    for name, dtype in r["seen"].items():
        assert dtype == ("torch.float32" if name in replicated else "torch.bfloat16"), (name, dtype)
    assert replicated <= set(r["seen"])  # every fp32 tensor was used in forward, in fp32
    assert r["objectives"] == r["ref_objectives"]  # the same bf16 / fp32 computation, bit for bit
    assert r["replicated_grad_rel_err"] < 1e-2 and r["ranks_hold_equal_grads"]
    # LoRA: frozen weights stored in bf16 (half the memory), adapters and the fp32-kept tensors in fp32
    lora = r["lora"]
    adapters = {n for n in lora["stored"] if is_adapter(n)}
    assert len(adapters) == 2 * (5 * 3 + 1)  # wq_a, wkv and the experts' w2 in 4 + 1 blocks, MTP's e_proj
    for name, dtype in lora["stored"].items():
        assert dtype == ("torch.float32" if name in adapters or name in replicated else "torch.bfloat16"), name
    for name, dtype in lora["seen"].items():  # computed as without adapters: all bf16 but the fp32-kept
        assert dtype == ("torch.float32" if name in replicated else "torch.bfloat16"), (name, dtype)
    assert lora["objectives"] == r["ref_objectives"]  # B = 0: the base model's bf16 computation, bit for bit
    assert set(lora["with_grads"]) == adapters  # and nothing frozen
