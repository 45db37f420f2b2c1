"""torchrun worker: the real Trainer under one parallel layout (FSDP / HSDP / EP / PP, activation
checkpointing) for one step, against a single-process model on the same weights and global batch (fp32).

    torchrun --nproc_per_node N tests/parallel_worker.py OUT.json CASE [CASE ...]

CASE is ``name=key:value,key:value`` over ``parallelism.*`` / ``activation_checkpoint.*`` (``ac``, ``sac``) /
``mtp`` / ``training.indexer_loss_coeff`` / ``compile`` (its backend) / ``seq`` (``training.seq_len``, 64) keys,
e.g. ``ep2_fsdp2=ep:2`` (the shard degree fills the world). Compared per case: loss parts, every gradient after
clipping (gathered from its shards), the clipping norm, and every expert bias after the step; reported: the
step's graph breaks.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from launch import finish_worker, run_worker
from titan_dsv4.components.dataloader import build_dataloader
from titan_dsv4.components.load_balance import update_expert_bias
from titan_dsv4.components.loss import build_targets, summarise_parts
from titan_dsv4.config.job_config import JobConfig
from titan_dsv4.config.validate import validate
from titan_dsv4.distributed.utils import init_distributed
from titan_dsv4.models.deepseek_v4.init import canonical_fqn
from titan_dsv4.models.deepseek_v4.lora import LORA_TARGETS, is_adapter
from titan_dsv4.train import Trainer

KEYS = {"pp": "pipeline_parallel_degree", "dp_replicate": "data_parallel_replicate_degree",
        "dp_shard": "data_parallel_shard_degree", "ep": "expert_parallel_degree",
        "schedule": "pipeline_parallel_schedule", "cp": "context_parallel_degree"}
MAX_NORM, BIAS_SPEED, LOCAL_BATCH = 0.5, 1e-3, 2


def job_config(options: dict[str, str]) -> JobConfig:
    config = JobConfig()
    config.training.seq_len, config.training.local_batch_size = int(options.pop("seq", 64)), LOCAL_BATCH
    config.training.max_norm, config.training.expert_bias_update_speed = MAX_NORM, BIAS_SPEED
    config.training.steps = 1
    config.lr_scheduler.warmup_steps = 0
    config.parallelism.pipeline_parallel_microbatch_size = 1
    config.job.dump_folder = "/tmp/titan_dsv4_parallel_worker"
    config.metrics.log_freq = 10**9
    for key, value in options.items():
        if key == "ac":
            config.activation_checkpoint.mode = value
        elif key == "sac":
            config.activation_checkpoint.selective_ac_option = value
        elif key == "mtp":
            config.mtp.num_layers = int(value)
        elif key == "indexer":
            config.training.indexer_loss_coeff = float(value)
        elif key == "schedule":
            config.parallelism.pipeline_parallel_schedule = value
        elif key == "qat":
            config.model.expert_qat = value
        elif key == "lora":  # adapters on every kind of target, the routed experts' (sharded by EP) included
            config.lora.rank, config.lora.target_modules = int(value), list(LORA_TARGETS)
        elif key == "compile":  # every block and the loss's chunk functions, with this backend
            config.compile.enable, config.compile.backend = True, value
            config.compile.components = ["model", "loss"]
        else:
            setattr(config.parallelism, KEYS[key], int(value))
    return config


def reference_step(trainer: Trainer, global_batch: int) -> dict:
    """The same step in one process: a fresh model, the whole global batch, torch's clip_grad_norm_."""
    args, config = trainer.model_args, trainer.config
    model = trainer.setup.spec.model_cls(args)
    model.init_weights(config.training.seed)
    model.train()
    model.set_mtp_loss_scale(config.mtp.loss_scaling_factor)
    model.set_expert_qat(config.model.expert_qat)
    if args.lora_rank:  # only the adapters train
        for name, p in model.named_parameters():
            p.requires_grad_(is_adapter(name))
    coeff, seq = config.training.indexer_loss_coeff, config.training.seq_len
    if coeff > 0:
        model.set_indexer_loss_scale(coeff / (global_batch * seq))
    else:
        for p in model.indexer_parameters():
            p.requires_grad_(False)
    data = build_dataloader(config.training.dataset, None, trainer.setup.tokenizer, seq, global_batch, 0, 1)
    batch = next(data)
    targets = build_targets(batch.labels, batch.positions, args.num_nextn_predict_layers)
    valid = (targets[..., 0] != -100).sum().float()
    loss_fn = trainer.setup.spec.build_loss_fn(config, args)
    loss_fn(model(batch.input_ids, batch.positions, targets=targets), targets, valid).backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], MAX_NORM)
    update_expert_bias([model], BIAS_SPEED, None)
    summary = summarise_parts(loss_fn.take_parts(), args.num_nextn_predict_layers, config.mtp.loss_scaling_factor)
    kl = sum(float(b) for n, b in model.named_buffers() if n.endswith("indexer.kl_sum"))
    summary["indexer_loss"] = kl / (global_batch * seq) if coeff > 0 else None
    return {"summary": summary, "norm": float(norm),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "biases": {n: b for n, b in model.named_buffers() if n.endswith("gate.bias")}}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run_case(options: dict[str, str]) -> dict:
    config = job_config(options)
    torch._dynamo.utils.counters.clear()
    trainer = Trainer(config, validate(config, dist.get_world_size()))
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def capture_then_step(*a, **k):  # the gradients the optimizer sees: after PP ties, FSDP and clipping
        for part in trainer.model_parts:
            for name, p in part.named_parameters():
                if p.grad is not None and id(p) not in (trainer.pipeline.ties.followers if trainer.pipeline
                                                        else set()):
                    grads[canonical_fqn(name)] = full(p.grad)
        return step(*a, **k)

    trainer.optimizer.step = capture_then_step
    summary = trainer.train_step()
    ref = reference_step(trainer, trainer.setup.global_batch_size)

    err = {"loss": 0.0, "grad": 0.0, "norm": abs(summary["grad_norm"] - ref["norm"]) / ref["norm"], "bias": 0.0}
    for key in ("loss", "total_loss"):
        err["loss"] = max(err["loss"], abs(summary[key] - ref["summary"][key]) / abs(ref["summary"][key]))
    if ref["summary"]["indexer_loss"] is not None:
        got, want = summary["indexer_loss"], ref["summary"]["indexer_loss"]
        err["loss"] = max(err["loss"], abs(got - want) / abs(want))
    for got, want in zip(summary["mtp_losses"], ref["summary"]["mtp_losses"], strict=True):
        err["loss"] = max(err["loss"], abs(got - want) / abs(want))
    worst = ("", 0.0)
    for name, grad in grads.items():
        want = ref["grads"][name]
        e = float((grad - want).abs().max() / want.abs().max().clamp(min=1e-8))
        err["grad"] = max(err["grad"], e)
        worst = max(worst, (name, e), key=lambda w: w[1])
    moved = 0.0
    for part in trainer.model_parts:
        for name, bias in part.named_buffers():
            if canonical_fqn(name).endswith("gate.bias"):
                err["bias"] = max(err["bias"], float((bias - ref["biases"][canonical_fqn(name)]).abs().max()))
                moved = max(moved, float(bias.abs().max()))
    expert_mesh = [list(p.device_mesh.mesh_dim_names) for part in trainer.model_parts
                   for n, p in part.named_parameters() if n.endswith("experts.w1") and isinstance(p, DTensor)][:1]
    names = sorted(ref["grads"])
    covered = torch.tensor([n in grads for n in names], dtype=torch.long)
    dist.all_reduce(covered)
    breaks = torch._dynamo.utils.counters["graph_break"]  # the Trainer's step only
    result = torch.tensor([err["loss"], err["grad"], err["norm"], err["bias"], moved,
                           float(sum(n not in ref["grads"] for n in grads))])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    worsts = [None] * dist.get_world_size()
    dist.all_gather_object(worsts, worst)
    trainer.dataloader.close()
    trainer.metrics.close()
    return {"loss_rel_err": float(result[0]), "grad_rel_err": float(result[1]), "norm_rel_err": float(result[2]),
            "expert_bias_err": float(result[3]), "expert_bias_moved": float(result[4]),
            "unexpected_grads": int(result[5]), "uncovered_params": int((covered == 0).sum()),
            "graph_breaks": sorted(breaks),  # this rank's reasons
            "worst_grad": max(worsts, key=lambda w: w[1])[0], "reference_norm": ref["norm"],
            "expert_mesh": expert_mesh[0] if expert_mesh else []}


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:]
    init_distributed(torch.device("cpu"))
    results = {}
    for case in cases:
        name, _, spec = case.partition("=")
        options = dict(item.split(":") for item in spec.split(",") if item)
        results[name] = run_case(options)
    finish_worker(out, results)


if __name__ == "__main__":
    run_worker(main)
