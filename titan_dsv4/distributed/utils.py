"""Process-group setup, teardown and cross-group reductions the trainer needs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> None:
    """gloo on CPU, nccl on CUDA; nothing for a plain single process."""
    if dist.is_initialized() or "RANK" not in os.environ:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # without it gloo teardown sometimes aborts a rank still in flight
        dist.destroy_process_group()


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global L2 grad norm over every parameter (FSDP shards via DTensor, pipeline stages via ``pp_group``),
    then clip if ``max_norm > 0``. Each parameter must appear on exactly one pipeline rank (replicas are
    excluded by the caller)."""
    params = [p for p in parameters if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for p in params:
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares = squares + norm.double().cpu() ** 2
    if pp_group is not None:
        squares = all_reduce_sum(squares.to(_comm_device(pp_group)), pp_group).cpu()
    total = squares.sqrt().float()
    if max_norm > 0 and math.isfinite(total.item()):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype) if not isinstance(p.grad, DTensor)
                        else coef.item())
    return total


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
