"""Roofline estimate of the GPU benchmark step (``bench_gpu.py``'s model), op by op, without a GPU.

The model runs forward + loss + backward on the ``meta`` device through the GPU code paths (bf16-part
GEMMs, grouped expert GEMMs, the fused attention and indexer kernels when Triton is installed,
query-blocked attention otherwise), and every aten op it dispatches is costed as one eager kernel:
``max(GEMM FLOPs / GEMM rate, bytes moved / bandwidth, kernel floor)``; the Triton attention and indexer
kernels at an assumed share of the GEMM rate, the attention's with its atomic traffic. Bytes are the distinct
elements each op reads and writes; views are free. Each op is charged to the component whose code issued
it (backward ops to the component whose forward built their autograd node).

It also gives a fusion bound: the step if every non-GEMM op of a block's forward (or backward) were fused,
so that only GEMM/sort operands, parameters, gradients and tensors crossing into backward or the next block
(saved, or recomputed from their op's inputs if that moves less) touch memory.

This is a model, not a measurement: it ignores caching and overlap, and the eager figure costs the
functions CUDA compiles anyway (mHC's, the head's chunk functions) as eager, an upper bound. What it is for:
where the bytes and kernels of a step are, before a GPU is at hand, and which changes remove them. Its
figures go beside, never instead of, ``bench_gpu.py``'s.

    python scripts/estimate_gpu_time.py [--seq 4096] [--batch 2] [--mtp 1] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402  (the benchmark's model and batch)

from titan_dsv4.components.loss import MTPLoss  # noqa: E402
from titan_dsv4.components.metrics import PEAK_BF16_TFLOPS  # noqa: E402
from titan_dsv4.components.time_by_component import around_components  # noqa: E402
from titan_dsv4.models.deepseek_v4.gpu_paths import meta_as_gpu  # noqa: E402
from titan_dsv4.models.deepseek_v4.moe import RoutedExperts  # noqa: E402

GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm"}
FUSED_ATTENTION = {"fused_attention": 2, "fused_attention_backward": 5}  # GEMMs per (row, key) of the kernel
# assumed share of the GEMM rate the Triton attention kernel reaches (mma.sync tiles of 32 heads, no wgmma
# pipelining); bench_gpu.py measures it
FUSED_ATTENTION_EFFICIENCY = 0.4
# kernels torch.compile leaves to libraries or our own kernels: never fused with their neighbours
EXTERN = GEMMS | {"sort", "topk", "sinkhorn", "sinkhorn_backward", "index_scores"} | set(FUSED_ATTENTION)
# ops that read only the indexed part of their first input (a gather) or write only part of it (a scatter)
PARTIAL_FIRST_INPUT = {"index", "gather", "index_select", "embedding", "index_add", "index_add_", "scatter_add_",
                       "scatter_add", "index_put_", "_index_put_impl_", "scatter_", "scatter"}
DATASHEET_TFLOPS = PEAK_BF16_TFLOPS["H200"]  # dense bf16, bench_gpu.py's MFU denominator
COMPONENTS = ("attention", "moe", "mhc", "head_loss", "other")


@dataclass
class Cost:
    seconds: float = 0.0
    kernels: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    gemm_bound: float = 0.0  # seconds of kernels limited by GEMM rate
    floor_bound: float = 0.0  # seconds of kernels at the per-kernel floor

    def add(self, other: "Cost") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Roofline:
    gemm_flops: float  # bf16 tensor-core FLOP/s
    fp32_gemm_flops: float  # fp32 (SIMT) FLOP/s
    bandwidth: float  # bytes/s
    floor: float  # seconds: the least a kernel costs (launch and eager dispatch)

    def cost(self, flops: float, nbytes: float, fp32_gemm: bool) -> Cost:
        rate = self.fp32_gemm_flops if fp32_gemm else self.gemm_flops
        gemm, memory = flops / rate, nbytes / self.bandwidth
        seconds = max(gemm, memory, self.floor)
        return Cost(seconds=seconds, kernels=1, flops=flops, bytes=nbytes,
                    gemm_bound=seconds if gemm >= max(memory, self.floor) else 0.0,
                    floor_bound=seconds if self.floor > max(gemm, memory) else 0.0)


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view covers (an expanded axis is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def fused_attention_cost(name: str, args) -> tuple[float, int]:
    """FLOPs and atomic fp32 bytes of the fused attention kernel: every (query, head) row against its window
    and its listed entries (unused slots counted: an upper bound), each key tile's gradient added atomically
    per program in backward; while the indexer trains the forward scores the entries once more."""
    from titan_dsv4.models.deepseek_v4 import attention_kernel

    if name == "fused_attention":  # (q, kv, entries, entry_index, doc_ids, sink, window, entry_mass)
        q, entry_index, window, entry_mass = args[0], args[3], args[6], args[7]
    else:  # (grad_out, q, kv, entries, entry_index, doc_ids, out, lse, window)
        q, entry_index, window, entry_mass = args[1], args[4], args[8], False
    batch, seq, heads, dim = q.shape
    keys = min(window, seq) + entry_index.shape[-1]
    flops = 2.0 * FUSED_ATTENTION[name] * batch * seq * heads * keys * dim
    if name == "fused_attention":
        return flops + (2.0 * batch * seq * heads * entry_index.shape[-1] * dim if entry_mass else 0.0), 0
    programs = batch * seq * -(-heads // attention_kernel.launch_config(heads, dim, window, 0)["BLOCK_H"])
    return flops, programs * keys * dim * 4


def index_scores_flops(args) -> float:
    """The indexer kernel's score GEMM: every (query, head) against every entry (q, keys, ...)."""
    q, keys = args[0], args[1]
    batch, queries, heads, dim = q.shape
    return 2.0 * batch * queries * heads * keys.shape[1] * dim


def gemm_flops(name: str, args) -> float:
    """2 x M x N x K of a GEMM (its batch or groups included)."""
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    if name == "_grouped_mm" and a.dim() == 2 and b.dim() == 2:  # [K, M] x [M, N] -> [G, K, N]: weight grads
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    batch = a.shape[0] if a.dim() == 3 else 1  # bmm, or grouped [G, M, K] x [G, K, N]
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class _Forward:
    """Which component's code runs now, and in which block (module hooks)."""

    def __init__(self) -> None:
        self.stack: list[str] = ["other"]
        self.block = "outside blocks"

    @property
    def place(self) -> tuple[str, str]:
        return self.stack[-1], self.block


class _TagNodes(TorchFunctionMode):
    """Tags every autograd node built in the forward with the component and block whose code built it."""

    def __init__(self, forward: _Forward):
        super().__init__()
        self.forward = forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # inputs first: custom Functions' outputs reach here untagged (``apply`` is no torch function)
        pending = [t.grad_fn for t in tree_flatten((args, kwargs, out))[0]
                   if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while pending:  # every node this call built (a composite op builds several), back to tagged ones
            node = pending.pop()
            if node is None or "place" in node.metadata:
                continue
            node.metadata["place"] = self.forward.place
            pending += [next_node for next_node, _ in node.next_functions]
        return out


@dataclass
class _Tensor:
    """A tensor some op wrote (or a parameter / input): who made it, where, who read it."""

    nbytes: int
    component: str
    region: tuple  # (phase, block): a compiled graph's reach
    made_by_extern: bool  # a GEMM or sort (not fusable), or no op at all (parameters, inputs)
    site: tuple  # (component, phase, op, where) that made it
    inputs_nbytes: int = 0  # what its op read: re-reading that recomputes it (fusable ops only)
    extern_reads: int = 0
    fused_reads: set = field(default_factory=set)  # regions whose fusable ops read it

    def bytes_moved(self) -> int:
        """Bytes this tensor costs when every fusable op of a region is one kernel: 0 if it never leaves
        registers (made and read only by fusable ops of one region), else written once and read once per
        GEMM / sort and once per other region's fused kernel."""
        reads = self.fused_reads
        other_regions = len(reads - {self.region})
        if not (self.made_by_extern or self.extern_reads) and reads:
            # fusable and read only by fused kernels: free in its own region; another region (backward,
            # the next block) gets it saved, or recomputes it from its op's inputs (compile's partitioner
            # recomputes cheap element-wise ops), whichever moves fewer bytes
            return min(self.nbytes * (1 + other_regions), self.inputs_nbytes * other_regions)
        written = 0 if self.region[0] == "input" else 1
        return self.nbytes * (written + self.extern_reads + len(reads))


class CostModel(TorchDispatchMode):
    """Costs every dispatched aten op as one kernel (eager), by component and by issuing site; and records
    which tensors a fully fused step would still move (the fusion bound)."""

    def __init__(self, roofline: Roofline, forward: _Forward):
        super().__init__()
        self.roofline, self.forward = roofline, forward
        self.by_component = {c: Cost() for c in COMPONENTS}
        self.sites: dict[tuple, Cost] = collections.defaultdict(Cost)
        self.extern = {c: Cost() for c in COMPONENTS}  # GEMMs and sorts: their FLOPs at the GEMM rate
        self.live: dict[int, _Tensor] = {}  # by storage
        self.done: list[_Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        in_storages = {_storage(t) for t in inputs}
        mutates = func._schema.is_mutable
        if func.is_view or name in ("detach", "lift_fresh", "alias") or (
                not mutates and outputs and all(_storage(t) in in_storages for t in outputs)):
            return out  # a view (``_unsafe_view`` too): no kernel
        written = sum(distinct_bytes(t) for t in outputs)
        read = [distinct_bytes(t) for t in inputs]
        if name in PARTIAL_FIRST_INPUT and read:
            read[0] = min(read[0], written or read[0])
            if mutates:  # a scatter writes only its source's rows, not the whole output
                written = min(written, max(read[1:], default=written))
        flops = gemm_flops(name, args) if name in GEMMS else 0.0
        fp32_gemm = name in GEMMS and inputs[0].dtype == torch.float32 and name != "_scaled_mm"
        timed_flops = flops  # at the GEMM rate
        if name in FUSED_ATTENTION:
            flops, atomic_bytes = fused_attention_cost(name, args)
            written += atomic_bytes
            timed_flops = flops / FUSED_ATTENTION_EFFICIENCY
        elif name == "index_scores":  # a Triton kernel like the attention's, at the same assumed rate
            flops = index_scores_flops(args)
            timed_flops = flops / FUSED_ATTENTION_EFFICIENCY
        cost = self.roofline.cost(timed_flops, written + sum(read), fp32_gemm)
        cost.flops = flops
        node = torch._C._current_autograd_node()
        phase = "forward" if node is None else "backward"
        component, block = self.forward.place if node is None else node.metadata.get("place", ("other", "?"))
        where = _model_frame() if node is None else node.name()
        self.by_component[component].add(cost)
        self.sites[(component, phase, name, where)].add(cost)

        extern = name in EXTERN
        if extern:
            self.extern[component].add(self.roofline.cost(timed_flops, 0, fp32_gemm))
        region = (phase, block)
        for t in inputs:
            record = self.live.get(_storage(t))
            if record is None:  # a parameter or input: in memory already
                record = self.live[_storage(t)] = _Tensor(distinct_bytes(t), component, ("input", block), True,
                                                          (component, "input", "-", "parameters and inputs"))
            if extern:
                record.extern_reads += 1
            else:
                record.fused_reads.add(region)
        for t in outputs:
            old = self.live.pop(_storage(t), None)
            if old is not None:
                self.done.append(old)
            self.live[_storage(t)] = _Tensor(distinct_bytes(t), component, region, extern,
                                             (component, phase, name, where), sum(read))
        return out

    def total(self) -> Cost:
        """The eager step: every component's kernels summed."""
        total = Cost()
        for cost in self.by_component.values():
            total.add(cost)
        return total

    def fusion_bound(self) -> tuple[dict[str, float], dict[tuple, float]]:
        """Seconds per component if every fusable op of a region ran fused: GEMM/sort FLOPs at the GEMM rate
        plus the bytes of the tensors that must be in memory, at the bandwidth; and those bytes by the site
        that made the tensor."""
        seconds = {c: self.extern[c].seconds for c in COMPONENTS}
        by_site: dict[tuple, float] = collections.defaultdict(float)
        for record in self.done + list(self.live.values()):
            seconds[record.component] += record.bytes_moved() / self.roofline.bandwidth
            by_site[record.site] += record.bytes_moved()
        return seconds, by_site


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _model_frame() -> str:
    """``file:line function`` of the innermost frame in the package's model code."""
    for frame in reversed(traceback.extract_stack(limit=40)):
        if "titan_dsv4" in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


@contextlib.contextmanager
def component_hooks(model: torch.nn.Module, forward: _Forward):
    """Tracks the running component (``bench_gpu.component_labels``: module hooks, and wrappers for the
    component code that is not a module call) and the running block."""
    handles = []
    for fqn, module in model.named_modules():
        if fqn.count(".") == 1 and fqn.split(".")[0] in ("layers", "mtp"):  # a block: a compiled graph
            handles.append(module.register_forward_pre_hook(lambda m, a, b=fqn: setattr(forward, "block", b)))
            handles.append(module.register_forward_hook(lambda *_: setattr(forward, "block", "outside blocks")))
    try:
        with around_components(*bench_gpu.component_labels(model), enter=forward.stack.append,
                               leave=forward.stack.pop):
            yield
    finally:
        for h in handles:
            h.remove()


def estimate(seq: int, batch: int, mtp: int, roofline: Roofline, expert_qat: str = "none") -> tuple[CostModel, float]:
    device = torch.device("meta")
    model = bench_gpu.build(mtp, device)
    model.set_expert_qat(expert_qat)
    args = model.args
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    targets = torch.zeros(batch, seq, 1 + args.num_mtp_layers, dtype=torch.long, device=device)
    forward = _Forward()
    costs = CostModel(roofline, forward)
    RoutedExperts.use_grouped_mm = True  # what CUDA runs (auto picks it for bf16 CUDA tensors only)
    try:
        with meta_as_gpu(), component_hooks(model, forward), _TagNodes(forward), costs:
            loss = MTPLoss()(model(ids, targets=targets), targets, 1.0)
            loss.backward()
    finally:
        RoutedExperts.use_grouped_mm = None
    return costs, bench_gpu.model_flops_per_token(args, seq) * seq * batch


def report(costs: CostModel, model_flops: float, top: int) -> str:
    total = costs.total()
    fused, kept_bytes = costs.fusion_bound()
    lines = [f"eager estimate {total.seconds:.3f} s per step ({total.kernels:,} kernels, {total.flops / 1e12:.1f} "
             f"TFLOP traced vs {model_flops / 1e12:.1f} model FLOPs, {total.bytes / 1e9:.0f} GB moved); "
             f"fusion bound {sum(fused.values()):.3f} s",
             "",
             f"{'component':<11}{'eager s':>8}{'share':>7}{'GEMM-bound s':>14}{'floor-bound s':>15}{'kernels':>9}"
             f"{'TFLOP':>8}{'GB':>7}{'fusion bound s':>16}"]
    for name, c in costs.by_component.items():
        lines.append(f"{name:<11}{c.seconds:8.3f}{c.seconds / total.seconds:7.0%}{c.gemm_bound:14.3f}"
                     f"{c.floor_bound:15.3f}{c.kernels:9,}{c.flops / 1e12:8.2f}{c.bytes / 1e9:7.1f}"
                     f"{fused[name]:16.3f}")
    lines += ["", f"top {top} eager sites (component, phase, op, where: forward source line or backward node)"]
    ranked = sorted(costs.sites.items(), key=lambda kv: -kv[1].seconds)[:top]
    for (component, phase, op, where), c in ranked:
        lines.append(f"{c.seconds * 1e3:8.2f} ms {c.kernels:6,}x {c.bytes / 1e9:7.2f} GB {c.flops / 1e12:6.2f} TF"
                     f"  {component:<9} {phase:<8} {op:<22} {where}")
    lines += ["", f"top {top} tensors the fusion bound still moves, by the site that made them"]
    for (component, phase, op, where), nbytes in sorted(kept_bytes.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{nbytes / 1e9:8.2f} GB  {component:<9} {phase:<8} {op:<22} {where}")
    lines.append("")
    for label, seconds in (("eager", total.seconds), ("fusion bound", sum(fused.values()))):
        lines.append(f"MFU at the {label} estimate: {model_flops / seconds / 1e12 / DATASHEET_TFLOPS:.1%} of "
                     f"{DATASHEET_TFLOPS:.0f} TFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mtp", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gemm-tflops", type=float, default=700.0, help="bf16 GEMM rate (H200: ~700-790)")
    parser.add_argument("--fp32-gemm-tflops", type=float, default=50.0)
    parser.add_argument("--bandwidth-tbs", type=float, default=4.0, help="attainable HBM bandwidth (H200 peak 4.8)")
    parser.add_argument("--kernel-floor-us", type=float, default=4.0)
    parser.add_argument("--expert-qat", default="none", choices=["none", "fp4", "fp8"],
                        help="the routed experts' quantisation-aware training ([model] expert_qat)")
    opts = parser.parse_args(argv)
    roofline = Roofline(opts.gemm_tflops * 1e12, opts.fp32_gemm_tflops * 1e12, opts.bandwidth_tbs * 1e12,
                        opts.kernel_floor_us * 1e-6)
    costs, model_flops = estimate(opts.seq, opts.batch, opts.mtp, roofline, opts.expert_qat)
    print(report(costs, model_flops, opts.top))


if __name__ == "__main__":
    main()
