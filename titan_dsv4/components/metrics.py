"""Step metrics: a console line, ``{dump_folder}/metrics.jsonl`` and optionally TensorBoard and W&B.

``metrics.jsonl`` is a public contract (docs/metrics.md): one JSON object per logged step with at least
``step``, ``loss`` (main LM cross-entropy per valid token, without MTP), ``mtp_losses`` (one float per
depth, [] without MTP), ``mtp_acceptance`` (greedy acceptance per depth), ``total_loss`` (the optimised
objective), ``grad_norm``, ``lr``, ``tokens_per_sec`` (global), ``max_memory_mb`` (this rank's peak) and
``valid_tokens``, ``step_time_s``, ``mfu`` (null without a known device peak), ``skipped`` (a non-finite
step whose update was skipped), ``indexer_loss`` (mean per-token indexer KL summed over CSA layers; null
while the indexer is frozen), ``moe_max_violation`` (each learned-routing MoE's ``max load / mean load - 1``
over the step's global batch, by name: ``components/load_balance.py``), ``data_loading_s`` (this rank's
wait for its batches), ``max_reserved_mb`` and ``alloc_retries`` (CUDA allocator; null elsewhere),
``validation`` (null, or the held-out losses of a validation step). ``total_loss`` does not include the
indexer loss: it trains only the indexer, whose inputs are detached from the main model.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch


# dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; ``metrics.peak_tflops`` overrides
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H800": 989.0, "H20": 148.0,
                    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak bf16 TFLOP/s of one device (None on CPU or an unknown GPU without ``override``)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def memory_record(device: torch.device) -> dict:
    """This rank's peak memory so far: ``max_memory_mb`` (CUDA allocator's peak allocated bytes, or the
    process's max RSS on CPU); on CUDA also ``max_reserved_mb`` (what the caching allocator held from the
    driver) and ``alloc_retries`` (times it freed its cache and retried an allocation: each one a stall of
    every stream, the sign of memory too full or fragmented to run at speed), null elsewhere."""
    if device.type != "cuda":
        return {"max_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                "max_reserved_mb": None, "alloc_retries": None}
    return {"max_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "max_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0)}


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as dashboard series: top-level numbers under their keys (booleans as 0/1), each
    MTP depth and each MoE its own series, validation under ``validation/``."""
    out = {key: float(value) for key, value in record.items()
           if isinstance(value, (int, float)) and key != "step"}
    for prefix, losses in (("", record), ("validation/", record.get("validation"))):
        if not losses:
            continue
        if prefix:
            out[f"{prefix}loss"] = losses["loss"]
        for k, (loss, acceptance) in enumerate(zip(losses["mtp_losses"], losses["mtp_acceptance"])):
            out[f"{prefix}mtp_loss/depth_{k}"] = loss
            out[f"{prefix}mtp_acceptance/depth_{k}"] = acceptance
    for moe, violation in record.get("moe_max_violation", {}).items():
        out[f"moe_max_violation/{moe}"] = violation
    return out


class MetricsLogger:
    """Global rank 0 logs (``enabled``); the others keep an inert logger."""

    def __init__(self, dump_folder: str, enabled: bool, color: bool):
        self.enabled, self.dump_folder = enabled, Path(dump_folder)
        self.path = self.dump_folder / "metrics.jsonl"
        self.color = color and sys.stdout.isatty()
        self.tb: Any = None
        self.wandb: Any = None
        self.logged_until = 0  # the last step an interrupted run logged (W&B keeps the values it has)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def open_dashboards(self, tensorboard_folder: str | None, wandb_config: dict | None,
                        resumed_at: int | None) -> None:
        """Start TensorBoard (``{dump_folder}/{tensorboard_folder}``) and W&B (``wandb_config``: the run's
        configuration) once the trainer knows whether it resumed. A resumed run marks its restart in
        TensorBoard, which then drops the interrupted run's later points, and continues the W&B run whose id
        ``{dump_folder}/wandb_run_id`` holds from the first step the interrupted run did not log (W&B ignores
        a step it has, with a warning). The config check saw both packages installed."""
        if not self.enabled:
            return
        if tensorboard_folder:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dump_folder / tensorboard_folder),
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        if wandb_config is not None:
            import wandb

            id_file = self.dump_folder / "wandb_run_id"
            run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
            if run_id is None:  # a new W&B run has none of the interrupted run's steps
                self.logged_until = 0
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "titan_dsv4"), dir=str(self.dump_folder),
                                    config=wandb_config, id=run_id, resume="allow" if run_id else None)
            id_file.write_text(self.wandb.id + "\n")

    def start_fresh(self) -> None:
        """A run that resumed nothing keeps its own ``metrics.jsonl``: an earlier run's file is kept beside it
        as ``metrics-K.jsonl`` (the next free K), never appended to."""
        if not self.enabled or not self.path.is_file():
            return
        k = 1
        while (kept := self.path.with_name(f"metrics-{k}.jsonl")).exists():
            k += 1
        self.path.replace(kept)
        print(f"titan_dsv4: a new run: the earlier run's {self.path.name} is kept as {kept.name}", flush=True)

    def drop_after(self, step: int) -> None:
        """Forget records past ``step`` (a resumed run redoes those steps)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        self.logged_until = max(steps, default=0)
        kept = [line for line, logged in zip(lines, steps) if logged <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def log(self, record: dict, total_steps: int | None = None, eta_s: float | None = None) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(self.progress_line(record, total_steps, eta_s), flush=True)
        if record.get("validation"):
            print(self.validation_line(record["step"], record["validation"]), flush=True)
        if self.tb is not None or self.wandb is not None:
            series = scalars(record)
            if self.tb is not None:
                for tag, value in series.items():
                    self.tb.add_scalar(tag, value, record["step"])
            if self.wandb is not None and record["step"] > self.logged_until:
                self.wandb.log(series, step=record["step"])

    def validation_line(self, step: int, losses: dict) -> str:
        """``validation at step 100  loss 3.52  mtp0 3.91 acc 40%  (262,144 tokens)``"""
        parts = [f"validation at step {step}", *loss_parts(losses), f"({losses['valid_tokens']:,} tokens)"]
        line = "  ".join(parts)
        return f"\033[33m{line}\033[0m" if self.color else line

    def progress_line(self, record: dict, total_steps: int | None, eta_s: float | None) -> str:
        """``step 120/5000 (2%)  loss 3.41  mtp0 3.80 acc 41%  ...  maxvio 0.12  ...  mfu 38.2%  eta 3h12m``"""
        step = f"{record['step']}/{total_steps} ({record['step'] / total_steps:.0%})" if total_steps \
            else str(record["step"])
        parts = [f"step {step}", *loss_parts(record)]
        if record.get("indexer_loss") is not None:
            parts.append(f"indexer_kl {record['indexer_loss']:.4f}")
        parts += [f"total {record['total_loss']:.4f}", f"grad_norm {record['grad_norm']:.3f}"]
        if record.get("moe_max_violation"):  # the worst-balanced MoE
            parts.append(f"maxvio {max(record['moe_max_violation'].values()):.2f}")
        parts += [f"lr {record['lr']:.2e}", f"tok/s {record['tokens_per_sec']:,.0f}"]
        if record.get("mfu") is not None:
            parts.append(f"mfu {record['mfu']:.1%}")
        parts.append(f"mem {record['max_memory_mb']:,.0f}MiB")
        if record.get("alloc_retries"):
            parts.append(f"alloc_retries {record['alloc_retries']}")
        if record.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        if eta_s is not None:
            parts.append(f"eta {format_duration(eta_s)}")
        line = "  ".join(parts)
        return f"\033[36m{line}\033[0m" if self.color else line

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def loss_parts(losses: dict) -> list[str]:
    """``loss 3.41``, then ``mtp0 3.80 acc 41%`` per depth."""
    return [f"loss {losses['loss']:.4f}"] + [
        f"mtp{k} {loss:.4f} acc {acc:.0%}" for k, (loss, acc) in enumerate(zip(losses["mtp_losses"],
                                                                               losses["mtp_acceptance"]))]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
