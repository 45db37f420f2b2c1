"""Analytic gradients of mHC, attention (every layer kind) and MoE routing vs fp64 finite differences."""

import dataclasses

import pytest
import torch
from torch.func import functional_call

from titan_dsv4.models.deepseek_v4 import DeepseekV4ModelArgs
from titan_dsv4.models.deepseek_v4.attention import Attention
from titan_dsv4.models.deepseek_v4.hyper_connection import HyperConnection
from titan_dsv4.models.deepseek_v4.init import init_weights
from titan_dsv4.models.deepseek_v4.model import DeepseekV4Model
from titan_dsv4.models.deepseek_v4.moe import MoE

TINY = DeepseekV4ModelArgs(
    vocab_size=32, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, head_dim=8, qk_rope_head_dim=4,
    q_lora_rank=6, o_lora_rank=4, o_groups=2, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=6, num_hash_layers=1, sliding_window=4, compress_ratios=[0, 4, 2],
    index_n_heads=2, index_head_dim=4, index_topk=2, hc_mult=2, hc_sinkhorn_iters=5,
    num_nextn_predict_layers=0,
)


def _check(module, inputs, param_names):
    params = {n: p.detach().double().requires_grad_(True) for n, p in module.named_parameters()
              if n in param_names}

    def fn(*tensors):
        mapping = dict(zip(param_names, tensors[len(inputs):]))
        return functional_call(module, mapping, tensors[: len(inputs)])

    assert torch.autograd.gradcheck(fn, (*inputs, *[params[n] for n in param_names]), eps=1e-6, atol=1e-6,
                                    rtol=1e-4)


class _Call(torch.nn.Module):
    """Exposes ``module`` as ``self.inner`` and calls ``call(inner, *inputs)``."""

    def __init__(self, module, call):
        super().__init__()
        self.inner, self.call = module, call

    def forward(self, *inputs):
        return self.call(self.inner, *inputs)


def _randomised(model):
    init_weights(model, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("base", "attn_sink", "ape")):
                p.normal_(0, 0.5)
    return model.double()


def test_hyper_connection_pre_post():
    torch.manual_seed(0)
    hc = HyperConnection(8, 3, 6, 1e-6, 1e-6).double()
    with torch.no_grad():
        hc.fn.normal_(0, 0.3), hc.base.normal_(0, 0.5), hc.scale.uniform_(0.5, 1.5)

    def site(module, x, out):
        collapsed, post, comb = module(x)
        return HyperConnection.post(out * collapsed, x, post, comb)

    x = torch.randn(2, 3, 3, 8, dtype=torch.float64, requires_grad=True)
    out = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    _check(_Call(hc, site), (x, out), ["inner.fn", "inner.base", "inner.scale"])


@pytest.mark.parametrize("layer_id", [0, 1, 2], ids=["sliding", "csa", "hca"])
def test_attention(layer_id):
    torch.manual_seed(layer_id)
    model = _randomised(DeepseekV4Model(TINY))
    attn: Attention = model.layers[str(layer_id)].attn
    positions = torch.arange(13).expand(2, 13)
    ctx = model.attention_context(positions)

    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    names = ["inner.wq_b.weight", "inner.wkv.weight", "inner.attn_sink", "inner.wo_a.weight"]
    if attn.compressor is not None:
        names += ["inner.compressor.wkv.weight", "inner.compressor.wgate.weight", "inner.compressor.ape"]
    _check(_Call(attn, lambda m, x: m(x, ctx)), (x,), names)


@pytest.mark.parametrize("layer_id", [0, 1], ids=["hash", "learned"])
def test_moe_routing(layer_id):
    torch.manual_seed(layer_id)
    args = dataclasses.replace(TINY, scoring_func="sqrtsoftplus")
    moe = MoE(args, layer_id)
    model = torch.nn.Module()
    model.args, model.moe = args, moe
    init_weights(model, 1)
    moe = moe.double()
    ids = torch.randint(0, args.vocab_size, (2, 5))

    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    names = ["inner.gate.weight", "inner.experts.w1", "inner.experts.w2", "inner.shared_experts.w3.weight"]
    _check(_Call(moe, lambda m, x: m(x, ids)), (x,), names)
