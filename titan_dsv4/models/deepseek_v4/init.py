"""Weight init for training from scratch (dsv4-spec.md §5.10, Automodel's scheme; DeepSeek's own init is
unpublished).

Every tensor draws from its own generator seeded by ``(seed, FQN)`` — and each routed expert from
``(seed, FQN, expert)`` — so a model split over any pipeline / FSDP / EP layout gets exactly the weights a
single process would. The MTP embedding replica is named after the table it copies.

| tensor | init |
|---|---|
| ``embed`` | N(0, 1) |
| ``head`` | trunc-normal(0, H^-0.5, ±3σ) |
| other linear / expert weights, router ``weight`` | trunc-normal(0, 0.02, ±2) / N(0, 0.02) for routers |
| mHC ``fn`` / ``base`` / ``scale`` | N(0, 0.02) / 0 / 1 |
| ``attn_sink``, compressor ``ape``, router ``bias`` | 0 |
| norms | 1 |
| ``tid2eid`` | k distinct random experts per token id |

FP4-stored experts (``expert_storage = "fp4"``) hold their dense init rounded to FP4.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ...components.quantization import quantize_fp4
from .lora import is_adapter
from .moe import EXPERT_WEIGHTS, FP4_SCALE, fp4_scales
from .pipeline import replica_source


def _generator(seed: int, *key: object) -> torch.Generator:
    text = ":".join(str(k) for k in (seed, *key))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()) ^ (seed << 32))


WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_fqn(name: str) -> str:
    """The FQN without activation-checkpoint / compile wrapper components."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_init_value(name: str, shape: torch.Size, dtype: torch.dtype, seed: int, std: float,
                    hidden_size: int, experts: slice | None = None) -> torch.Tensor:
    """The full (unsharded) initial value of parameter or buffer ``name``; of stacked expert weights, only the
    ``experts`` rows when given (each expert has its own generator: a rank draws only its own)."""
    name = replica_source(canonical_fqn(name))
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(EXPERT_WEIGHTS):
        ids = range(shape[0])[experts or slice(None)]
        out = torch.empty(len(ids), *shape[1:], dtype=torch.float32)
        for row, e in enumerate(ids):
            nn.init.trunc_normal_(out[row], 0.0, std, -2.0, 2.0, generator=_generator(seed, name, e))
        return out.to(dtype)
    out = torch.empty(shape, dtype=torch.float32)
    if name == "embed.weight":
        out.normal_(0.0, 1.0, generator=_generator(seed, name))
    elif name == "head.weight":
        s = hidden_size ** -0.5
        nn.init.trunc_normal_(out, 0.0, s, -3 * s, 3 * s, generator=_generator(seed, name))
    elif leaf.endswith("lora_a"):  # LoRA: A at nn.Linear's default scale, B zero (training starts at the base model)
        out.normal_(0.0, shape[-1] ** -0.5, generator=_generator(seed, name))
    elif leaf.endswith("lora_b"):
        out.zero_()
    elif name.endswith("gate.weight") or leaf == "fn":
        out.normal_(0.0, std, generator=_generator(seed, name))
    elif leaf in ("base", "attn_sink", "ape", "bias"):
        out.zero_()
    elif leaf == "scale" or name.endswith("norm.weight"):
        out.fill_(1.0)
    elif len(shape) == 2:
        nn.init.trunc_normal_(out, 0.0, std, -2.0, 2.0, generator=_generator(seed, name))
    else:
        raise ValueError(f"no init rule for tensor {name!r} of shape {tuple(shape)}")
    return out.to(dtype)


def hash_table(name: str, vocab: int, top_k: int, n_experts: int, seed: int) -> torch.Tensor:
    """``[vocab, top_k]`` distinct experts per token id, deterministic from ``(seed, name)``."""
    rand = torch.rand(vocab, n_experts, generator=_generator(seed, name))
    return rand.argsort(dim=-1)[:, :top_k]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, checkpoint_follows: bool = False) -> None:
    """``checkpoint_follows``: a checkpoint load (HF or DCP, each an error on any tensor it lacks) overwrites
    every tensor it holds next, so only the others are set: LoRA adapters and the running statistics. Drawing
    a whole pipeline stage's weights first would cost start-up ~10 s per billion values on a CPU core."""
    args = model.args
    tensors = {canonical_fqn(n): t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    scales = fp4_scales(tensors)
    for name, tensor in tensors.items():
        if name.endswith(("expert_load", "kl_sum")):  # running statistics
            tensor.zero_()
            continue
        if checkpoint_follows and not is_adapter(name):
            continue
        if name.endswith(EXPERT_WEIGHTS):  # this rank's experts only
            rows = local_box(tensor)[0]
            if tensor.dtype == torch.uint8:  # stored as FP4: the dense init rounded
                shape = (*tensor.shape[:-1], tensor.shape[-1] * 2)
                value = full_init_value(name, shape, torch.float32, seed, args.initializer_range, args.hidden_size,
                                        rows)
                packed, scale = quantize_fp4(value)
                copy_full_into(tensor, packed.view(torch.uint8), rows_only=True)
                copy_full_into(tensors[f"{name}{FP4_SCALE}"], scale.view(torch.uint8), rows_only=True)
            else:
                value = full_init_value(name, tensor.shape, tensor.dtype, seed, args.initializer_range,
                                        args.hidden_size, rows)
                copy_full_into(tensor, value, rows_only=True)
            continue
        if name in scales:  # written with its weight
            continue
        if name.endswith("tid2eid"):
            value = hash_table(name, args.vocab_size, args.num_experts_per_tok, args.n_routed_experts, seed)
        else:
            value = full_init_value(name, tensor.shape, tensor.dtype, seed, args.initializer_range,
                                    args.hidden_size)
        copy_full_into(tensor, value)


def local_box(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the full tensor that this rank's shard of a DTensor holds (every dim; FSDP, HSDP and
    expert-parallel shardings all give one contiguous box)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def copy_full_into(tensor: torch.Tensor, value: torch.Tensor, rows_only: bool = False) -> None:
    """Copy a full value into a plain tensor or this rank's shard of a DTensor, without communication.
    ``rows_only``: ``value`` already holds just the dim-0 rows of ``local_box`` (an expert-parallel read)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        box = local_box(tensor)
        if rows_only:
            box = (slice(None), *box[1:])
        local = tensor.to_local()
        local.copy_(value[box].to(device=local.device, dtype=local.dtype))
    else:
        tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
