"""The DeepSeek-V4 transformer with its MTP depths. Free of parallelism: modules a pipeline stage does not
hold are ``None`` (or missing from ``layers``/``mtp``) and their step is skipped, keeping FQNs stable."""

from __future__ import annotations

import torch
from torch import nn

from .args import DeepseekV4ModelArgs
from .attention import Attention, AttentionContext, Compressor
from .block import Block
from .document import default_positions, document_ids
from .fp32_linear import fp32_linear
from .head_loss import head_loss
from .hyper_connection import HyperConnection, HyperHead
from .init import canonical_fqn, init_weights
from .lora import add_adapters
from .moe import RoutedExperts
from .mtp import MTPBlock, mtp_input_ids
from .norm import RMSNorm
from .qat import attention_qat_mismatch
from .pipeline import PIPELINE_REPLICAS, pipeline_stage_metas, pipeline_stage_modules
from .rope import rope_inv_freq, rope_rotation
from .sequence_shard import HALO_DOC, SequenceShard, shard_window


class DeepseekV4Model(nn.Module):
    pipeline_stage_modules = pipeline_stage_modules
    pipeline_stage_metas = pipeline_stage_metas
    pipeline_replicas = PIPELINE_REPLICAS

    def __init__(self, args: DeepseekV4ModelArgs):
        super().__init__()
        self.args = args
        h = args.hidden_size
        self.embed: nn.Embedding | None = nn.Embedding(args.vocab_size, h)
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.num_hidden_layers)})
        self.hc_head: HyperHead | None = HyperHead(h, args.hc_mult, args.hc_eps, args.rms_norm_eps)
        self.norm: RMSNorm | None = RMSNorm(h, args.rms_norm_eps)
        self.head: nn.Linear | None = nn.Linear(h, args.vocab_size, bias=False)
        self.mtp = nn.ModuleDict({str(k): MTPBlock(args, k) for k in range(args.num_nextn_predict_layers)})
        # Pipeline parallelism may give the last stage its own copy of the embedding for MTP.
        self.mtp_embed: nn.Embedding | None = None
        self.mtp_loss_scale: float | None = None  # set_mtp_loss_scale
        # context parallelism: inputs are this shard of every sequence (set_sequence_shard)
        self.sequence_shard: SequenceShard | None = None
        if args.lora_rank:
            add_adapters(self, args.lora_rank, args.lora_scaling, args.lora_targets)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``tokens``: ids ``[B, S]`` on the first stage, else the mHC stream ``[B, S, hc_mult, H]`` (then
        ``input_ids`` must be given for hash-routed layers and MTP).

        Returns the stream (stages without the head), the fp32 logits ``[B, S, V]``, or in training with MTP
        the tuple ``(logits, mtp_logits_0, ..., mtp_logits_{D-1})`` where depth k's logits at position t
        predict token t+k+2. With ``targets`` ``[B, S, 1 + D]`` (``build_targets``) the head runs fused with
        its cross-entropy (``head_loss.py``) and returns ``(objective, stats)``: ``CE_sum(main) + mtp_loss_scale
        / D · Σ_k CE_sum(k)`` and, per depth, (CE sum, valid targets, argmax hits) ``[1 + D, 3]`` — in eval
        mode too (validation: every depth's loss, no expert-load counting, no indexer training).
        """
        if not tokens.is_floating_point():  # token ids: this is the first stage
            input_ids = tokens
            x = self.embed(tokens).unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)
        else:
            x = tokens
        if positions is None:
            positions = default_positions(x[..., 0, 0] if input_ids is None else input_ids)
        ctx = self.attention_context(positions)
        for layer in self.layers.values():
            x = layer(x, ctx, input_ids)
        if self.head is None:
            return x
        hiddens = [self.norm(self.hc_head(x))]
        if (self.training or targets is not None) and len(self.mtp):
            if input_ids is None:
                raise ValueError("MTP needs the token ids (pass input_ids)")
            embed = self.mtp_embed if self.mtp_embed is not None else self.embed
            # one embedding lookup and one LM-head pass serve all depths
            shifted = self._mtp_input_ids(input_ids, positions)
            for block, embedded in zip(self.mtp.values(), embed(shifted).unbind(0)):
                x, depth_hidden = block(x, embedded, ctx, input_ids)
                hiddens.append(depth_hidden)
        if targets is not None:
            return head_loss(hiddens, self.head.weight, targets, self._depth_weights(len(hiddens) - 1))
        if len(hiddens) == 1:
            return fp32_linear(hiddens[0], self.head.weight)  # fp32 LM head
        return tuple(fp32_linear(torch.stack(hiddens), self.head.weight).unbind(0))

    def _depth_weights(self, num_mtp: int) -> list[float]:
        if not num_mtp:
            return [1.0]
        if self.mtp_loss_scale is None:
            raise ValueError("training MTP with targets needs set_mtp_loss_scale(lambda) first (the trainer "
                             "passes [mtp] loss_scaling_factor)")
        return [1.0] + [self.mtp_loss_scale / num_mtp] * num_mtp

    def _mtp_input_ids(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every depth's shifted ids ``[D, B, S]``; under context parallelism from the whole sequences (gathered
        once), so the shard's last tokens read ids of the next shard."""
        shard = self.sequence_shard
        if shard is not None:
            input_ids, positions = shard.gather(input_ids), shard.gather(positions)
        shifted = [mtp_input_ids(input_ids, positions, d) for d in range(len(self.mtp))]
        return torch.stack(shifted if shard is None else [shard.part(ids) for ids in shifted])

    def attention_context(self, positions: torch.Tensor) -> AttentionContext:
        """RoPE tables and documents of the sequence attention runs on: under context parallelism the shard
        after its halo, with document ids counted over the whole sequence."""
        a = self.args
        shard = self.sequence_shard
        if shard is None:
            doc_ids = document_ids(positions)
        else:
            everywhere = shard.gather(positions)
            doc_ids = shard_window(shard, document_ids(everywhere), fill=HALO_DOC)
            positions = shard_window(shard, everywhere, fill=0)
        inv_freq = {
            "main": rope_inv_freq(a.qk_rope_head_dim, a.rope_theta),
            "compress": rope_inv_freq(a.qk_rope_head_dim, a.compress_rope_theta, a.rope_scaling),
        }
        inv_freq = {k: v.to(positions.device) for k, v in inv_freq.items()}
        rotation = {k: rope_rotation(positions, f) for k, f in inv_freq.items()}
        return AttentionContext(positions=positions, doc_ids=doc_ids, inv_freq=inv_freq, rotation=rotation,
                                shard=shard)

    # ------------------------------------------------------------------ helpers
    def init_weights(self, seed: int = 0, checkpoint_follows: bool = False) -> None:
        """Deterministic per-FQN init (see ``init.py``): same seed -> same weights for every layout.
        ``checkpoint_follows``: only what a checkpoint load will not overwrite (adapters, statistics)."""
        init_weights(self, seed, checkpoint_follows)

    def attention_modules(self) -> list[Attention]:
        """Every block's attention, MTP blocks included (by type, not ``hasattr``: a checkpoint wrapper
        forwards attributes)."""
        return [module for module in self.modules() if isinstance(module, Attention)]

    def set_attention_query_block(self, block: int | str | None) -> None:
        """``None``: dense reference; an int: query-blocked; ``"auto"``: blocked on GPU / long sequences."""
        for module in self.attention_modules():
            module.query_block = block

    def set_attention_kernel(self, kernel: str) -> None:
        """``"auto"``: the fused Triton kernel on CUDA (when installed); ``"torch"``: the torch path;
        ``"triton"``: the kernel on any device Triton runs on (CPU: under its interpreter, for tests)."""
        for module in self.attention_modules():
            module.kernel = kernel

    def set_sinkhorn_kernel(self, kernel: str) -> None:
        """Every mHC site's Sinkhorn, as ``set_attention_kernel``: ``"auto"`` | ``"torch"`` | ``"triton"``."""
        for module in self.modules():
            if isinstance(module, HyperConnection):
                module.sinkhorn_kernel = kernel

    def set_sequence_shard(self, shard: SequenceShard | None) -> None:
        """Context parallelism: this model's inputs are one contiguous shard of each sequence (None: whole)."""
        self.sequence_shard = shard

    def set_expert_qat(self, fmt: str) -> None:
        """Routed experts (MTP blocks' included) train through ``fmt``'s rounding: ``"none"`` | ``"fp4"`` (the
        released instruct checkpoints' format) | ``"fp8"`` (the Base checkpoints')."""
        for module in self.modules():
            if isinstance(module, RoutedExperts):
                module.qat = fmt

    def set_attention_qat(self, enabled: bool) -> None:
        """Every attention (MTP blocks' included) rounds its KV and its indexer's queries and keys as the released
        inference code does (``qat.py``), gradients straight through."""
        if enabled and (problem := attention_qat_mismatch(self.args)):
            raise ValueError(f"attention QAT: {problem}")
        for module in self.attention_modules():
            module.qat = enabled
            if module.indexer is not None:
                module.indexer.qat = enabled

    def set_mtp_loss_scale(self, scale: float) -> None:
        """lambda in ``main + lambda / D · Σ_k mtp_k``: the fused head's objective needs it in its forward."""
        self.mtp_loss_scale = scale

    def set_indexer_loss_scale(self, scale: float) -> None:
        """Weight of the summed per-token indexer KL in the objective; 0 leaves the indexer untrained."""
        for module in self.attention_modules():
            module.indexer_loss_scale = scale

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".attn.indexer." in f".{canonical_fqn(name)}"]

    def matrix_parameters(self) -> list[tuple[nn.Parameter, int]]:
        """The weights DeepSeek-V4 trains with Muon, each with the number of independent matrices stacked
        along its dim 0: every matrix but the embeddings, the LM head and the compressors' position biases
        (they, the RMSNorm weights, sinks and mHC static biases and gates train with AdamW). A routed-experts
        tensor ``[E, out, in]`` is E matrices, a grouped output projection ``wo_a`` one per group."""
        vectors_like = [m.weight for m in (self.embed, self.mtp_embed, self.head) if m is not None]
        vectors_like += [m.ape for m in self.modules() if isinstance(m, Compressor)]
        groups = {id(m.wo_a.weight): m.o_groups for m in self.attention_modules()}
        skip = {id(p) for p in vectors_like}
        return [(p, p.shape[0] if p.ndim == 3 else groups.get(id(p), 1))
                for p in self.parameters() if p.ndim >= 2 and id(p) not in skip]
