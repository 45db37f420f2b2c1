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

import json
import os
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from ..models.deepseek_v4.init import canonical_fqn
from ..models.deepseek_v4.lora import is_adapter
from ..models.deepseek_v4.pipeline import replica_source
from .hf_checkpoint import checkpoint_tensors
from .optimizer import empty_state

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.json"
OPTIMIZER_PREFIX = "optimizer."


class CheckpointError(RuntimeError):
    pass


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
    """Fill the model from a DCP checkpoint (a training checkpoint or the converter's model-only one)."""
    path = Path(path)
    metadata = _read_metadata(path)
    # LoRA adapters a checkpoint of the base model lacks keep their initial values (B = 0: the base model)
    state = {k: v for k, v in model_state(model_parts).items()
             if k in metadata.state_dict_metadata or not is_adapter(k)}
    _checked_metadata(path, state, metadata)
    _load(state, path)


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
            future = dcp.async_save(state, storage_writer=writer, process_group=self.async_group,
                                    no_dist=not dist.is_initialized())
            self._pending = (future, partial, trainer_state, step)
            return
        try:
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
