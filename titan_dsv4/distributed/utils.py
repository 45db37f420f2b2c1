"""Process-group setup, teardown and cross-group reductions the trainer needs."""

from __future__ import annotations

import importlib
import math
import os
from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout_s: float | None = None) -> None:
    """gloo on CPU, nccl on CUDA; nothing for a plain single process. ``timeout_s``: see
    :func:`set_collective_timeout` (None: the backend's default)."""
    if dist.is_initialized() or "RANK" not in os.environ:
        return
    # Importing dynamo (functional collectives do it lazily on first use) takes ~10 references to every
    # process group that exists by then, so destroy_process_group could not free them and their gloo
    # threads ran on into interpreter exit (where a test rank once aborted). Imported first, it never sees
    # the groups.
    importlib.import_module("torch._dynamo")

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                            timeout=None if timeout_s is None else timedelta(seconds=timeout_s))


def set_collective_timeout(seconds: float, keep: Collection[dist.ProcessGroup | None] = ()) -> None:
    """How long a collective of any process group of this rank (but ``keep``) waits for the others before it
    fails the job (NCCL's watchdog aborts the process, gloo raises). Groups made after init_process_group
    (device meshes, pipeline ties) start with the backend's default (NCCL 10 min, gloo 30 min), so this
    sets them all. torch has no public setter (torch 2.13: ``_set_pg_timeout`` over ``_world.pg_map``)."""
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        if group not in keep:
            distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # without it gloo teardown sometimes aborts a rank still in flight
        dist.destroy_process_group()
        release_dtensor_caches()


def release_dtensor_caches() -> None:
    """Drop torch's DTensor caches that hold device meshes, and through them their process groups (the
    redistribute planner cache is keyed by a weak reference to the mesh, but its planner holds the mesh), so
    destroyed groups are freed and their gloo threads do not run on into interpreter exit. Private torch
    caches (torch 2.13): one a later torch lacks has nothing to drop."""
    from torch.distributed.tensor import _collective_utils, _redistribute

    for root, path in ((_redistribute, "clear_redistribute_planner_cache"),
                       (_redistribute, "_gen_transform_infos.cache_clear"),
                       (_collective_utils, "MeshTopoInfo.build_from_mesh.cache_clear"),
                       (torch._C, "_clear_DTensor_sharding_propagator_cache")):
        for name in path.split("."):
            root = getattr(root, name, None)
        if root is not None:
            root()


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
    """Global L2 gradient norm, then clip if ``max_norm > 0``.

    Every parameter is counted exactly once: a DTensor gradient's local squares are summed over the mesh
    dims it is sharded on (FSDP shards, expert-parallel experts; replicated dims are not summed), pipeline
    stages over ``pp_group``. One reduction per distinct sharding, not per parameter. Each parameter must
    appear on exactly one pipeline rank (replicas are excluded by the caller).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    by_sharding: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        if isinstance(g, DTensor):
            sharded = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            by_sharding[(g.device_mesh, sharded)].append(g.to_local())
    device = grads[0].device if grads else torch.device("cpu")
    total = _sum_of_squares(plain, device)
    for (mesh, sharded_dims), locals_ in by_sharding.items():
        squares = _sum_of_squares(locals_, device)
        for dim in sharded_dims:
            squares = all_reduce_sum(squares, mesh.get_group(dim))
        total = total + squares
    if pp_group is not None:
        total = all_reduce_sum(total.to(_comm_device(pp_group)), pp_group).to(device)
    norm = total.sqrt()
    if max_norm > 0 and math.isfinite(norm.item()):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        local = [local_shard(g) for g in grads]
        for dtype in {g.dtype for g in local}:
            torch._foreach_mul_([g for g in local if g.dtype == dtype], coef.to(dtype))
    return norm.float().cpu()


@torch.no_grad()
def reduce_replicated_grads(parameters: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum over ``group`` the gradients of the parameters every data-parallel rank keeps whole (plain
    tensors beside FSDP's DTensors: the model's fp32-kept ones), in one flat all-reduce."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = all_reduce_sum(flat.to(_comm_device(group)), group)
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat.to(grads[0].device), grads)):
            g.copy_(reduced)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp64 sum of squares of the tensors' elements (one fused norm per dtype)."""
    out = torch.zeros((), dtype=torch.float64, device=device)
    for dtype in {t.dtype for t in tensors}:
        norms = torch._foreach_norm([t for t in tensors if t.dtype == dtype], 2.0)
        out = out + torch.stack(norms).double().square().sum()
    return out


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
