"""Expert parallelism: routed experts sharded by expert over the ``ep`` mesh, token rows moved to the rank
holding their expert and back by all-to-all (counts first, then variable splits, both directions with
autograd). Installed from the outside as forward hooks around ``RoutedExperts``, whose own forward only
computes the experts it holds on rows grouped by expert.

Row order on the wire: a rank sends its rows grouped by global expert, i.e. already grouped by destination
rank; the receiver gets ``[source rank][local expert]`` blocks and regroups them ``[local expert][source]``
for the grouped GEMM, then undoes both steps on the way back. Rows travel in the activations' dtype both
ways (bf16 on GPUs): the experts' outputs are bf16 GEMM results, summed in fp32 only after the combine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor


def _all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    return all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, group)


class ExpertDispatch:
    """The pre/post forward hooks of one expert-parallel ``RoutedExperts``."""

    def __init__(self, group: dist.ProcessGroup, n_local: int):
        self.group, self.n_local = group, n_local
        self.ep = dist.get_world_size(group)
        self._pending: tuple[list[int], list[int], torch.Tensor] | None = None

    def dispatch(self, module: nn.Module, args: tuple) -> tuple:
        xs, ws, counts = args  # rows grouped by global expert, counts [E]
        with torch.no_grad():
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts, group=self.group)
            received = received.view(self.ep, self.n_local)  # [source rank, local expert]
            send = counts.view(self.ep, self.n_local).sum(1).tolist()
            recv = received.sum(1).tolist()
            block = torch.arange(self.ep * self.n_local, device=counts.device)
            block = block.repeat_interleave(received.flatten())
            expert_major = (block % self.n_local) * self.ep + block // self.n_local
            regroup = expert_major.argsort(stable=True)
        xs = _all_to_all(xs, recv, send, self.group)[regroup]
        ws = _all_to_all(ws, recv, send, self.group)[regroup]
        self._pending = (send, recv, regroup)
        return xs, ws, received.sum(0)

    def combine(self, module: nn.Module, args: tuple, rows: torch.Tensor) -> torch.Tensor:
        send, recv, regroup = self._pending
        self._pending = None
        back = torch.empty_like(rows).index_copy(0, regroup, rows)  # undo the regrouping
        return _all_to_all(back, send, recv, self.group)


def apply_expert_parallel(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard ``experts``' stacked weights by expert (``Shard(0)`` DTensors on ``ep_mesh``) and install the
    all-to-all dispatch/combine hooks."""
    n_experts = experts.w1.shape[0]
    ep = ep_mesh.size()
    if n_experts % ep:
        raise ValueError(f"{n_experts} routed experts cannot be split over expert_parallel_degree {ep}")
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    hooks = ExpertDispatch(ep_mesh.get_group(), n_experts // ep)
    experts.register_forward_pre_hook(hooks.dispatch)
    experts.register_forward_hook(hooks.combine)
