"""The LM head fused with its cross-entropy (``head_loss.py``) against torch's cross-entropy of the
explicit logits, fp64 finite differences, and (the GPU's bf16-part GEMMs) fp64 products."""

import pytest
import torch
import torch.nn.functional as F

from bf16_gemm import assert_bf16_gemm
from hf_reference import random_model
from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.models.deepseek_v4 import FLAVORS
from titan_dsv4.models.deepseek_v4 import fp32_linear
from titan_dsv4.models.deepseek_v4 import head_loss as module


def _batch(args, seq: int = 40):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (2, seq), generator=gen)
    labels = ids.roll(-1, 1)
    labels[0, :5] = -100  # ignored labels (and, through the shift, ignored MTP targets)
    positions = torch.cat([torch.arange(25), torch.arange(seq - 25)]).expand(2, seq)  # two documents
    return ids, positions, build_targets(labels, positions, args.num_nextn_predict_layers)


def test_fused_head_loss_equals_cross_entropy_of_the_logits(monkeypatch):
    """Model with MTP D=2: the fused objective, per-depth stats (CE sums, valid counts, argmax hits) and
    every parameter gradient equal ``F.cross_entropy`` of the unfused fp32 logits, weighted main + lambda/D
    per depth; chunks of 17 rows leave a remainder."""
    args = FLAVORS["debugmodel"].with_mtp_layers(2)
    model = random_model(args).train()
    model.set_mtp_loss_scale(0.3)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 17 * args.vocab_size)
    ids, positions, targets = _batch(args)
    outputs = model(ids, positions, targets=targets)
    MTPLoss()(outputs, targets, 77.0).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    reference, weights = 0.0, [1.0, 0.15, 0.15]
    for d, logits in enumerate(model(ids, positions)):
        flat_logits, flat_target = logits.reshape(-1, args.vocab_size), targets[..., d].reshape(-1)
        ce = F.cross_entropy(flat_logits, flat_target, reduction="sum")
        valid = flat_target != -100
        hits = ((flat_logits.argmax(-1) == flat_target) & valid).sum()
        torch.testing.assert_close(outputs[1][d], torch.stack([ce, valid.sum(), hits]).float().detach())
        reference = reference + weights[d] * ce
    torch.testing.assert_close(outputs[0], reference.detach())
    (reference / 77.0).backward()
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(),
                                       msg=name)


def test_fused_head_loss_gradients_against_finite_differences():
    """fp64 gradient check of the objective w.r.t. hidden states and head weight, with ignored targets,
    per-depth weights and chunks that do not divide the rows."""
    gen = torch.Generator().manual_seed(0)
    hiddens = [torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    weight = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (2, 5, 2), generator=gen)
    targets[0, 1:3, 0] = -100
    targets[1, 4, 1] = -100
    old, module.CHUNK_ELEMENTS = module.CHUNK_ELEMENTS, 4 * 9
    try:
        assert torch.autograd.gradcheck(
            lambda a, b, w: module.head_loss([a, b], w, targets, [1.0, 0.4])[0], (*hiddens, weight))
    finally:
        module.CHUNK_ELEMENTS = old


def test_no_vocabulary_sized_tensor_is_kept_for_backward():
    """What waits for backward is the hidden states' and head weight's gradients, never a ``[rows, vocab]``
    tensor (the unfused head kept the fp32 logits and their log-softmax per depth)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 64, 16, generator=gen, requires_grad=True)
    weight = torch.randn(500, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 500, (3, 64, 1), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        objective, _ = module.head_loss([hidden], weight, targets, [1.0])
    assert saved and all(500 not in shape or shape == weight.shape for shape in saved), saved
    objective.backward()
    unfused = F.cross_entropy(F.linear(hidden, weight).reshape(-1, 500), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(objective, unfused)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float32)])
def test_gpu_path_from_bf16_parts_is_as_accurate_as_its_results(monkeypatch, dtypes):
    """The GPU path (head and gradient GEMMs on bf16 parts, gradient split into parts, the weight product
    with the parts stacked along K) on CPU with the bf16 GEMM stood in for by the exact product of bf16
    values: the objective to fp32 accuracy; an fp32 gradient the exact one to 2^-18 of its scale; a bf16
    gradient what one bf16 GEMM of the logits' exact gradient and the other operand gives."""
    monkeypatch.setattr(fp32_linear, "takes_gpu_path", lambda x: True)
    monkeypatch.setattr(module, "bf16_mm", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 24 * 300)
    hidden_dtype, weight_dtype = dtypes
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 1, 50, 32, generator=gen).to(hidden_dtype).requires_grad_()  # [depth, B, S, H]
    weight = (torch.randn(300, 32, generator=gen) / 4).to(weight_dtype).requires_grad_()
    targets = torch.randint(0, 300, (1, 50, 2), generator=gen)
    targets[0, :7, 1] = -100
    depth_weights = [1.0, 0.25]
    objective, stats = module.head_loss(list(hidden.unbind(0)), weight, targets, depth_weights)
    objective.backward()

    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = sum(wd * F.cross_entropy(F.linear(h64[d, 0], w64), targets[0, :, d], reduction="sum")
              for d, wd in enumerate(depth_weights))
    ref.backward()
    assert abs(objective.item() - ref.item()) < 1e-6 * ref.item()
    # the objective's gradient w.r.t. the logits, exactly: weight_d (softmax - onehot) on valid rows
    logits_grad = []
    for d, wd in enumerate(depth_weights):
        logits = F.linear(h64[d, 0], w64).detach()
        valid = targets[0, :, d] != -100
        onehot = F.one_hot(targets[0, :, d].clamp(min=0), 300).double()
        logits_grad.append(wd * valid.unsqueeze(-1) * (logits.softmax(-1) - onehot))
    logits_grad = torch.cat(logits_grad)  # [depth x rows, vocab]
    rows = hidden.detach().reshape(-1, 32)
    operands = ((logits_grad, weight.detach()), (logits_grad.t(), rows))
    for got, want, (a, b) in zip((hidden.grad.reshape(-1, 32), weight.grad), (h64.grad.reshape(-1, 32), w64.grad),
                                 operands):
        if got.dtype == torch.float32:
            assert (got.double() - want).abs().max() < 2**-18 * want.abs().max()
        else:
            assert_bf16_gemm(got, a, b)
    # no gradient work without autograd: same statistics
    with torch.no_grad():
        again = module.head_loss(list(hidden.unbind(0)), weight, targets, depth_weights)
    torch.testing.assert_close(again[1], stats)


def test_mtp_needs_its_loss_scale_before_training_with_targets():
    args = FLAVORS["debugmodel"].with_mtp_layers(1)
    model = random_model(args).train()
    ids, positions, targets = _batch(args)
    with pytest.raises(ValueError, match="set_mtp_loss_scale"):
        model(ids, positions, targets=targets)


def test_compiled_chunk_functions_equal_eager():
    """What GPUs run: the chunk's loss statistics and its logits gradient (whole, or as 2 / 3 stacked bf16
    parts) compiled by inductor (here for the CPU) equal the eager functions, without a graph break."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(24, 300, generator=gen)
    target = torch.randint(0, 300, (24,), generator=gen)
    target[3] = -100
    row_weight = torch.rand(24, generator=gen)
    token_losses = torch.compile(module._token_losses.__wrapped__, fullgraph=True)
    logits_grad = torch.compile(module._logits_grad.__wrapped__, fullgraph=True)
    eager = module._token_losses.__wrapped__(logits, target)
    for got, want in zip(token_losses(logits, target), eager):
        torch.testing.assert_close(got, want)
    for parts in (0, 2, 3):
        want = module._logits_grad.__wrapped__(logits, eager[0], target, row_weight, parts)
        got = logits_grad(logits, eager[0], target, row_weight, parts)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float().sum(0), want.float().sum(0), rtol=0, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"]
    # the gradient itself: row_weight (softmax - onehot), zero on the ignored row
    softmax_grad = (torch.softmax(logits, -1) - F.one_hot(target.clamp(min=0), 300)) * row_weight[:, None]
    softmax_grad[3] = 0
    torch.testing.assert_close(want.float().sum(0), softmax_grad, rtol=0, atol=1e-6)
