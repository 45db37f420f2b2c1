"""DCP training checkpoints: atomic, resumable, and independent of the parallel layout.

A checkpoint is ``{dump_folder}/{checkpoint.folder}/step-{N}/``: DCP files holding the model under its
FQNs (the same keys as the converter's model-only checkpoints; the MTP embedding replica is not stored, it
is refreshed from ``embed``), the optimizer state as ``optimizer.{fqn}.{key}`` (AdamW: ``exp_avg``,
``exp_avg_sq``, ``step``; Muon: ``momentum_buffer``), ``trainer_state.pt`` (step, data position, RNG;
the learning rate is the schedule's at the step) and the model's ``config.json`` (its shape, in the released
config's keys: ``python -m titan_dsv4.convert dcp-to-hf`` turns the folder into a Hugging Face checkpoint),
both written by rank 0. Sharded tensors are saved as DTensors with their global shapes, so any PP / FSDP / EP
layout can load any checkpoint.

Atomicity: everything is written into ``step-{N}.partial/`` and renamed to ``step-{N}`` by rank 0 only after
every rank's data, DCP's metadata and the trainer state are on disk. A save killed at any point (or failing
on a full disk) leaves a ``.partial`` folder, never picked for resume and removed by the next run; the
previous checkpoints are untouched until the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..models.deepseek_v4.init import canonical_fqn, copy_full_into, local_box
from ..models.deepseek_v4.lora import is_adapter
from ..models.deepseek_v4.moe import EXPERT_WEIGHTS, FP4_SCALE, STACKED_BY_EXPERT
from ..models.deepseek_v4.pipeline import replica_source
from .hf_checkpoint import CheckpointError, checkpoint_tensors
from .optimizer import empty_state
from .quantization import dequantize_fp4, quantize_fp4

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.json"
OPTIMIZER_PREFIX = "optimizer."


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns at every save and load in one process that it assumes one process: what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def complete_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint in ``folder`` (renamed from ``.partial`` and holding both parts)."""
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file() and (child / TRAINER_STATE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def model_state(model_parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Layout-independent model entries: canonical FQN -> the live tensor (a DTensor when sharded)."""
    return {canonical_fqn(k): v for part in model_parts for k, v in checkpoint_tensors(part).items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_files(path: Path, metadata) -> None:
    """Every tensor's bytes exist: a missing or truncated file is named with a tensor it holds."""
    sizes: dict[str, int] = {}
    for index, item in metadata.storage_data.items():
        file = path / item.relative_path
        if item.relative_path not in sizes:
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (it holds tensor {index.fqn!r})")
            sizes[item.relative_path] = file.stat().st_size
        if item.offset + item.length > sizes[item.relative_path]:
            raise CheckpointError(f"{file}: truncated at {sizes[item.relative_path]} bytes, tensor {index.fqn!r} "
                                  f"needs bytes {item.offset}..{item.offset + item.length}")


def check_compatible(path: Path, metadata, wanted: dict[str, torch.Tensor]) -> None:
    """Each wanted entry exists in the checkpoint with the same global shape."""
    stored = metadata.state_dict_metadata
    for key, tensor in wanted.items():
        if key not in stored:
            raise CheckpointError(f"{path}: checkpoint has no tensor {key!r} (written for another model or "
                                  "configuration?)")
        shape = getattr(stored[key], "size", None)
        if shape is not None and tuple(shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(shape)} in the checkpoint but the "
                                  f"model needs {list(tensor.shape)}")


def load_model_only(model_parts: list[nn.Module], path: str | Path) -> None:
    """Fill the model from a DCP checkpoint (a training checkpoint or the converter's model-only one). Routed
    experts stored the other way (``lora.expert_storage``: dense in the checkpoint, FP4 in the model, or the
    reverse) are re-encoded on the way in, each rank reading only its own experts' rows."""
    path = Path(path)
    metadata = _read_metadata(path)
    # LoRA adapters a checkpoint of the base model lacks keep their initial values (B = 0: the base model)
    state = {k: v for k, v in model_state(model_parts).items()
             if k in metadata.state_dict_metadata or not is_adapter(k)}
    stored = metadata.state_dict_metadata
    recoded = [k for k in state if k.endswith(EXPERT_WEIGHTS) and k in stored
               and (f"{k}{FP4_SCALE}" in state) != (f"{k}{FP4_SCALE}" in stored)]
    direct = {k: v for k, v in state.items() if k not in recoded and k.removesuffix(FP4_SCALE) not in recoded}
    _checked_metadata(path, direct, metadata)
    reader = StoredTensors(path, metadata) if recoded else None
    for name in recoded:
        _check_recoded_shape(reader, name, state)
    _load(direct, path)
    for name in recoded:
        _load_recoded(reader, name, state)


def _check_recoded_shape(reader: StoredTensors, name: str, state: dict[str, torch.Tensor]) -> None:
    fp4 = f"{name}{FP4_SCALE}" in state  # the model's storage; the checkpoint's is the other
    target = state[name]
    dense_shape = [*target.shape[:-1], target.shape[-1] * (2 if fp4 else 1)]  # FP4 packs two per byte
    stored = list(reader.specs[name].size)
    stored_shape = [*stored[:-1], stored[-1] * (1 if fp4 else 2)]
    if stored_shape != dense_shape:
        raise CheckpointError(f"{reader.path}: tensor {name!r} holds experts of shape {stored_shape} in the "
                              f"checkpoint but the model needs {dense_shape}")


def _load_recoded(reader: StoredTensors, name: str, state: dict[str, torch.Tensor]) -> None:
    """One stacked expert weight read in the checkpoint's storage and written in the model's: FP4 bytes and
    scales from dense values (rounded as an HF load rounds them), or dense values from FP4 (exact)."""
    target, scale = state[name], state.get(f"{name}{FP4_SCALE}")
    rows = local_box(target)[0]
    if scale is not None:
        value, scales = (t.view(torch.uint8) for t in quantize_fp4(reader.load(name, rows)))
        copy_full_into(scale, scales, rows_only=True)
    else:
        value = dequantize_fp4(reader.load(name, rows), reader.load(f"{name}{FP4_SCALE}", rows))
    copy_full_into(target, value, rows_only=True)


class _IntoRows(DefaultLoadPlanner):
    """Loads into tensors that hold a block of rows of the stored tensor (the read items say where)."""

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


class StoredTensors:
    """A DCP checkpoint's model tensors, each read whole or as a block of dim-0 rows (from only the stored
    chunks that hold them) by this process alone: no collectives, so ranks read what they need and a
    converter reads a layer's stacked experts (17 GB per matrix for Pro in bf16) a stored chunk at a time."""

    def __init__(self, path: str | Path, metadata=None):
        self.path = Path(path)
        self.storage = FileSystemReader(str(path))
        self.metadata = _read_metadata(self.path) if metadata is None else metadata  # once, not per tensor
        self.storage.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.specs = {k: v for k, v in self.metadata.state_dict_metadata.items()
                      if isinstance(v, TensorStorageMetadata) and not k.startswith(OPTIMIZER_PREFIX)}

    def load(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The stored tensor, or its ``rows`` of dim 0."""
        spec = self.specs[name]
        offsets, sizes = [0] * len(spec.size), list(spec.size)
        if rows is not None:
            offsets[0], sizes[0] = rows.start, rows.stop - rows.start
        tensor = torch.empty(sizes, dtype=spec.properties.dtype)
        planner = _IntoRows()
        planner.set_up_planner({name: tensor}, self.metadata, is_coordinator=True)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        plan = self.storage.prepare_local_plan(LoadPlan(create_read_items_for_chunk_list(name, spec, [chunk])))
        self.storage.read_data(self.storage.prepare_global_plan([plan])[0], planner).wait()
        return tensor

    def row_blocks(self, name: str) -> list[slice | None]:
        """Blocks of dim 0 no stored chunk straddles, for a tensor stacked by expert; else the whole (``None``)."""
        if not STACKED_BY_EXPERT.search(name):
            return [None]
        spec = self.specs[name]
        starts = sorted({chunk.offsets[0] for chunk in spec.chunks} | {spec.size[0]})
        return [slice(a, b) for a, b in zip(starts, starts[1:])]


def _read_metadata(path: Path):
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same user-facing problem
        raise CheckpointError(f"{path / '.metadata'}: unreadable DCP metadata ({type(e).__name__}: {e})") from None


def _checked_metadata(path: Path, model: dict[str, torch.Tensor], metadata=None):
    """The checkpoint's DCP metadata (read here unless given), once it is known to hold ``model``'s tensors with
    all their bytes."""
    metadata = _read_metadata(path) if metadata is None else metadata
    check_compatible(path, metadata, model)
    verify_files(path, metadata)
    return metadata


def _load(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures; keep the path in the message
        raise CheckpointError(f"{path}: loading failed: {e}") from None


class CheckpointManager:
    """Saves every ``interval`` steps (and on request), keeps the newest ``keep_latest_k``, resumes."""

    def __init__(self, folder: Path, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer,
                 followers: set[int], keep_latest_k: int, async_mode: bool, model_config: dict):
        self.folder, self.model_parts, self.optimizer = folder, model_parts, optimizer
        self.model_config = model_config  # written beside each checkpoint as config.json
        self.keep_latest_k = keep_latest_k
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.names = {id(p): canonical_fqn(n) for part in model_parts for n, p in part.named_parameters()}
        self.followers = followers  # pipeline replicas: their optimizer state is their source's
        self.replicas = {r: src for part in model_parts for r, src in getattr(part, "pipeline_replicas", {}).items()}
        # async saves talk on their own gloo group so they never interleave with training collectives
        self.async_group = dist.new_group(backend="gloo") if async_mode and dist.is_initialized() else None
        self.async_mode = async_mode
        self._pending: tuple[Future, Path, dict, int] | None = None
        if self.rank == 0 and folder.is_dir():
            for stale in folder.glob("step-*.partial"):  # a save that never completed
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ state
    def _saved_optimizer_entries(self) -> dict[str, torch.Tensor]:
        """``optimizer.{fqn}.{key}`` -> the live optimizer state (replicas' stored once, under the source)."""
        return {f"{OPTIMIZER_PREFIX}{self.names[id(p)]}.{key}": value
                for group in self.optimizer.param_groups for p in group["params"] if id(p) not in self.followers
                for key, value in self.optimizer.state.get(p, {}).items()}

    def _optimizer_entries_to_load(self, available: set[str]) -> dict[str, torch.Tensor]:
        """Freshly allocated optimizer state for every parameter the checkpoint has all of its state for (a
        replica reads its source's), keyed as saved. A parameter whose state has other keys (written by the
        other optimizer) starts from zero."""
        entries = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                source = replica_source(name, self.replicas) if id(p) in self.followers else name
                state = empty_state(group, p)
                keys = {key: f"{OPTIMIZER_PREFIX}{source}.{key}" for key in state}
                if not set(keys.values()) <= available:
                    continue
                self.optimizer.state[p] = state
                entries.update({keys[key]: value for key, value in state.items()})
        return entries

    # ------------------------------------------------------------------ save
    def save(self, step: int, trainer_state: dict, model_only: bool = False) -> None:
        """Start writing ``step-{step}`` (``model_only``: without optimizer moments, e.g. the final save)."""
        self.wait()
        partial = self.folder / f"step-{step}.partial"
        state = model_state(self.model_parts)
        if not model_only:
            state.update(self._saved_optimizer_entries())
        writer = FileSystemWriter(str(partial), single_file_per_rank=True, sync_files=True)
        if self.async_mode:
            with single_process_quiet():
                future = dcp.async_save(state, storage_writer=writer, process_group=self.async_group,
                                        no_dist=not dist.is_initialized())
            self._pending = (future, partial, trainer_state, step)
            return
        try:
            with single_process_quiet():
                dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as e:  # e.g. a full disk: the previous checkpoints stay intact
            self._abandon(partial, e)
            return
        self._finalize(partial, trainer_state, step)

    def wait(self) -> None:
        """Finish an in-flight async save (called before the next save and at exit)."""
        if self._pending is None:
            return
        future, partial, trainer_state, step = self._pending
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            self._abandon(partial, e)
            return
        self._finalize(partial, trainer_state, step)

    def _abandon(self, partial: Path, error: Exception) -> None:
        if self.rank == 0:
            print(f"titan_dsv4: checkpoint save to {partial} failed ({error}); the previous checkpoints are "
                  "intact and training continues", flush=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()

    def _finalize(self, partial: Path, trainer_state: dict, step: int) -> None:
        _barrier()  # every rank's files are written (DCP's metadata too)
        if self.rank == 0:
            with open(partial / TRAINER_STATE, "wb") as f:
                torch.save(trainer_state, f)
                f.flush()
                os.fsync(f.fileno())
            with open(partial / CONFIG_FILE, "w") as f:
                json.dump(self.model_config, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            final = self.folder / f"step-{step}"
            if final.exists():
                shutil.rmtree(final)
            os.rename(partial, final)  # the commit point
            _fsync_dir(self.folder)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        steps = complete_steps(self.folder)
        if self.keep_latest_k > 0:
            for old in steps[:-self.keep_latest_k]:
                shutil.rmtree(self.folder / f"step-{old}", ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, step: int) -> dict:
        """Restore model, optimizer moments and (returned) trainer state from ``step-{step}``."""
        return self.load_from(self.folder / f"step-{step}")

    def load_from(self, path: Path) -> dict:
        """Restore everything from the checkpoint folder ``path``; returns its trainer state."""
        model = model_state(self.model_parts)
        metadata = _checked_metadata(path, model)
        optimizer = self._optimizer_entries_to_load(set(metadata.state_dict_metadata))
        check_compatible(path, metadata, {k: v for k, v in optimizer.items() if not k.endswith(".step")})
        fresh = sum(len(g["params"]) for g in self.optimizer.param_groups) - len(self.optimizer.state)
        if fresh and self.rank == 0:  # e.g. the indexer was frozen when it was written, or a final weights-only save
            print(f"titan_dsv4: {path} has no optimizer state for {fresh} trainable tensors: their "
                  f"{self.optimizer.__class__.__name__} state starts from zero", flush=True)
        _load({**model, **optimizer}, path)
        try:
            return torch.load(path / TRAINER_STATE, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path / TRAINER_STATE}: unreadable ({type(e).__name__}: {e})") from None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
