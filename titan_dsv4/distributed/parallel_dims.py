"""Parallel degrees, their validation (before any process group exists) and the device mesh.

Mesh dims, outermost first (torchtitan names): ``pp``, ``dp_replicate``, ``dp_shard_mod_ep``,
``dp_shard_in_ep``. Context parallelism (``cp``) splits every sequence into ``cp`` contiguous shards; for the
parameters its ranks are more FSDP ranks (they see other tokens, their gradients are summed), so FSDP shards
over ``dp_shard_cp`` = ``dp_shard`` x ``cp``, and expert parallelism borrows its ranks from that:
``dp_shard_cp`` = ``dp_shard_mod_ep`` x ``dp_shard_in_ep`` (= ``ep``). Data-parallel ranks (``dp`` = replicate x
shard) each get their own slice of the global batch, which their ``cp`` ranks share; routed experts are sharded
by expert over ``ep`` and FSDP-sharded over what is left (``dp_replicate`` x ``dp_shard_mod_ep``), every other
parameter over the whole ``dp`` x ``cp``. A second mesh ``pp, dp_replicate, dp_shard, cp`` (the same rank
order: the ``cp`` ranks of a sequence are neighbours) gives the batch and sequence groups.
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
    cp: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`parallelism.{self._key(name)}` = {getattr(self, name)} is invalid: must be >= 1")
        if self.dp_shard == -1:
            rest = self.dp_replicate * self.pp * self.cp
            if self.world_size % rest:
                raise ConfigError(
                    f"{self.world_size} processes were launched, not divisible by data_parallel_replicate_degree "
                    f"x pipeline_parallel_degree x context_parallel_degree = {rest}")
            self.dp_shard = self.world_size // rest
        if self.dp_shard < 1:
            raise ConfigError(f"`parallelism.data_parallel_shard_degree` = {self.dp_shard} is invalid: "
                              "must be >= 1 or -1")
        product = self.dp_replicate * self.dp_shard * self.pp * self.cp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees do not match the world size: data_parallel_replicate_degree "
                f"({self.dp_replicate}) x data_parallel_shard_degree ({self.dp_shard}) x pipeline_parallel_degree "
                f"({self.pp}) x context_parallel_degree ({self.cp}) = {product}, but {self.world_size} processes "
                "were launched")
        if self.dp_shard_cp % self.ep:
            raise ConfigError(
                f"`parallelism.expert_parallel_degree` = {self.ep} must divide data_parallel_shard_degree x "
                f"context_parallel_degree ({self.dp_shard_cp}): expert parallelism borrows its ranks from the FSDP "
                "dimension")

    @staticmethod
    def _key(name: str) -> str:
        return {"dp_replicate": "data_parallel_replicate_degree", "pp": "pipeline_parallel_degree",
                "ep": "expert_parallel_degree", "cp": "context_parallel_degree"}[name]

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many slices the global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_cp(self) -> int:
        return self.dp_shard * self.cp

    @property
    def dp_enabled(self) -> bool:
        """Parameters are data-parallel (FSDP): more than one rank holds each stage (data or context shards)."""
        return self.dp * self.cp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        if self.ep_enabled:
            self._mesh = init_device_mesh(
                device_type, (self.pp, self.dp_replicate, self.dp_shard_cp // self.ep, self.ep),
                mesh_dim_names=("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"))
            self._dp_shard_mesh = self._mesh[("dp_shard_mod_ep", "dp_shard_in_ep")]._flatten("dp_shard_cp")
            self._dp_cp_mesh = self._mesh[("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep")]._flatten("dp_cp")
        else:
            self._mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard_cp),
                                          mesh_dim_names=("pp", "dp_replicate", "dp_shard_cp"))
            self._dp_shard_mesh = self._mesh["dp_shard_cp"]
            self._dp_cp_mesh = self._mesh[("dp_replicate", "dp_shard_cp")]._flatten("dp_cp")
        self._dp_mesh = self._cp_mesh = None
        if self.cp_enabled:  # the same ranks in the same order, with the sequence shards as their own dim
            batch_mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp),
                                          mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp"))
            self._dp_mesh = batch_mesh[("dp_replicate", "dp_shard")]._flatten("dp")
            self._cp_mesh = batch_mesh["cp"]
        return self._mesh

    def fsdp_mesh(self) -> DeviceMesh:
        """Where non-expert parameters are sharded (2-D, replicate x shard, for HSDP)."""
        return self.mesh["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else self._dp_shard_mesh

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
        """Which slice of the global batch this rank reads (its ``cp`` ranks read the same one)."""
        if self._mesh is None:
            return 0
        return (self._dp_mesh if self.cp_enabled else self._dp_cp_mesh).get_local_rank()

    def dp_cp_rank(self) -> int:
        return self._dp_cp_mesh.get_local_rank() if self._mesh is not None else 0

    def dp_cp_group(self) -> torch.distributed.ProcessGroup:
        """The ranks holding the same pipeline stage: their token counts, loads and gradients add up."""
        return self._dp_cp_mesh.get_group()

    def cp_group(self) -> torch.distributed.ProcessGroup:
        """The ranks sharing this rank's sequences, in sequence order."""
        return self._cp_mesh.get_group()
