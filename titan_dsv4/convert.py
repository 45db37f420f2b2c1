"""Convert between Hugging Face safetensors and DCP checkpoints, one tensor at a time.

    python -m titan_dsv4.convert hf-to-dcp HF_DIR DCP_DIR [--dtype bfloat16] [--num-mtp-layers N]
    python -m titan_dsv4.convert dcp-to-hf DCP_DIR HF_DIR [--dtype bfloat16] [--quantize fp8|fp4] [--max-shard-mb 4096]

The DCP checkpoint holds the model's tensors under their FQNs (a model-only checkpoint, as torchtitan's)
and a ``config.json`` beside it; ``dcp-to-hf`` also reads a training checkpoint (a ``step-N`` folder, which
has its ``config.json`` too) and leaves its optimizer state out. Neither direction holds the model, nor a
layer's stacked routed experts (17 GB per matrix for Pro in bf16), in memory: ``hf-to-dcp`` writes those one
chunk per expert, each pulled from the HF reader when DCP writes it, and ``dcp-to-hf`` reads them one stored
chunk at a time (a training checkpoint's chunk is a rank's experts) as it fills one output shard at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from .components.checkpoint import StoredTensors, single_process_quiet
from .components.hf_checkpoint import CheckpointError, HFCheckpointReader, _full_shapes, save_hf, storage_dtype
from .components.quantization import QUANTIZE_FORMATS
from .models.deepseek_v4.args import DeepseekV4ModelArgs
from .models.deepseek_v4.lora import adapter_names, is_adapter, merged_items
from .models.deepseek_v4.moe import FP4_SCALE, STACKED_BY_EXPERT, dense_experts, fp4_scales


class _PullFromHF(DefaultSavePlanner):
    """Plans on meta tensors, stacked routed experts as one chunk per expert (the HF layout's unit, which
    ``dcp-to-hf`` and the trainer's load then read one at a time); each chunk is read from the HF checkpoint
    only when DCP writes it."""

    def __init__(self, reader: HFCheckpointReader, dtypes: dict[str, torch.dtype]):
        super().__init__()
        self.reader, self.dtypes = reader, dtypes

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            if not STACKED_BY_EXPERT.search(item.index.fqn):
                items.append(item)
                continue
            size = item.tensor_data.size
            for e in range(size[0]):
                chunk = ChunkStorageMetadata(offsets=torch.Size([e] + [0] * (len(size) - 1)),
                                             sizes=torch.Size([1, *size[1:]]))
                items.append(WriteItem(MetadataIndex(item.index.fqn, chunk.offsets), WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk, item.tensor_data.properties, size)))
        self.plan = SavePlan(items, planner_data=plan.planner_data)
        return self.plan

    def resolve_data(self, write_item):
        fqn, rows = write_item.index.fqn, None
        if write_item.type == WriteItemType.SHARD:  # one expert of a stacked tensor
            expert = write_item.index.offset[0]
            rows = slice(expert, expert + 1)
        return self.reader.load(fqn, rows).to(self.dtypes[fqn]).contiguous()


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
    with single_process_quiet():
        dcp.save(meta_state, storage_writer=FileSystemWriter(str(dcp_dir), single_file_per_rank=False,
                                                             thread_count=1),
                 planner=_PullFromHF(reader, dtypes), no_dist=True)
    (dcp_dir / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))


class _DCPTensors(StoredTensors):
    """``(name, tensor)`` pairs read from a DCP checkpoint one at a time, LoRA adapters merged into their weights
    (``lora_scaling``: alpha / rank), FP4-stored experts dequantised. Stacked routed experts come as several
    pairs of the same name, one per block of experts the checkpoint stores together (``iter_hf`` numbers them
    on), so the peak is one stored chunk, not a layer's experts."""

    def __init__(self, dcp_dir: str | Path, lora_scaling: float = 0.0):
        super().__init__(dcp_dir)
        self.lora_scaling = lora_scaling

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        scales = fp4_scales(self.specs)
        for name in self.specs:
            if is_adapter(name) or name in scales:
                continue  # read with their weight
            group = [n for n in (name, f"{name}{FP4_SCALE}", *adapter_names(name)) if n in self.specs]
            for rows in self.row_blocks(name):
                yield from merged_items(*dense_experts(group, lambda n, rows=rows: self.load(n, rows)),
                                        self.lora_scaling)


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
    parser = argparse.ArgumentParser(prog="python -m titan_dsv4.convert", description=__doc__.split("\n\n")[0],
                                     epilog="hf-to-dcp: a released (or save_pretrained) Hugging Face folder to a "
                                            "model-only DCP checkpoint (checkpoint.initial_load_path). dcp-to-hf: "
                                            "a DCP checkpoint or a training run's step-N folder to the released "
                                            "Hugging Face layout.")
    parser.add_argument("direction", choices=["hf-to-dcp", "dcp-to-hf"], help="which way to convert")
    parser.add_argument("source", help="the Hugging Face folder (hf-to-dcp) or the DCP / step-N folder (dcp-to-hf)")
    parser.add_argument("destination", help="the folder to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the written tensors (tensors released in fp32 stay fp32)")
    parser.add_argument("--num-mtp-layers", type=int, default=None,
                        help="hf-to-dcp: MTP depths to keep (default: the checkpoint's num_nextn_predict_layers)")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE_FORMATS),
                        help="dcp-to-hf: fp8 writes the Base release's FP8 blocks, fp4 the instruct release's FP8 "
                             "weights with FP4 routed experts (default: unquantised)")
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
