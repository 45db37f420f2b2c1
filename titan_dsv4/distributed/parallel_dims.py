"""Parallel degrees, their validation (before any process group exists) and the device mesh.

Mesh dims, outermost first (torchtitan names): ``pp``, ``dp_replicate``, ``dp_shard_mod_ep``,
``dp_shard_in_ep``. Expert parallelism borrows its ranks from the FSDP dimension: ``dp_shard`` =
``dp_shard_mod_ep`` x ``dp_shard_in_ep`` (= ``ep``). Data-parallel ranks (``dp`` = replicate x shard) each get
their own slice of the global batch; routed experts are sharded by expert over ``ep`` and FSDP-sharded over
what is left (``dp_replicate`` x ``dp_shard_mod_ep``), every other parameter over the whole ``dp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.manager import ConfigError


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    pp: int
    ep: int
    world_size: int
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`parallelism.{self._key(name)}` = {getattr(self, name)} is invalid: must be >= 1")
        if self.dp_shard == -1:
            rest = self.dp_replicate * self.pp
            if self.world_size % rest:
                raise ConfigError(
                    f"{self.world_size} processes were launched, not divisible by data_parallel_replicate_degree "
                    f"x pipeline_parallel_degree = {rest}")
            self.dp_shard = self.world_size // rest
        if self.dp_shard < 1:
            raise ConfigError(f"`parallelism.data_parallel_shard_degree` = {self.dp_shard} is invalid: "
                              "must be >= 1 or -1")
        product = self.dp_replicate * self.dp_shard * self.pp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees do not match the world size: data_parallel_replicate_degree "
                f"({self.dp_replicate}) x data_parallel_shard_degree ({self.dp_shard}) x pipeline_parallel_degree "
                f"({self.pp}) = {product}, but {self.world_size} processes were launched")
        if self.dp_shard % self.ep:
            raise ConfigError(
                f"`parallelism.expert_parallel_degree` = {self.ep} must divide data_parallel_shard_degree "
                f"({self.dp_shard}): expert parallelism borrows its ranks from the FSDP dimension")

    @staticmethod
    def _key(name: str) -> str:
        return {"dp_replicate": "data_parallel_replicate_degree", "pp": "pipeline_parallel_degree",
                "ep": "expert_parallel_degree"}[name]

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        if self.ep_enabled:
            self._mesh = init_device_mesh(
                device_type, (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep),
                mesh_dim_names=("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"))
            self._dp_shard_mesh = self._mesh[("dp_shard_mod_ep", "dp_shard_in_ep")]._flatten("dp_shard")
            self._dp_mesh = self._mesh[("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep")]._flatten("dp")
        else:
            self._mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard),
                                          mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
            self._dp_shard_mesh = self._mesh["dp_shard"]
            self._dp_mesh = self._mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        return self._mesh

    def fsdp_mesh(self) -> DeviceMesh:
        """Where non-expert parameters are sharded (2-D, replicate x shard, for HSDP)."""
        return self.mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else self._dp_shard_mesh

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """Where expert-parallel weights are FSDP-sharded: the data-parallel ranks ``ep`` did not take."""
        if self.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard_mod_ep"]
        return self.mesh["dp_shard_mod_ep"]

    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["dp_shard_in_ep"]

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("build_mesh() first")
        return self._mesh

    def dp_rank(self) -> int:
        return self._dp_mesh.get_local_rank() if self._mesh is not None else 0

    def dp_group(self) -> torch.distributed.ProcessGroup:
        return self._dp_mesh.get_group()
