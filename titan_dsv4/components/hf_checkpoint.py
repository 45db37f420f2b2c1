"""Hugging Face DeepSeek-V4 checkpoints: read (released layout, transformers' ``save_pretrained`` layout, the
three MTP key forms, FP8/FP4 weights) and write (released layout, sharded, bf16/fp32, FP8 as the Base release or
FP8 with FP4 experts as the instruct release), tensor by tensor.

Loading never initialises silently: every model tensor must come from the checkpoint and every checkpoint
tensor must be used, else the error lists them. Extra MTP depths beyond the configured ones are skipped with
a log line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.deepseek_v4.args import DeepseekV4ModelArgs
from ..models.deepseek_v4.lora import is_adapter, merged_items
from ..models.deepseek_v4.moe import (EXPERT_WEIGHTS, FP4_SCALE, STACKED_BY_EXPERT, dense_experts, fp4_scales,
                                      local_tensor)
from ..models.deepseek_v4.state_dict_adapter import EXPERT_HF, _TRANSFORMERS_GLOBAL, _rename, fqn_from_hf, iter_hf
from .quantization import QUANTIZE_FORMATS, dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# what the writers read, once: a mapping (FQN -> tensor) or (FQN, tensor) pairs produced one at a time
StateSource = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
# dense weights the released files store as FP8 with 128x128 block scales
FP8_WEIGHTS = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]|"
                         r"e_proj|h_proj)\.weight$")
ROUTED_EXPERT_WEIGHT = re.compile(r"experts\.\d+\.w[123]\.weight$")


_FROM_TRANSFORMERS_GLOBAL = {v: k for k, v in _TRANSFORMERS_GLOBAL.items()}


class CheckpointError(ValueError):
    """A checkpoint (HF or DCP) that is unreadable or does not match the model; the message names the files and
    tensors."""


# ---------------------------------------------------------------------- reading
class SafetensorsFolder:
    """Tensor access across the shards of a folder (``model.safetensors.index.json`` or every file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise CheckpointError(f"{index}: shard {name} listed in the index does not exist")
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            weight_map = {}
        listed = dict(weight_map)
        weight_map = {}
        for name in files:
            for key in self._keys_of(name):
                weight_map[key] = name
        if listed:
            absent = sorted(k for k, f in listed.items() if weight_map.get(k) != f)
            if absent:
                raise CheckpointError(f"{index}: tensors listed in the index are not in their shard: "
                                      f"{', '.join(absent[:10])}")
            unlisted = sorted(set(weight_map) - set(listed))
            if unlisted:
                raise CheckpointError(f"{index}: shard tensors missing from the index: {', '.join(unlisted[:10])}")
        self.weight_map = weight_map

    def _keys_of(self, name: str) -> list[str]:
        try:
            with safe_open(str(self.path / name), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{self.path / name}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        name = self.weight_map[key]
        try:
            # a fresh handle per tensor: a long-lived one keeps the file's pages mapped (resident) as it is read
            with safe_open(str(self.path / name), framework="pt") as f:
                return f.get_tensor(key).clone()
        except Exception as e:
            raise CheckpointError(f"{self.path / name}: cannot read tensor {key!r} ({e})") from None


def canonical_key(key: str, args: DeepseekV4ModelArgs) -> str:
    """Any accepted HF key -> our module FQN (experts still per expert, ``*.scale`` kept)."""
    n = args.num_hidden_layers
    if key in _FROM_TRANSFORMERS_GLOBAL:
        return _FROM_TRANSFORMERS_GLOBAL[key]
    m = re.match(r"^(?:model\.)?layers\.(\d+)\.(.*)$", key)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if "self_attn." in rest or rest.startswith(("mlp.", "input_layernorm", "post_attention_layernorm",
                                                    "attn_hc.", "ffn_hc.")):
            rest = _rename(rest, to_transformers=False)  # transformers' module names
        elif rest.startswith("attn.norm."):
            rest = "attn.kv_norm." + rest[len("attn.norm."):]  # transformers 5.23 save_pretrained writes this
        key = f"mtp.{layer - n}.{rest}" if layer >= n else f"layers.{layer}.{rest}"
    return fqn_from_hf(key)


@dataclass
class _Recipe:
    """How one model tensor is produced from checkpoint tensors."""

    sources: list = field(default_factory=list)  # (weight key, scale key); "stack" collects (expert, ...) first
    kind: str = "copy"  # copy | stack | gate_up_0 | gate_up_1


def _weight(folder: SafetensorsFolder, key: str, scale_key: str | None) -> torch.Tensor:
    tensor = folder.get(key)
    if scale_key is None:
        return tensor.float() if tensor.is_floating_point() else tensor
    scale = folder.get(scale_key)
    if tensor.dtype == torch.int8:
        return dequantize_fp4(tensor, scale)
    return dequantize_fp8(tensor, scale)


class HFCheckpointReader:
    """Plans which checkpoint tensors build each model tensor, validates the plan, then reads on demand."""

    def __init__(self, path: str | Path, args: DeepseekV4ModelArgs, expected: dict[str, torch.Size]):
        self.folder = SafetensorsFolder(path)
        self.args = args
        self.recipes: dict[str, _Recipe] = {}
        used: set[str] = set()
        skipped_depths: set[int] = set()
        keys = self.folder.keys()
        key_set = set(keys)
        for key in keys:
            if key.endswith((".scale", ".weight_scale_inv")):
                continue
            name = canonical_key(key, args)
            depth = re.match(r"^mtp\.(\d+)\.", name)
            if depth and int(depth.group(1)) >= args.num_nextn_predict_layers:
                skipped_depths.add(int(depth.group(1)))
                used.add(key)
                used.update(s for s in (_scale_key(key, key_set),) if s)
                continue
            scale = _scale_key(key, key_set)
            used.add(key)
            if scale:
                used.add(scale)
            expert = EXPERT_HF.match(name)
            if expert:
                fqn = f"{expert.group(1)}.{expert.group(3)}"
                recipe = self.recipes.setdefault(fqn, _Recipe(kind="stack"))
                recipe.sources.append((int(expert.group(2)), key, scale))
            elif name.endswith("mlp.experts.gate_up_proj"):
                prefix = name[: -len("mlp.experts.gate_up_proj")] + "ffn.experts."
                self.recipes[prefix + "w1"] = _Recipe([(key, None)], kind="gate_up_0")
                self.recipes[prefix + "w3"] = _Recipe([(key, None)], kind="gate_up_1")
            elif name.endswith("mlp.experts.down_proj"):
                self.recipes[name[: -len("mlp.experts.down_proj")] + "ffn.experts.w2"] = _Recipe([(key, None)])
            else:
                self.recipes[name] = _Recipe([(key, scale)])
        if skipped_depths:
            logger.warning("checkpoint %s: skipping MTP depths %s (model uses %d)", path, sorted(skipped_depths),
                           args.num_nextn_predict_layers)
        for fqn, recipe in self.recipes.items():
            if recipe.kind == "stack":
                ids = sorted(e for e, _, _ in recipe.sources)
                if ids != list(range(args.n_routed_experts)):
                    raise CheckpointError(f"{path}: {fqn} has routed experts {ids[:8]}... in the checkpoint, the "
                                          f"model has {args.n_routed_experts}")
                recipe.sources = [(k, s) for _, k, s in sorted(recipe.sources)]
        missing = sorted(set(expected) - set(self.recipes))
        unexpected = sorted(set(self.recipes) - set(expected))
        unused = sorted(key_set - used)
        if missing or unexpected or unused:
            parts = []
            if missing:
                parts.append(f"missing tensors for {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
            if unexpected or unused:
                names = [self.recipes[u].sources[0][0] for u in unexpected] + unused
                parts.append(f"unexpected tensors {', '.join(names[:20])}" + (" ..." if len(names) > 20 else ""))
            raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
        self.expected = expected

    def load(self, fqn: str, rows: slice | None = None) -> torch.Tensor:
        """The full tensor, or only ``rows`` of dim 0 (stacked experts then read only those experts)."""
        recipe = self.recipes[fqn]
        expected = tuple(self.expected[fqn])
        if rows is not None:
            expected = (len(range(*rows.indices(expected[0]))), *expected[1:])
        if recipe.kind == "stack":
            tensor = torch.stack([_weight(self.folder, k, s) for k, s in recipe.sources[rows or slice(None)]])
        elif recipe.kind.startswith("gate_up"):
            both = _weight(self.folder, *recipe.sources[0])
            tensor = both.split(self.args.moe_intermediate_size, dim=1)[int(recipe.kind[-1])]
        else:
            tensor = _weight(self.folder, *recipe.sources[0])
        if rows is not None and recipe.kind != "stack":
            tensor = tensor[rows]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{self.folder.path}: tensor {recipe.sources[0][0]!r} has shape "
                                  f"{tuple(tensor.shape)}, the model's {fqn} needs {expected}")
        if fqn.endswith("tid2eid"):
            tensor = tensor.long()
        return tensor


def _scale_key(key: str, keys: set[str]) -> str | None:
    if not key.endswith(".weight"):
        return None
    for suffix in (".scale", ".weight_scale_inv"):
        candidate = key[: -len(".weight")] + suffix
        if candidate in keys:
            return candidate
    return None


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model tensors a checkpoint holds: parameters and persistent buffers, without replicas (keys may
    carry activation-checkpoint / compile wrapper components; see ``init.canonical_fqn``)."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith("mtp_embed.") and not k.endswith("expert_load")}


@torch.no_grad()
def load_hf_into(model: torch.nn.Module, path: str | Path, names: Iterable[str] | None = None) -> None:
    """Fill ``model``'s tensors (or only ``names``) from the checkpoint at ``path``, one tensor at a time. LoRA
    adapters are not in released checkpoints: they keep their initial values."""
    from ..models.deepseek_v4.init import canonical_fqn, copy_full_into, local_box

    targets = {k: v for k, v in checkpoint_tensors(model).items() if not is_adapter(k)}
    args = model.args
    dense = dataclasses.replace(args, expert_storage="dense")  # what the files hold
    full = {k: v.shape for k, v in _full_shapes(dense).items() if not is_adapter(k)}
    reader = HFCheckpointReader(path, args, full)
    scales = fp4_scales(targets)
    for name in (names if names is not None else targets):
        if name in scales:  # read with its weight
            continue
        # an expert-parallel rank reads only its own experts' weights
        rows = local_box(targets[name])[0] if name.endswith(EXPERT_WEIGHTS) else None
        value = reader.load(canonical_fqn(name), rows)
        if targets[name].dtype == torch.uint8:  # FP4-stored experts: the released FP4 values come back exactly
            value, scale = (t.view(torch.uint8) for t in quantize_fp4(value))
            copy_full_into(targets[f"{name}{FP4_SCALE}"], scale, rows_only=True)
        copy_full_into(targets[name], value, rows_only=rows is not None)
    if getattr(model, "mtp_embed", None) is not None and model.embed is not None:
        model.mtp_embed.weight.copy_(model.embed.weight)


def _full_shapes(args: DeepseekV4ModelArgs) -> dict[str, torch.Tensor]:
    from ..models.deepseek_v4.model import DeepseekV4Model

    with torch.device("meta"):
        return checkpoint_tensors(DeepseekV4Model(args))


# ---------------------------------------------------------------------- writing
def hf_tensors(state: StateSource, dtype: torch.dtype, quantize: str | None, quantize_from: torch.dtype | None = None,
               first_expert: dict[str, int] | None = None):
    """Our tensors -> released names (experts unstacked, as ``iter_hf``), encoded and yielded one at a time."""
    for name, tensor in iter_hf(state, first_expert):
        yield from _encode(name, tensor.detach().cpu(), dtype, quantize, quantize_from or dtype)


def _encode(name: str, tensor: torch.Tensor, dtype: torch.dtype, quantize: str | None, quantize_from: torch.dtype):
    """One tensor as the file stores it. Quantised weights are rounded from their ``quantize_from`` values: the
    trainer passes the dtype its forward computed in, so quantisation-aware training exports exactly what its
    forward used."""
    if not tensor.is_floating_point():
        yield name, tensor.contiguous()
    elif quantize is not None and (FP8_WEIGHTS.search(name) or ROUTED_EXPERT_WEIGHT.search(name)):
        fp4 = quantize == "fp4" and ROUTED_EXPERT_WEIGHT.search(name)
        weight, scale = (quantize_fp4 if fp4 else quantize_fp8)(tensor.to(quantize_from))
        yield name, weight
        yield name[: -len(".weight")] + ".scale", scale
    elif tensor.dtype == torch.float32 and _keeps_fp32(name):
        yield name, tensor.contiguous()
    else:
        yield name, tensor.to(dtype).contiguous()


def storage_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """dtype a loaded tensor is kept in: matrices in ``dtype``; mHC mixes, compressor ape, vectors and
    integer tables keep theirs."""
    if not tensor.is_floating_point() or tensor.dim() < 2 or name.endswith((".fn", ".ape")):
        return tensor.dtype
    return dtype


def _keeps_fp32(name: str) -> bool:
    """Tensors the released files store in fp32 (mHC, sinks, compressor position bias, gate bias)."""
    return bool(re.search(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$", name))


def write_shards(state: StateSource, path: Path, dtype: torch.dtype, quantize: str | None,
                 file_name, max_shard_bytes: int = 4 * 2**30, quantize_from: torch.dtype | None = None,
                 first_expert: dict[str, int] | None = None) -> tuple[dict[str, str], int]:
    """Stream ``state`` (a mapping or ``(name, tensor)`` pairs, read once) into safetensors shards named
    ``file_name(i, count)``; returns (weight map, bytes). At most one shard is held in memory; files appear
    under their final names only when complete. Quantised weights are rounded from ``quantize_from`` (default
    ``dtype``); ``first_expert`` as ``iter_hf``'s."""
    if quantize not in (None, *QUANTIZE_FORMATS):
        raise ValueError(f"quantize = {quantize!r} is invalid: allowed None, " + ", ".join(map(repr, QUANTIZE_FORMATS)))
    path.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str], int]] = []  # (temporary file, keys, bytes); renamed once counted
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        tmp = path / f".{file_name(len(written) + 1, 0)}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard), size))

    for name, tensor in hf_tensors(state, dtype, quantize, quantize_from, first_expert):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    flush()
    weight_map = {}
    for i, (tmp, keys, _) in enumerate(written, 1):
        file = file_name(i, len(written))
        os.replace(tmp, path / file)
        weight_map.update({k: file for k in keys})
    return weight_map, sum(b for _, _, b in written)


def stage_export(tensors: dict[str, torch.Tensor], writes_gathered: bool, lora_scaling: float
                 ) -> tuple[Iterator[tuple[str, torch.Tensor]], dict[str, int]] | None:
    """What one rank of a pipeline stage writes in an export, for ``write_shards``: ``(pairs, first_expert)``,
    or None when it writes nothing. Each rank writes the routed experts it holds (the first replica of each
    shard; a layer's stacked experts are by far the largest tensors, never gathered whole), and the rank with
    ``writes_gathered`` every other tensor, gathered whole onto the CPU one at a time. The gathers are
    collectives over the stage's ranks: every rank runs all of them, in order, before yielding its experts.
    LoRA adapters are merged into their weights (experts with the rows of the same experts), FP4-stored
    experts dequantised."""
    from torch.distributed.tensor import DTensor

    from ..models.deepseek_v4.init import local_box

    stacked = {n for n in tensors if STACKED_BY_EXPERT.search(n)}

    def gather(name: str) -> torch.Tensor:
        tensor = tensors[name]
        tensor = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
        return tensor.cpu() if writes_gathered else tensor

    # every rank gathers in the writer's order (an adapted weight, then its adapter), merging included
    gathered = merged_items([n for n in tensors if n not in stacked], gather, lora_scaling)
    if not writes_gathered:
        for _ in gathered:  # the collectives only
            pass
    mine = [n for n in tensors if n in stacked and _first_replica(tensors[n])]
    if not (writes_gathered or mine):
        return None
    first_expert = {n: local_box(tensors[n])[0].start for n in mine}
    local = merged_items(*dense_experts(mine, lambda n: local_tensor(tensors[n]).detach().cpu()), lora_scaling)
    return itertools.chain(gathered if writes_gathered else (), local), first_expert


def _first_replica(tensor: torch.Tensor) -> bool:
    """Whether this rank holds the first copy of its shard of ``tensor`` (coordinate 0 on every mesh dim the
    tensor is replicated over: HSDP's replicas hold the same experts)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return True
    coordinate = tensor.device_mesh.get_coordinate()
    return all(c == 0 for c, placement in zip(coordinate, tensor.placements) if placement.is_replicate())


def write_index(path: Path, weight_map: dict[str, str], total_bytes: int, args: DeepseekV4ModelArgs,
                quantize: str | None) -> None:
    """``config.json`` and the index, written last (atomically): a folder without an index is incomplete."""
    config = args.to_hf_config()
    if quantize is not None:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        config["expert_dtype"] = quantize
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tmp = path / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, path / INDEX_FILE)


def save_hf(state: StateSource, args: DeepseekV4ModelArgs, path: str | Path,
            dtype: torch.dtype = torch.bfloat16, quantize: str | None = None,
            max_shard_bytes: int = 4 * 2**30) -> None:
    """Write the released layout from one process: shards, ``config.json`` and the index."""
    path = Path(path)
    weight_map, total = write_shards(state, path, dtype, quantize,
                                     lambda i, n: f"model-{i:05d}-of-{n:05d}.safetensors", max_shard_bytes)
    write_index(path, weight_map, total, args, quantize)
