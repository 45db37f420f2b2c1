"""Muon as DeepSeek-V4 was trained with it: orthogonalized momentum for the matrices, AdamW for the rest.

Per independent matrix ``W [n, m]`` (an expert's, a group's of the grouped output projection, or a whole
weight; ``DeepseekV4Model.matrix_parameters``), with momentum ``mu``, update RMS ``gamma``:

    M = mu * M + G;   O = NS(mu * M + G) * sqrt(max(n, m)) * gamma;   W = W * (1 - lr * wd) - lr * O

``NS`` is the hybrid Newton-Schulz iteration: 8 quintic steps with (3.4445, -4.7750, 2.0315) bring every
singular value near 1 quickly, 2 more with (2, -1.5, 0.5) settle them at 1 (that polynomial has p(1) = 1,
p'(1) = 0). An orthogonal ``n x m`` matrix has RMS ``1 / sqrt(max(n, m))``, so ``O`` has RMS ``gamma``: near
AdamW's typical update, which lets Muon reuse AdamW's learning rate and weight decay (0.18 in DeepSeek-V4).

Sharding: the Newton-Schulz iteration needs whole matrices. A routed-experts tensor is sharded by expert
(EP and FSDP both split dim 0), so each rank orthogonalizes the experts it holds. Any other FSDP-sharded
weight is all-gathered, orthogonalized on every rank of its group, and each rank keeps its rows. Weights
kept whole (the mHC projections) are the same on every rank after their gradient all-reduce.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..distributed.utils import local_shard

HYBRID_NEWTON_SCHULZ = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


def hybrid_newton_schulz(matrices: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of each matrix ``[..., n, m]`` (approximately: directions with
    singular values below ~1e-3 of the Frobenius norm are not fully brought to 1), in ``matrices``' dtype."""
    x = matrices
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for a, b, c in HYBRID_NEWTON_SCHULZ:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


class Muon(torch.optim.AdamW):
    """Muon for the parameter groups marked ``muon`` (with ``matrices``: per parameter, how many independent
    matrices it stacks along dim 0, and ``momentum``, ``update_rms``), AdamW (the base class) for the others.

    The state of a Muon parameter is ``momentum_buffer``, sharded as the parameter is."""

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("muon"):
                for p, count in zip(group["params"], group["matrices"]):
                    if p.grad is not None:
                        self._update(p, count, group)
        return loss

    def _update(self, p: torch.Tensor, count: int, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        grad, buf, param = local_shard(p.grad), local_shard(state["momentum_buffer"]), local_shard(p)
        buf.mul_(group["momentum"]).add_(grad)
        direction = _orthogonalized(p, grad.add(buf, alpha=group["momentum"]), count)
        n, m = _matrix_shape(p, count)
        param.mul_(1.0 - group["lr"] * group["weight_decay"])
        param.add_(direction.to(param.dtype), alpha=-group["lr"] * group["update_rms"] * math.sqrt(max(n, m)))


def _orthogonalized(p: torch.Tensor, local: torch.Tensor, count: int) -> torch.Tensor:
    """``hybrid_newton_schulz`` of this rank's part ``local`` of the update of ``p``, returned as this rank's
    part (bf16 tensor-core GEMMs on GPUs, fp32 elsewhere)."""
    dtype = torch.bfloat16 if local.is_cuda else torch.float32
    if p.ndim == 3 or not isinstance(p, DTensor):  # whole matrices here: stacked experts, or a weight kept whole
        return hybrid_newton_schulz(local.to(dtype).reshape(-1, *_matrix_shape(p, count))).view_as(local)
    if any(not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)) for pl in p.placements):
        raise ValueError(f"Muon: only dim-0 (FSDP) sharding is supported, not {p.placements}")
    full = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()
    full = hybrid_newton_schulz(full.to(dtype).view(count, -1, full.shape[-1])).view(full.shape)
    rows, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[offset[0]:offset[0] + rows[0]]


def _matrix_shape(p: torch.Tensor, count: int) -> tuple[int, int]:
    return (p.shape[-2], p.shape[-1]) if p.ndim == 3 else (p.shape[0] // count, p.shape[-1])
