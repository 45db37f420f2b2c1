"""torchtitan-style model registry: a name maps to everything the generic trainer needs from a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class TrainSpec:
    name: str
    model_cls: type[nn.Module]
    model_args: dict[str, Any]  # flavor -> model args
    parallelize_fn: Callable[..., nn.Module]  # (model_part, parallel_dims, job_config) -> model_part
    pipelining_fn: Callable[..., Any]  # (meta model, plan, pp rank/group, mesh, device, loss_fn, ...) -> parts
    build_loss_fn: Callable[..., Any]  # (job_config, model_args) -> loss object
    state_dict_adapter: type | None = None


_REGISTRY: dict[str, TrainSpec] = {}


def register_train_spec(spec: TrainSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"train spec {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def get_train_spec(name: str) -> TrainSpec:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def list_train_specs() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def _ensure_builtin() -> None:
    # importing the package registers its spec
    import titan_dsv4.models.deepseek_v4.spec  # noqa: F401
