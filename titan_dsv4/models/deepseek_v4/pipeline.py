"""DeepSeek-V4's two pipeline hooks (called by the generic splitter in ``distributed/pipeline.py``).

Only the mHC stream ``[mb, S, hc_mult, H]`` crosses a stage boundary. Token ids and positions reach every
stage as keyword inputs (hash-routed layers may sit anywhere; MTP embeds future tokens on the last stage).
MTP runs on the last stage, which therefore needs the embedding table: ``mtp_embed``, declared a replica
of ``embed`` so the splitter keeps the two one parameter (gradients summed, counted and saved once;
without any communication when both stages share a rank, as in V-shaped schedules).
"""

from __future__ import annotations

import torch
from torch import nn

FIRST_STAGE_UNITS = ("embed",)
LAST_STAGE_UNITS = ("hc_head", "norm", "head")
# replica FQN prefix -> the FQN prefix it replicates; the splitter sums their gradients, counts the pair
# once in the grad norm and saves only the source.
PIPELINE_REPLICAS = {"mtp_embed": "embed"}


def replica_source(fqn: str, replicas: dict[str, str] = PIPELINE_REPLICAS) -> str:
    """The FQN a replica's tensor copies (``mtp_embed.weight`` -> ``embed.weight``); others unchanged."""
    for replica, source in replicas.items():
        if fqn.startswith(replica + "."):
            return source + fqn[len(replica):]
    return fqn


def pipeline_stage_modules(self, fqns_per_stage: list[list[str]]) -> list[list[str]]:
    stages = [list(s) for s in fqns_per_stage]
    last = len(stages) - 1
    mtp_units = [f"mtp.{k}" for k in self.mtp.keys()]

    def place(unit: str, stage: int) -> None:
        holders = [i for i, s in enumerate(stages) if unit in s]
        if holders and holders != [stage]:
            raise ValueError(f"module {unit!r} must be on pipeline stage {stage}, not {holders}")
        if not holders:
            stages[stage].insert(0, unit) if stage == 0 else stages[stage].append(unit)

    for unit in FIRST_STAGE_UNITS:
        place(unit, 0)
    for unit in (*LAST_STAGE_UNITS, *mtp_units):
        place(unit, last)
    if mtp_units and last > 0 and "mtp_embed" not in stages[last]:
        if self.mtp_embed is None:
            self.mtp_embed = nn.Embedding(self.args.vocab_size, self.args.hidden_size,
                                          device=self.embed.weight.device, dtype=self.embed.weight.dtype)
        stages[last].append("mtp_embed")
    return stages


def pipeline_stage_metas(self, *, stage_index: int, num_stages: int, microbatch_size: int, seq_len: int,
                         dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    a = self.args
    # float metas carry requires_grad: in static mode torch sets up gradient exchange from it
    stream = torch.empty(microbatch_size, seq_len, a.hc_mult, a.hidden_size, dtype=dtype, device="meta",
                         requires_grad=True)
    ids = torch.empty(microbatch_size, seq_len, dtype=torch.long, device="meta")
    inputs = (ids,) if stage_index == 0 else (stream,)
    if stage_index < num_stages - 1:
        return inputs, (stream,)
    # the head runs fused with its cross-entropy: (objective, per-depth stats), see ``forward``
    loss_dtype = torch.promote_types(dtype, torch.float32)
    objective = torch.empty((), dtype=loss_dtype, device="meta", requires_grad=True)
    stats = torch.empty(1 + len(self.mtp), 3, dtype=loss_dtype, device="meta")
    return inputs, (objective, stats)
