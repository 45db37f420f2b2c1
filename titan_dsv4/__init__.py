"""titan_dsv4: torchtitan-style pipeline-parallel training for DeepSeek-V4 with MTP."""

from __future__ import annotations

from pathlib import Path

import torch


def from_pretrained(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    num_mtp_layers: int | None = None):
    """A DeepSeek-V4 model with the weights of a Hugging Face checkpoint folder (its ``config.json`` decides
    the shape; ``num_mtp_layers`` keeps fewer MTP depths). Tensors are read and converted one at a time;
    mHC, sinks, norms and other fp32 tensors of the released model stay fp32."""
    from .components.hf_checkpoint import load_hf_into, storage_dtype
    from .models.deepseek_v4 import DeepseekV4Model, DeepseekV4ModelArgs

    args = DeepseekV4ModelArgs.from_hf_config(Path(path) / "config.json")
    if num_mtp_layers is not None:
        args = args.with_mtp_layers(num_mtp_layers)
    with torch.device("meta"):
        model = DeepseekV4Model(args)
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            kept = storage_dtype(f"{module_name}.{name}", p, dtype)
            if kept != p.dtype:
                module._parameters[name] = torch.nn.Parameter(p.to(kept), requires_grad=p.requires_grad)
    model.to_empty(device=device)
    load_hf_into(model, path)
    return model


def save_pretrained(model, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None):
    """Write ``model`` in the released DeepSeek-V4 layout. ``quantize="fp8"``: 128x128-block FP8 with E8M0
    scales for the weights the release stores in FP8 and the routed experts (the Base release); ``"fp4"``: the
    same with the routed experts in FP4 (the instruct release)."""
    from .components.hf_checkpoint import checkpoint_tensors, save_hf

    save_hf(checkpoint_tensors(model), model.args, path, dtype=dtype, quantize=quantize)


__all__ = ["from_pretrained", "save_pretrained"]
