"""``[compile]``: every decoder and MTP block compiled on its own (and the loss) gives the eager model's
logits and gradients. The fast ``aot_eager`` backend traces the same graphs inductor would get."""

import dataclasses

import pytest
import torch

from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model, head_loss
from titan_dsv4.models.deepseek_v4.init import canonical_fqn
from titan_dsv4.models.deepseek_v4.parallelize import apply_compile
from triton_model import bf16_model_with_triton_kernels


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_and_loss_equal_eager(monkeypatch, backend):
    """``inductor``: the CPU code it generates, too (its vectorised backward of ``unfold`` wrote out of bounds
    and gave wrong gradients, torch 2.13: the sliding-window keys are gathered instead)."""
    args = dataclasses.replace(FLAVORS["debugmodel"], num_hidden_layers=2, compress_ratios=[4, 16, 0])
    ids = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    targets = build_targets(ids.roll(-1, 1), torch.arange(64).expand(2, 64), args.num_nextn_predict_layers)
    results = []
    for compiled in (False, True):
        model = DeepseekV4Model(args)
        model.init_weights(0)
        model.train()
        model.set_mtp_loss_scale(0.3)
        if compiled:
            apply_compile(model, backend=backend)
            for name in ("_token_losses", "_logits_grad"):  # restored after the test
                monkeypatch.setattr(head_loss, name, getattr(head_loss, name))
            head_loss.compile_cross_entropy(backend)
        loss = MTPLoss()(model(ids, targets=targets), targets)
        loss.backward()
        grads = {canonical_fqn(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert all(type(b).__name__ == "OptimizedModule" for b in [*model.layers.values(), *model.mtp.values()])
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled.keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", ["none", "dense", "fp4"])
def test_checkpointed_blocks_compile_without_graph_breaks_on_the_gpu_paths(gpu_code_paths, lora):
    """What an H100 run compiles (bf16, grouped expert GEMMs, bf16-part fp32 GEMMs, query-blocked attention,
    a training indexer, full activation checkpointing, FP4 quantisation-aware experts, the attention rounding
    as the released model's) traces each block whole,
    still recomputes under compile, and counts the expert loads and the indexer KL once, as the eager model
    without recompute does. ``lora``: with adapters on every target, the routed experts' included (merged
    into the weights before the rounding), and only they train; the frozen experts stored dense or as FP4
    bytes (dequantised inside the block's graph)."""
    from torch._dynamo.utils import counters

    from titan_dsv4.models.deepseek_v4.lora import LORA_TARGETS, freeze_all_but_adapters
    from titan_dsv4.models.deepseek_v4.parallelize import apply_activation_checkpointing

    args = dataclasses.replace(FLAVORS["debugmodel"], num_hidden_layers=2, compress_ratios=[4, 0, 4], head_dim=80)
    if lora != "none":
        args = dataclasses.replace(args, lora_rank=8, lora_targets=list(LORA_TARGETS), expert_storage=lora)
    ids = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    targets = build_targets(ids.roll(-1, 1), torch.arange(64).expand(2, 64), args.num_nextn_predict_layers)
    runs = {}
    for compiled in (False, True):
        model = DeepseekV4Model(args)
        model.init_weights(0)
        model.train().to(torch.bfloat16)
        model.set_mtp_loss_scale(0.3)
        model.set_expert_qat("fp4")
        model.set_attention_qat(True)
        if lora != "none":
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))  # trained adapters
            freeze_all_but_adapters(model)
        for layer in model.modules():
            if hasattr(layer, "indexer_loss_scale") and layer.indexer is not None:
                layer.indexer_loss_scale = 0.5
        if compiled:
            apply_activation_checkpointing(model, "full", compiled=True)
            apply_compile(model, backend="aot_eager")
            counters.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            outputs = model(ids, targets=targets)
        loss = MTPLoss()(outputs, targets)
        loss.backward()
        buffers = {n: b.float().clone() for n, b in model.named_buffers() if n.endswith(("expert_load", "kl_sum"))}
        grads = {canonical_fqn(n): p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        runs[compiled] = (loss.detach(), sum(saved), buffers, grads)
    assert dict(counters["graph_break"]) == {}
    (eager_loss, eager_saved, eager_stats, eager_grads), (loss, saved, stats, grads) = runs[False], runs[True]
    assert saved < eager_saved / 4, (saved, eager_saved)  # the blocks' activations were not kept
    torch.testing.assert_close(loss, eager_loss)
    stats = {canonical_fqn(n): b for n, b in stats.items()}
    assert stats.keys() == eager_stats.keys() and any(n.endswith("kl_sum") for n in stats)
    for name, value in eager_stats.items():
        assert value.sum() > 0, name
        torch.testing.assert_close(stats[name], value, msg=name)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0.02, atol=0.02 * grad.abs().max().item(), msg=name)


def test_blocks_with_the_triton_kernels_compile_as_one_graph(gpu_code_paths):
    """On CUDA a block holds the Triton kernels (fused attention, indexer scores, Sinkhorn) as custom ops: each
    block still traces whole, with the kernels inside its graph (run here by Triton's interpreter)."""
    pytest.importorskip("triton")
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    model, ids, targets = bf16_model_with_triton_kernels([4, 0, 4])
    args = model.args
    backend = CompileCounterWithBackend("aot_eager")
    apply_compile(model, backend=backend)
    counters.clear()
    MTPLoss()(model(ids, targets=targets), targets).backward()
    assert dict(counters["graph_break"]) == {}
    blocks = args.num_hidden_layers + args.num_nextn_predict_layers
    assert backend.frame_count == blocks
    ops = [str(node.target) for graph in backend.graphs for node in graph.graph.nodes]
    assert ops.count("titan_dsv4.fused_attention.default") == blocks
    assert ops.count("titan_dsv4.sinkhorn.default") == 2 * blocks
    csa = sum(m.indexer is not None for m in model.attention_modules())
    assert csa > 0 and ops.count("titan_dsv4.index_scores.default") == csa
    # inductor generates no code for complex tensors: each would be left to eager kernels (RoPE's were)
    values = [node.meta.get("example_value") for graph in backend.graphs for node in graph.graph.nodes]
    assert not [v for v in values if isinstance(v, torch.Tensor) and v.is_complex()]
