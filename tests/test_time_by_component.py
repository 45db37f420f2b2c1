"""A step's time by component from the torch profiler (``components/time_by_component.py``, the GPU
benchmark's breakdown): a hand-made trace with known self times, real CPU profiles of a toy whose components
are heavy in forward or in backward only, and a DeepSeek-V4 step labelled as the benchmark labels it."""

import inspect
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from titan_dsv4.components.loss import build_targets
from titan_dsv4.components.time_by_component import BACKWARD_PREFIX, attribute, labelled, time_by_component
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4 import model as model_module
from titan_dsv4.models.deepseek_v4.hyper_connection import HyperConnection
from triton_model import bf16_model_with_triton_kernels

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import bench_gpu  # noqa: E402


@dataclass
class Kernel:
    name: str
    duration: float


@dataclass
class Event:
    """The fields of ``torch.autograd.profiler_util.FunctionEvent`` the attribution reads (times in us)."""
    name: str
    cpu_parent: "Event | None" = None
    sequence_nr: int = -1
    thread: int = 1
    fwd_thread: int = 0
    self_cpu_time_total: float = 0.0
    kernels: list = field(default_factory=list)
    is_user_annotation: bool = False
    device_type: torch.autograd.DeviceType = torch.autograd.DeviceType.CPU
    is_async: bool = False


def _node(name: str, seq: int, **kw) -> Event:
    """A backward node built on thread 1 and run on thread 3 (as CUDA's autograd device thread runs it)."""
    return Event(BACKWARD_PREFIX + name, sequence_nr=seq, thread=3, fwd_thread=1, **kw)


def test_hand_made_trace_each_self_time_once_backward_by_sequence_number():
    attn = Event("component::attention", self_cpu_time_total=10, is_user_annotation=True)
    moe_other_thread = Event("component::moe", thread=2, is_user_annotation=True)
    mm_backward = _node("MmBackward0", 5, self_cpu_time_total=3)
    recompute = _node("CheckpointBackward", 9, self_cpu_time_total=1)
    recomputed_moe = Event("component::moe", cpu_parent=recompute, self_cpu_time_total=4, is_user_annotation=True)
    events = [
        attn, Event("aten::mm", attn, sequence_nr=5, self_cpu_time_total=100),
        moe_other_thread, Event("aten::mm", moe_other_thread, sequence_nr=5, thread=2, self_cpu_time_total=30),
        Event("aten::add", sequence_nr=6, self_cpu_time_total=7),  # outside every range: other
        mm_backward, Event("MmBackward0", mm_backward, sequence_nr=5, self_cpu_time_total=2),
        Event("aten::mm", mm_backward, self_cpu_time_total=200),
        _node("AddBackward0", 6, self_cpu_time_total=1),  # its forward op was in no range: other
        recompute, recomputed_moe, Event("aten::mm", recomputed_moe, sequence_nr=10, self_cpu_time_total=50),
        Event("a kernel", device_type=torch.autograd.DeviceType.CUDA, self_cpu_time_total=1e6),  # not a CPU op
    ]
    seconds = {label: {phase: round(s * 1e6, 6) for phase, s in phases.items()}
               for label, phases in time_by_component(events).items()}
    assert seconds == {"attention": {"forward": 110, "backward": 205}, "moe": {"forward": 30, "backward": 54},
                       "other": {"forward": 7, "backward": 2}}


def test_hand_made_trace_on_a_gpu_counts_kernels_not_the_ranges_annotation():
    mhc = Event("component::mhc", self_cpu_time_total=5, is_user_annotation=True,
                kernels=[Kernel("component::mhc", 500)])  # the range's GPU annotation spans its ops' kernels
    mul = Event("aten::mul", mhc, sequence_nr=3, self_cpu_time_total=9, kernels=[Kernel("mul", 40)])
    node = _node("MulBackward0", 3, self_cpu_time_total=8)
    events = [mhc, mul, node, Event("aten::mul", node, kernels=[Kernel("mul", 60), Kernel("memset", 5)]),
              Event("aten::empty", self_cpu_time_total=1000)]  # no kernel: no GPU time
    seconds = time_by_component(events)
    assert {k: round(v * 1e6, 6) for k, v in seconds["mhc"].items()} == {"forward": 40, "backward": 65}
    assert set(seconds) == {"mhc"}


class _HeavyInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        for _ in range(20):
            grad = grad @ w
        return grad, None


class _HeavyInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)  # unpacked in backward: checkpointing recomputes the forward there
        for _ in range(20):
            x = x @ w
        return x

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors
        return grad, None


class _Apply(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("w", torch.eye(256) * 0.5)

    def forward(self, x):
        return self.fn.apply(x, self.w)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_profiled_backward_counts_to_the_component_whose_forward_built_it(checkpointed):
    """Each matrix product of a real CPU profile lands where it ran: the 20 of a component heavy only in
    backward (a custom autograd function) in its backward, the 20 of one heavy only in forward in its forward
    (and, under activation checkpointing, their recompute in its backward), a Linear's in its forward and
    autograd's own backward node; every op's self time counted once."""
    backward_heavy, forward_heavy = _Apply(_HeavyInBackward), _Apply(_HeavyInForward)
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)
    with labelled({backward_heavy: "a", forward_heavy: "b", linear: "c"}):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = backward_heavy(x)
            y = checkpoint(forward_heavy, y, use_reentrant=False) if checkpointed else forward_heavy(y)
            linear(y).square().sum().backward()
    products = Counter((event.name, label, phase) for event, label, phase in attribute(prof.events())
                       if event.name in ("aten::mm", "aten::addmm"))
    expected = {("aten::mm", "a", "backward"): 20, ("aten::mm", "b", "forward"): 20,
                ("aten::addmm", "c", "forward"): 1, ("aten::mm", "c", "backward"): 2}
    if checkpointed:
        expected[("aten::mm", "b", "backward")] = 20
    assert products == expected
    seconds = time_by_component(prof.events())
    total = sum(e.self_cpu_time_total for e in prof.events()) / 1e6
    assert sum(sum(phases.values()) for phases in seconds.values()) == pytest.approx(total)


# the backward nodes of the model's custom autograd functions: the Sinkhorn, CSA's gathered-entry product and
# the fused head + cross-entropy on the torch paths; the Triton kernels' custom ops on the GPU paths
CUSTOM_NODES = {
    "torch": {("_SinkhornBackward", "mhc"), ("_GatheredEntryProductBackward", "attention"),
              ("_LinearCrossEntropyBackward", "head_loss")},
    "triton": {("GeneratedBackwardFor_titan_dsv4_sinkhorn_defaultBackward", "mhc"),
               ("GeneratedBackwardFor_titan_dsv4_fused_attention_defaultBackward", "attention"),
               ("_LinearCrossEntropyBackward", "head_loss")},
}


@pytest.mark.parametrize("paths", sorted(CUSTOM_NODES))
def test_deepseek_step_by_the_benchmarks_components(paths):
    """A DeepSeek-V4 training step (MTP, fused head + loss) labelled by ``bench_gpu.component_labels``, on the
    torch paths (the debug model) and with the Triton kernels (Triton's interpreter): every component has
    forward and backward time; every backward node of a custom autograd function or custom op is found;
    what is left over is parameter accumulation and the unlabelled modules' few nodes; the labels leave the
    model as they found it."""
    if paths == "triton":
        pytest.importorskip("triton")
        model, ids, targets = bf16_model_with_triton_kernels([4, 128])
    else:
        torch.manual_seed(0)
        args = FLAVORS["debugmodel"]
        model = DeepseekV4Model(args)
        bench_gpu.fast_init(model, model.args)
        model.set_mtp_loss_scale(0.3)
        ids = torch.randint(2, args.vocab_size, (2, 256))
        targets = build_targets(ids.roll(-1, 1), torch.arange(256).expand(2, 256), args.num_mtp_layers)
    head_loss = model_module.head_loss
    with labelled(*bench_gpu.component_labels(model)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            objective, _ = model(ids, targets=targets)
            objective.backward()
    seconds = time_by_component(prof.events())
    for component in ("attention", "moe", "mhc", "head_loss"):
        assert seconds[component]["forward"] > 0 and seconds[component]["backward"] > 0, (component, seconds)
    nodes = Counter((event.name.removeprefix(BACKWARD_PREFIX), label)
                    for event, label, _ in attribute(prof.events()) if event.name.startswith(BACKWARD_PREFIX))
    custom = {(name, label) for name, label in nodes if not re.search(r"Backward\d+$|AccumulateGrad", name)}
    assert custom == CUSTOM_NODES[paths]
    left_over = sum(n for (name, label), n in nodes.items() if label == "other" and "AccumulateGrad" not in name)
    assert left_over < 0.1 * sum(nodes.values()), nodes  # norms, embedding, MTP projections
    assert model_module.head_loss is head_loss
    assert isinstance(inspect.getattr_static(HyperConnection, "post"), staticmethod)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
