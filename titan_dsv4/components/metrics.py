"""Step metrics: a console line, ``{dump_folder}/metrics.jsonl`` and optionally TensorBoard.

``metrics.jsonl`` is a public contract (README "Metrics"): one JSON object per logged step with at least
``step``, ``loss`` (main LM cross-entropy per valid token, without MTP), ``mtp_losses`` (one float per
depth, [] without MTP), ``mtp_acceptance`` (greedy acceptance per depth), ``total_loss`` (the optimised
objective), ``grad_norm``, ``lr``, ``tokens_per_sec`` (global), ``max_memory_mb`` (this rank's peak) and
``valid_tokens``, ``step_time_s``, ``mfu`` (null without a known device peak), ``indexer_loss`` (mean
per-token indexer KL summed over CSA layers; null while the indexer is frozen). ``total_loss`` does not
include the indexer loss: it trains only the indexer, whose inputs are detached from the main model.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(self, dump_folder: str, enabled: bool, tensorboard_folder: str | None, color: bool):
        self.enabled = enabled
        self.path = Path(dump_folder) / "metrics.jsonl"
        self.color = color and sys.stdout.isatty()
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_folder:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:  # pragma: no cover - optional extra
                    raise ImportError("metrics.enable_tensorboard needs tensorboard: "
                                      "pip install 'titan_dsv4[metrics]'") from e
                self.tb = SummaryWriter(str(Path(dump_folder) / tensorboard_folder))

    def drop_after(self, step: int) -> None:
        """Forget records past ``step`` (a resumed run redoes those steps)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        mtp = " ".join(f"mtp{k}={v:.4f}" for k, v in enumerate(record["mtp_losses"]))
        if record.get("indexer_loss") is not None:
            mtp += f"  indexer_kl={record['indexer_loss']:.4f}"
        line = (f"step {record['step']:5d}  loss {record['loss']:.4f}  {mtp + '  ' if mtp else ''}"
                f"total {record['total_loss']:.4f}  grad_norm {record['grad_norm']:.3f}  lr {record['lr']:.2e}  "
                f"tok/s {record['tokens_per_sec']:,.0f}  mem {record['max_memory_mb']:,.0f}MiB")
        print(f"\033[36m{line}\033[0m" if self.color else line, flush=True)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            for k, value in enumerate(record["mtp_losses"]):
                self.tb.add_scalar(f"mtp_loss/depth_{k}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
