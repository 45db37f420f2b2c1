"""Where a training step's time goes, by model component, from one torch profiler trace of the real step.

Forward work is labelled by profiler ranges (``component::<name>``) that hooks open around chosen modules and
calls. Backward work runs outside any range, in autograd nodes; each belongs to the component whose forward op
built it: the profiler records the same sequence number on the forward op and on the node's
``autograd::engine::evaluate_function`` (custom ``autograd.Function``\\s, compiled functions and
``torch.library`` ops included). Every op's self time (its kernels' time on a GPU, its CPU time otherwise) is
counted once, in the innermost range or backward node around it; what none claims is ``other``. Activation
checkpointing's recompute runs inside the module's hooks again, so it counts to the module's component.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping

import torch
from torch import nn

RANGE_PREFIX = "component::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
OTHER = "other"


@contextmanager
def around_components(modules: Mapping[nn.Module, str], functions: Mapping[tuple[object, str], str],
                      enter: Callable[[str], None], leave: Callable[[], None]) -> Iterator[None]:
    """Within: ``enter(label)`` before and ``leave()`` after each module's forward, and each call of a
    function ``getattr(owner, name)`` for the keys ``(owner, name)`` of ``functions``. (A function is replaced
    on its owner, a module or a class, for the time being: name the owner its callers look it up in.)"""
    def before(_module, _args, label: str) -> None:
        enter(label)

    def after(*_) -> None:  # returns None: a forward hook's return value replaces the module's output
        leave()
    with ExitStack() as stack:
        for module, label in modules.items():
            stack.callback(module.register_forward_pre_hook(functools.partial(before, label=label)).remove)
            stack.callback(module.register_forward_hook(after, always_call=True).remove)
        for (owner, name), label in functions.items():
            original = inspect.getattr_static(owner, name)
            static = isinstance(original, staticmethod)
            wrapped = _around(original.__func__ if static else original, label, enter, leave)
            setattr(owner, name, staticmethod(wrapped) if static else wrapped)
            stack.callback(setattr, owner, name, original)
        yield


def _around(fn: Callable, label: str, enter: Callable[[str], None], leave: Callable[[], None]) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        enter(label)
        try:
            return fn(*args, **kwargs)
        finally:
            leave()
    return call


def labelled(modules: Mapping[nn.Module, str],
             functions: Mapping[tuple[object, str], str] | None = None) -> ContextManager[None]:
    """Within: the modules' forwards and the functions' calls (as :func:`around_components` takes them) run
    inside ``component::<label>`` profiler ranges."""
    # ranges nest: a labelled call inside another (or a module recomputed inside a backward node) closes first
    open_ranges: list[Any] = []

    def enter(label: str) -> None:
        open_ranges.append(torch.profiler.record_function(RANGE_PREFIX + label).__enter__())

    def leave() -> None:
        open_ranges.pop().__exit__(None, None, None)
    return around_components(modules, functions or {}, enter, leave)


def time_by_component(events: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Seconds of self time per component and phase, ``{label: {"forward": s, "backward": s}}``, from a
    profile's ``events()`` taken while :func:`labelled` was active: device (kernel) time when the profile
    recorded a GPU, CPU time otherwise."""
    ops = attribute(events)
    on_device = any(event.kernels for event, _, _ in ops)
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for event, label, phase in ops:
        self_us = _self_device_us(event) if on_device else event.self_cpu_time_total
        if self_us:
            seconds[label][phase] += self_us / 1e6
    return dict(seconds)


def attribute(events: Iterable[Any]) -> list[tuple[Any, str, str]]:
    """Every host-side op of a profile with its component and phase (``forward`` or ``backward``)."""
    # each op's innermost range or backward node, and the backward node it runs in (one walk up each)
    placed = [(e, _owner(e), _backward_node(e)) for e in events
              if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]
    # which component each forward op's autograd node belongs to, by (forward thread, sequence number)
    node_label: dict[tuple[int, int], str] = {}
    for event, owner, node in placed:
        if event.sequence_nr >= 0 and owner is not None and _is_range(owner) and node is None:
            node_label.setdefault((event.thread, event.sequence_nr), owner.name[len(RANGE_PREFIX):])
    ops = []
    for event, owner, node in placed:
        if owner is None:
            label = OTHER
        elif _is_range(owner):
            label = owner.name[len(RANGE_PREFIX):]
        else:  # a backward node: the component of the forward op that built it
            label = node_label.get((owner.fwd_thread, owner.sequence_nr), OTHER)
        ops.append((event, label, "forward" if node is None else "backward"))
    return ops


def _is_range(event) -> bool:
    return event.name.startswith(RANGE_PREFIX)


def _owner(event):
    """The innermost labelled range or backward node around the event (itself included), or None."""
    while event is not None and not (_is_range(event) or event.name.startswith(BACKWARD_PREFIX)):
        event = event.cpu_parent
    return event


def _backward_node(event):
    """The backward node the event runs in (recomputed forward ops too), or None."""
    while event is not None and not event.name.startswith(BACKWARD_PREFIX):
        event = event.cpu_parent
    return event


def _self_device_us(event) -> float:
    """The kernels this op launched itself (a range's GPU annotation, which spans its ops' kernels, left
    out)."""
    return sum(k.duration for k in event.kernels if not (event.is_user_annotation and k.name == event.name))
