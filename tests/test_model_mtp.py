"""MTP: explicit step-by-step reference, causality, packed documents, released parameter names."""

import torch

from hf_reference import random_model
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.mtp import mtp_targets
from titan_dsv4.models.deepseek_v4.state_dict_adapter import DeepseekV4StateDictAdapter

ARGS2 = FLAVORS["debugmodel_mtp2"]


def rms(x, w, eps):
    x = x.float()
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hyper_head(stream, head, eps_norm, eps_hc):
    flat = stream.flatten(2)
    mixes = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps_norm)) @ head.fn.t()
    pre = torch.sigmoid(mixes * head.scale + head.base) + eps_hc
    return (pre.unsqueeze(-1) * stream).sum(2)


def test_depth2_equals_explicit_computation():
    model = random_model(ARGS2).train()
    a = model.args
    ids = torch.randint(0, a.vocab_size, (2, 45))
    outputs = model(ids)
    assert len(outputs) == 3

    positions = torch.arange(45).expand(2, 45)
    ctx = model.attention_context(positions)
    x = model.embed(ids).unsqueeze(2).repeat(1, 1, a.hc_mult, 1)
    for layer in model.layers.values():
        x = layer(x, ctx, ids)
    head = model.head.weight
    main = rms(hyper_head(x, model.hc_head, a.rms_norm_eps, a.hc_eps), model.norm.weight, a.rms_norm_eps) @ head.t()
    torch.testing.assert_close(outputs[0], main, rtol=1e-5, atol=1e-5)
    for k, block in enumerate(model.mtp.values()):
        shifted = torch.zeros_like(ids)
        shifted[:, : 45 - (k + 1)] = ids[:, k + 1:]  # the tokens k+1 ahead, zeros in the tail
        e = rms(model.embed(shifted), block.enorm.weight, a.rms_norm_eps) @ block.e_proj.weight.t()
        h = rms(x, block.hnorm.weight, a.rms_norm_eps) @ block.h_proj.weight.t()
        x = super(type(block), block).forward(e.unsqueeze(2) + h, ctx, ids)  # the plain V4 block
        hidden = rms(hyper_head(x, block.hc_head, a.rms_norm_eps, a.hc_eps), block.norm.weight, a.rms_norm_eps)
        torch.testing.assert_close(outputs[k + 1], hidden @ head.t(), rtol=1e-5, atol=1e-5)


def test_eval_returns_main_logits_only():
    model = random_model(ARGS2).eval()
    out = model(torch.randint(0, ARGS2.vocab_size, (1, 9)))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 9, ARGS2.vocab_size)


def test_mtp_causality():
    """Depth k at position t sees tokens up to t+k+1: changing t+k+2 or later changes nothing there,
    changing t+k+1 does."""
    model = random_model(ARGS2).train()
    seq = 40
    ids = torch.randint(2, ARGS2.vocab_size, (1, seq))
    with torch.no_grad():
        base = model(ids)
    for k in range(2):
        for t in (0, 5, 17, 30):
            later = ids.clone()
            later[0, t + k + 2:] = (later[0, t + k + 2:] + 7) % ARGS2.vocab_size
            earlier = ids.clone()
            earlier[0, t + k + 1] = (earlier[0, t + k + 1] + 7) % ARGS2.vocab_size
            with torch.no_grad():
                out_later, out_earlier = model(later), model(earlier)
            torch.testing.assert_close(out_later[k + 1][0, t], base[k + 1][0, t], rtol=0, atol=1e-5)
            assert (out_earlier[k + 1][0, t] - base[k + 1][0, t]).abs().max() > 1e-4


def test_packed_documents_do_not_leak():
    """Two documents packed in one row give exactly the outputs of each run alone (main and MTP)."""
    model = random_model(ARGS2).train()
    doc_a = torch.randint(2, ARGS2.vocab_size, (1, 37))
    doc_b = torch.randint(2, ARGS2.vocab_size, (1, 50))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(37), torch.arange(50)]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, positions)
        alone_a, alone_b = model(doc_a), model(doc_b)
    for depth in range(3):
        torch.testing.assert_close(together[depth][:, :37], alone_a[depth], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[depth][:, 37:], alone_b[depth], rtol=1e-5, atol=1e-5)


def test_mtp_targets_shift_and_mask_documents():
    labels = torch.tensor([[11, 12, 13, -100, 21, 22, 23, 24]])  # doc A: 4 tokens, doc B: 4 tokens
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    assert mtp_targets(labels, positions, 0).tolist() == [[12, 13, -100, -100, 22, 23, 24, -100]]
    assert mtp_targets(labels, positions, 1).tolist() == [[13, -100, -100, -100, 23, 24, -100, -100]]


def _released_mtp_tensors(experts: int) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V4-Flash ``mtp.0.*`` bf16/fp32 tensors (scales aside), from dsv4-spec.md §4.2."""
    names = {
        "e_proj.weight": (4096, 4096), "h_proj.weight": (4096, 4096), "enorm.weight": (4096,),
        "hnorm.weight": (4096,), "norm.weight": (4096,), "attn_norm.weight": (4096,), "ffn_norm.weight": (4096,),
        "hc_head_fn": (4, 16384), "hc_head_base": (4,), "hc_head_scale": (1,),
        "hc_attn_fn": (24, 16384), "hc_attn_base": (24,), "hc_attn_scale": (3,),
        "hc_ffn_fn": (24, 16384), "hc_ffn_base": (24,), "hc_ffn_scale": (3,),
        "attn.attn_sink": (64,), "attn.q_norm.weight": (1024,), "attn.kv_norm.weight": (512,),
        "attn.wq_a.weight": (1024, 4096), "attn.wq_b.weight": (32768, 1024), "attn.wkv.weight": (512, 4096),
        "attn.wo_a.weight": (8192, 4096), "attn.wo_b.weight": (4096, 8192),
        "ffn.gate.weight": (256, 4096), "ffn.gate.bias": (256,),
        "ffn.shared_experts.w1.weight": (2048, 4096), "ffn.shared_experts.w3.weight": (2048, 4096),
        "ffn.shared_experts.w2.weight": (4096, 2048),
    }
    for e in range(experts):
        names |= {f"ffn.experts.{e}.w1.weight": (2048, 4096), f"ffn.experts.{e}.w3.weight": (2048, 4096),
                  f"ffn.experts.{e}.w2.weight": (4096, 2048)}
    return {f"mtp.0.{k}": v for k, v in names.items()}


def test_flash_mtp_parameters_map_one_to_one_onto_released_names():
    args = FLAVORS["flash"]
    with torch.device("meta"):
        model = DeepseekV4Model(args)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.") and "expert_load" not in k}
    released = DeepseekV4StateDictAdapter(args).to_hf(state)
    assert {k: tuple(v.shape) for k, v in released.items()} == _released_mtp_tensors(256)
    assert len(released) == 29 + 3 * 256


def test_rows_of_a_packed_batch_equal_each_row_alone():
    """No batch dependence, even with ties in the indexer's scores and rows that pack documents differently
    (different numbers of compressed entries per row): pipeline microbatches and data-parallel shards then
    compute exactly what the whole batch does."""
    model = random_model(ARGS2).double().train()
    ids = torch.randint(2, ARGS2.vocab_size, (3, 90))
    positions = torch.stack([torch.arange(90), torch.cat([torch.arange(35), torch.arange(55)]),
                             torch.arange(90) + 13])
    with torch.no_grad():
        together = model(ids, positions)
        alone = [model(ids[i:i + 1], positions[i:i + 1]) for i in range(3)]
    for depth in range(3):
        torch.testing.assert_close(together[depth], torch.cat([a[depth] for a in alone]), rtol=0, atol=1e-12)
