"""Muon (DeepSeek-V4's optimizer): the hybrid Newton-Schulz iteration against the SVD's polar factor, the
optimizer's steps against a reference written from the update rule with exact SVDs (AdamW's part against
torch's AdamW), and which DeepSeek-V4 weights it trains. Distributed runs: test_checkpoint.py."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from launch import REPO, free_port
from titan_dsv4.components import muon
from titan_dsv4.components.muon import hybrid_newton_schulz, newton_schulz_flops
from titan_dsv4.components.optimizer import build_optimizer
from titan_dsv4.config.job_config import Optimizer as OptimizerConfig
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 40, 24), (4, 64, 64), (1, 16, 128)])
def test_hybrid_newton_schulz_is_the_polar_factor(shape):
    """Wide, tall and square matrices (square Gaussian ones have singular values down to ~1e-4 of the norm)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3.0
    got = hybrid_newton_schulz(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), polar_factor(x), rtol=0, atol=1e-3)
    singular_values = torch.linalg.svdvals(got.double())
    assert singular_values.min() > 0.999 and singular_values.max() < 1.002


def reference_muon_step(w, m, g, count, lr, wd, mu, rms):
    """The update rule of components/muon.py, with the exact polar factor."""
    m.mul_(mu).add_(g)
    u = (g + mu * m).view(-1, *(w.shape[-2:] if w.ndim == 3 else (w.shape[0] // count, w.shape[1])))
    n, k = u.shape[-2:]
    o = polar_factor(u).float().view_as(w) * math.sqrt(max(n, k)) * rms
    w.mul_(1 - lr * wd).sub_(lr * o)


@pytest.mark.parametrize("batch_elements", [muon.BATCH_ELEMENTS, 300])  # 300: runs and slices of 1-2 matrices
def test_muon_steps_follow_the_update_rule_and_adamw_trains_the_rest(monkeypatch, batch_elements):
    monkeypatch.setattr(muon, "BATCH_ELEMENTS", batch_elements)
    torch.manual_seed(0)
    weights = {"plain": nn.Parameter(torch.randn(24, 40)), "grouped": nn.Parameter(torch.randn(2 * 12, 40)),
               "stacked": nn.Parameter(torch.randn(3, 16, 8)), "small": nn.Parameter(torch.randn(16, 8)),
               "vector": nn.Parameter(torch.randn(40)), "embedding": nn.Parameter(torch.randn(50, 8))}
    counts = {"plain": 1, "grouped": 2, "stacked": 3, "small": 1}
    cfg = OptimizerConfig(name="Muon", lr=0.02, weight_decay=0.1, muon_momentum=0.9, muon_update_rms=0.2)
    params = list(weights.values())
    optimizer = build_optimizer(params, cfg, {id(weights[k]): n for k, n in counts.items()})
    initial = {k: w.detach().clone() for k, w in weights.items()}
    reference = {k: w.clone() for k, w in initial.items()}
    momenta = {k: torch.zeros_like(reference[k]) for k in counts}
    adam_params = [nn.Parameter(weights[k].detach().clone()) for k in ("vector", "embedding")]
    adamw = torch.optim.AdamW(adam_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              weight_decay=cfg.weight_decay, foreach=True)
    for _ in range(3):
        grads = {k: torch.randn_like(w) for k, w in weights.items()}
        for k, w in weights.items():
            w.grad = grads[k].clone()
        for p, k in zip(adam_params, ("vector", "embedding")):
            p.grad = grads[k].clone()
        optimizer.step()
        adamw.step()
        for k, n in counts.items():
            reference_muon_step(reference[k], momenta[k], grads[k], n, cfg.lr, cfg.weight_decay,
                                cfg.muon_momentum, cfg.muon_update_rms)
    for k in counts:
        moved = weights[k].detach() - initial[k]  # RMS lr * rms = 4e-3 per step
        assert moved.square().mean().sqrt() > 5e-3, k
        torch.testing.assert_close(weights[k].detach(), reference[k], rtol=0, atol=5e-5)
        assert set(optimizer.state[weights[k]]) == {"momentum_buffer"}
        torch.testing.assert_close(optimizer.state[weights[k]]["momentum_buffer"], momenta[k])
    for p, k in zip(adam_params, ("vector", "embedding")):
        assert torch.equal(weights[k].detach(), p.detach()), k
        assert set(optimizer.state[weights[k]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_deepseek_v4_trains_its_matrices_with_muon_and_the_rest_with_adamw():
    """DeepSeek-V4's split (dsv4-spec.md §5.11): AdamW for the embedding, the prediction head, RMSNorm
    weights, and mHC's static biases and gating factors (here also the attention sinks and the compressors'
    position biases, which are not matrices of a linear map); Muon for every other weight, one matrix per
    expert and per group of the grouped output projection."""
    args = FLAVORS["debugmodel_mtp2"]
    with torch.device("meta"):
        model = DeepseekV4Model(args)
    names = {id(p): re.sub(r"\.\d+\.", ".N.", n) for n, p in model.named_parameters()}
    trained_by_muon = {names[id(p)]: count for p, count in model.matrix_parameters()}
    adamw = set(names.values()) - set(trained_by_muon)
    assert adamw == {
        "embed.weight", "head.weight", "norm.weight", "hc_head.base", "hc_head.scale",
        *(f"{part}.N.{name}" for part in ("layers", "mtp") for name in (
            "attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.kv_norm.weight", "attn.attn_sink",
            "hc_attn.base", "hc_attn.scale", "hc_ffn.base", "hc_ffn.scale")),
        *(f"layers.N.attn.{c}.{name}" for c in ("compressor", "indexer.compressor") for name in ("ape", "norm.weight")),
        "mtp.N.enorm.weight", "mtp.N.hnorm.weight", "mtp.N.norm.weight", "mtp.N.hc_head.base", "mtp.N.hc_head.scale",
    }
    counts = trained_by_muon
    assert counts["layers.N.ffn.experts.w1"] == args.n_routed_experts
    assert counts["mtp.N.attn.wo_a.weight"] == counts["layers.N.attn.wo_a.weight"] == args.o_groups > 1
    assert {counts[k] for k in counts if "experts." not in k and "wo_a" not in k} == {1}
    assert {"layers.N.hc_attn.fn", "mtp.N.e_proj.weight", "layers.N.ffn.gate.weight"} <= set(counts)


def test_sharded_updates_are_orthogonalized_as_whole_matrices(tmp_path):
    """tests/muon_worker.py on 4 gloo ranks: every rank's part of every update equals the same rows of the
    single-process result (uneven and empty row shards, HSDP replicas, groups, experts, whole weights)."""
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(REPO / "tests" / "muon_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    errors = json.loads(out.read_text())
    assert len(errors) == 4 and all(len(rank) == 7 for rank in errors)
    assert max(max(rank) for rank in errors) < 1e-6, errors


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_flops_are_what_torch_counts(shape):
    """The planner's Muon cost (``newton_schulz_flops``) against torch's FLOP counter on the real iteration."""
    with FlopCounterMode(display=False) as counter:
        hybrid_newton_schulz(torch.randn(shape))
    assert newton_schulz_flops(*shape) == counter.get_total_flops()
