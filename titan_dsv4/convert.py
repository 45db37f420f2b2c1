"""Convert between Hugging Face safetensors and DCP checkpoints, one tensor at a time.

    python -m titan_dsv4.convert hf-to-dcp HF_DIR DCP_DIR [--dtype bfloat16] [--num-mtp-layers N]
    python -m titan_dsv4.convert dcp-to-hf DCP_DIR HF_DIR [--dtype bfloat16] [--quantize fp8|fp4] [--max-shard-mb 4096]

The DCP checkpoint holds the model's tensors under their FQNs (a model-only checkpoint, as torchtitan's)
and a ``config.json`` beside it; ``dcp-to-hf`` also reads a training checkpoint (a ``step-N`` folder, which
has its ``config.json`` too) and leaves its optimizer state out. Neither direction holds the model in memory:
DCP's writer pulls each tensor from the HF reader when it writes it, and the HF writer pulls each tensor from
DCP as it fills one output shard at a time (so the peak is about one output shard).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .components.checkpoint import OPTIMIZER_PREFIX
from .components.hf_checkpoint import CheckpointError, HFCheckpointReader, _full_shapes, save_hf, storage_dtype
from .components.quantization import QUANTIZE_FORMATS
from .models.deepseek_v4.args import DeepseekV4ModelArgs
from .models.deepseek_v4.lora import merged_items
from .models.deepseek_v4.moe import dense_experts


class _PullFromHF(DefaultSavePlanner):
    """Plans on meta tensors; each tensor is read from the HF checkpoint only when DCP writes it."""

    def __init__(self, reader: HFCheckpointReader, dtypes: dict[str, torch.dtype]):
        super().__init__()
        self.reader, self.dtypes = reader, dtypes

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        return self.reader.load(fqn).to(self.dtypes[fqn]).contiguous()


def hf_to_dcp(hf_dir: str | Path, dcp_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
              num_mtp_layers: int | None = None) -> None:
    args = DeepseekV4ModelArgs.from_hf_config(Path(hf_dir) / "config.json")
    if num_mtp_layers is not None:
        args = args.with_mtp_layers(num_mtp_layers)
    shapes = _full_shapes(args)
    reader = HFCheckpointReader(hf_dir, args, {k: v.shape for k, v in shapes.items()})
    dtypes = {k: storage_dtype(k, v, dtype) for k, v in shapes.items()}
    meta_state = {k: torch.empty(v.shape, dtype=dtypes[k], device="meta") for k, v in shapes.items()}
    dcp_dir = Path(dcp_dir)
    dcp.save(meta_state, storage_writer=FileSystemWriter(str(dcp_dir), single_file_per_rank=False, thread_count=1),
             planner=_PullFromHF(reader, dtypes), no_dist=True)
    (dcp_dir / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))


class _DCPTensors:
    """A read-only mapping whose ``items()`` loads one tensor at a time from a DCP checkpoint, LoRA adapters
    merged into their weights (``lora_scaling``: alpha / rank)."""

    def __init__(self, dcp_dir: str | Path, lora_scaling: float = 0.0):
        self.dcp_dir, self.lora_scaling = str(dcp_dir), lora_scaling
        metadata = FileSystemReader(self.dcp_dir).read_metadata()
        self.specs = {k: v for k, v in metadata.state_dict_metadata.items()
                      if isinstance(v, TensorStorageMetadata) and not k.startswith(OPTIMIZER_PREFIX)}

    def _load(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        tensor = torch.empty(spec.size, dtype=spec.properties.dtype)
        dcp.load({name: tensor}, storage_reader=FileSystemReader(self.dcp_dir), no_dist=True)
        return tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return merged_items(*dense_experts(self.specs, self._load), self.lora_scaling)


def dcp_to_hf(dcp_dir: str | Path, hf_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
              quantize: str | None = None, max_shard_bytes: int = 4 * 2**30) -> None:
    config = Path(dcp_dir) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{dcp_dir}: no config.json beside the DCP checkpoint")
    args = DeepseekV4ModelArgs.from_hf_config(config)  # with a LoRA run's adapters (merged on the way out)
    tensors = _DCPTensors(dcp_dir, args.lora_scaling)
    expected = set(_full_shapes(args))
    if set(tensors.specs) != expected:
        missing, extra = sorted(expected - set(tensors.specs)), sorted(set(tensors.specs) - expected)
        raise CheckpointError(f"{dcp_dir}: DCP checkpoint does not match its config.json: missing "
                              f"{missing[:10]}, unexpected {extra[:10]}")
    save_hf(tensors, args, hf_dir, dtype=dtype, quantize=quantize, max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan_dsv4.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["hf-to-dcp", "dcp-to-hf"])
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--num-mtp-layers", type=int, default=None)
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE_FORMATS))
    parser.add_argument("--max-shard-mb", type=int, default=4096, help="dcp-to-hf: largest output shard")
    opts = parser.parse_args(argv)
    dtype = getattr(torch, opts.dtype)
    try:
        if opts.direction == "hf-to-dcp":
            hf_to_dcp(opts.source, opts.destination, dtype, opts.num_mtp_layers)
        else:
            dcp_to_hf(opts.source, opts.destination, dtype, opts.quantize, opts.max_shard_mb * 2**20)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"titan_dsv4.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
