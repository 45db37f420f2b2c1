"""The trainer: ``python -m titan_dsv4.train --job.config_file X.toml [--section.key value ...]``.

Works as one plain process and under ``torchrun`` (gloo on CPU, NCCL on CUDA). Configuration problems end
the run with exit code 2 and one line on stderr before any process group or model exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.profiler import record_function

from .components.checkpoint import (
    CheckpointError,
    CheckpointManager,
    complete_steps,
    load_model_only,
    model_state,
)
from .components.dataloader import DataError, build_dataloader, read_batches
from .components.garbage_collection import GarbageCollection
from .components.hf_checkpoint import load_hf_into, stage_export, write_index, write_shards
from .components.load_balance import gather_max_violations, learned_routing_moes, update_expert_bias
from .components.loss import build_targets, summarise_parts
from .components.metrics import MetricsLogger, device_peak_tflops, format_duration, loss_parts, memory_record
from .components.optimizer import build_lr_scheduler, build_optimizer, unique_trainable_parameters
from .components.profiling import StepProfiler
from .config import ConfigError, JobConfig, config_help, config_to_dict, load_config, print_help
from .config.validate import RunSetup, describe_run, validate_run
from .distributed.context_parallel import ContextParallel
from .distributed.utils import (
    all_reduce_sum,
    clip_grad_norm_,
    init_distributed,
    launched_world_size,
    pick_device,
    reduce_replicated_grads,
    set_collective_timeout,
    shutdown_distributed,
)
from .models.deepseek_v4.lora import freeze_all_but_adapters
from .models.deepseek_v4.mtp import IGNORE_INDEX


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, config: JobConfig, setup: RunSetup):
        self.config, self.setup = config, setup
        self.tokens_per_step = setup.global_batch_size * config.training.seq_len  # the whole global batch
        self.device = pick_device()
        init_distributed(self.device, config.comm.init_timeout_seconds)
        dims = self.parallel_dims = setup.parallel_dims
        self.distributed = dist.is_initialized()
        if self.distributed:
            dims.build_mesh(self.device.type)
        self.rank = dist.get_rank() if self.distributed else 0
        torch.manual_seed(config.training.seed)
        if config.training.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        self.model_args = setup.model_args
        self.num_mtp = self.model_args.num_nextn_predict_layers
        self.learned_routing_moes = learned_routing_moes(self.model_args)
        self._cut_reported: set[str] = set()  # the data ("training", "validation") said to cut conversations
        self._validation_first_cut: int | None = None
        self._check_training_data()
        self.validation_batches = self._read_validation_batches() if config.validation.enable else []
        if self.rank == 0:
            print(f"titan_dsv4: {describe_run(config, setup, dist.get_world_size() if self.distributed else 1)}",
                  flush=True)
            report_config(config)
        self._warn_if_cut(self._validation_first_cut, "validation")
        self.loss_fn = setup.spec.build_loss_fn(config, self.model_args)
        self.dp_cp_group = dims.dp_cp_group() if self.distributed else None
        self.context_parallel = (ContextParallel(dims.cp_group(), self.model_args.context_parallel_halo)
                                 if dims.cp_enabled else None)
        self.pp_group = dims.mesh["pp"].get_group() if self.distributed and dims.pp_enabled else None
        self.dataloader = build_dataloader(  # the next step's batches are read while this one computes
            config.training.dataset, config.training.dataset_path, setup.tokenizer, config.training.seq_len,
            config.training.local_batch_size, dims.dp_rank(), dims.dp, prefetch=setup.grad_accum_steps,
            shuffle_seed=config.training.seed if config.training.shuffle else None)

        # rank 0 decides before the model exists: weights a checkpoint load overwrites are not drawn first
        resume = self._resume_step()
        self._checkpoint_follows = resume is not None or bool(config.checkpoint.initial_load_path)
        model = setup.meta_model
        if model is None:
            with torch.device("meta"):
                model = setup.spec.model_cls(self.model_args)
        self.pipeline = None
        if dims.pp_enabled:
            pp_mesh = dims.mesh["pp"]
            self.pipeline = setup.spec.pipelining_fn(
                model, setup.pipeline_plan, pp_mesh.get_local_rank(), pp_mesh.get_group(), dims.mesh.mesh,
                self.device, self.loss_fn, self._parallelize_and_materialize, config.training.seq_len // dims.cp,
                self._activation_dtype())
            self.model_parts = self.pipeline.model_parts
        else:
            self.model_parts = [self._parallelize_and_materialize(model)]
        for part in self.model_parts:
            part.train()
        local_followers = self.pipeline.ties.local_followers if self.pipeline else set()
        followers = self.pipeline.ties.followers if self.pipeline else set()
        params = [p for p in unique_trainable_parameters(self.model_parts) if id(p) not in local_followers]
        self.norm_params = [p for p in params if id(p) not in followers]  # replicas count once
        matrices = {id(p): n for part in self.model_parts for p, n in part.matrix_parameters()}
        self.optimizer = build_optimizer(params, config.optimizer, matrices)
        schedule_steps = config.lr_scheduler.total_steps or config.training.steps
        self.lr_scheduler = build_lr_scheduler(self.optimizer, schedule_steps, config.lr_scheduler)
        self.metrics = MetricsLogger(config.job.dump_folder, enabled=self.rank == 0,
                                     color=not config.metrics.disable_color_printing)
        self.step = 0
        ck = config.checkpoint
        self.checkpointer = None
        if ck.enable:
            self.checkpointer = CheckpointManager(Path(config.job.dump_folder) / ck.folder, self.model_parts,
                                                  self.optimizer, followers, ck.keep_latest_k,
                                                  ck.async_mode == "async",
                                                  self.model_args.to_hf_config(adapters=True))
        # groups made since init_process_group (meshes, pipeline ties) get the start-up timeout too
        self._steady_timeout = self._validated = False
        set_collective_timeout(config.comm.init_timeout_seconds)
        if resume is not None:
            self._restore(self.checkpointer.load(resume))
        elif ck.initial_load_path:
            if ck.initial_load_in_hf:
                for part in self.model_parts:  # each rank reads only its stages' tensors (and FSDP-shards them)
                    load_hf_into(part, ck.initial_load_path)
            elif ck.initial_load_model_only:
                load_model_only(self.model_parts, ck.initial_load_path)
            else:  # a whole training state from elsewhere: continue that run in this folder
                self._restore(self.checkpointer.load_from(Path(ck.initial_load_path)))
        if self.pipeline is not None and (resume is not None or ck.initial_load_path):
            self.pipeline.ties.copy_from_source()
        if self.step == 0:  # nothing resumed: this run's metrics.jsonl starts empty
            self.metrics.start_fresh()
        m = config.metrics
        self.metrics.open_dashboards(m.save_tb_folder if m.enable_tensorboard else None,
                                     dataclasses.asdict(config) if m.enable_wandb else None, resume)
        self._signal: int | None = None
        self._grace_timer: threading.Timer | None = None
        self.last_record: dict | None = None  # the last logged step's (the final step is always logged)
        self.run_time = (0, 0.0)  # steps this process ran, and their seconds

    # ------------------------------------------------------------------ checkpoints
    def _resume_step(self) -> int | None:
        """The checkpoint to continue from: ``load_step``, else the latest complete one (rank 0 decides)."""
        ck = self.config.checkpoint
        if not ck.enable:
            return None
        steps = complete_steps(Path(self.config.job.dump_folder) / ck.folder)
        choice = [ck.load_step if ck.load_step >= 0 else (steps[-1] if steps else None)]
        if self.distributed:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _trainer_state(self) -> dict:
        return {"step": self.step, "dataloader": self.dataloader.state_dict(), "rng": torch.get_rng_state()}

    def _restore(self, state: dict) -> None:
        self.step = int(state["step"])
        # the learning rate is this run's schedule at the step (it steps once per step, skipped ones too), so
        # a resumed run may change `optimizer.lr` or the optimizer (Muon has another number of groups)
        scheduler = self.lr_scheduler
        scheduler.last_epoch = self.step
        for group, base_lr, multiplier in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * multiplier(self.step)
        self.dataloader.load_state_dict(state["dataloader"])
        torch.set_rng_state(state["rng"])
        self.metrics.drop_after(self.step)  # records of steps the interrupted run did after this checkpoint
        if self.rank == 0:
            print(f"titan_dsv4: resumed at step {self.step}", flush=True)

    def save_checkpoint(self, model_only: bool = False) -> None:
        with self._long_collectives(), record_function("titan_dsv4/checkpoint"):
            self.checkpointer.save(self.step, self._trainer_state(), model_only)

    def finish_checkpoints(self) -> None:
        """Wait for an async save to be written and committed."""
        with self._long_collectives():
            self.checkpointer.wait()

    def _use_steady_timeout(self) -> None:
        """After the first step (compiled, loaded, in step) collectives get ``comm.train_timeout_seconds``;
        async saves keep the long one (their ranks finish writing at their own pace)."""
        self._steady_timeout = True
        keep = [self.checkpointer.async_group] if self.checkpointer is not None else []
        set_collective_timeout(self.config.comm.train_timeout_seconds, keep)

    @contextlib.contextmanager
    def _long_collectives(self):
        """Saves, exports and the first validation (which may compile) keep ranks apart for longer than a
        step: the start-up timeout while they run."""
        if not self._steady_timeout:
            yield
            return
        set_collective_timeout(self.config.comm.init_timeout_seconds)
        try:
            yield
        finally:
            self._use_steady_timeout()

    def _activation_dtype(self) -> torch.dtype:
        """dtype of the stream between stages: FSDP's param dtype on GPU, else the fp32 parameters'."""
        if self.device.type == "cuda" and self.parallel_dims.dp_enabled:
            return getattr(torch, self.config.training.mixed_precision_param)
        return torch.float32

    def _parallelize_and_materialize(self, part: nn.Module) -> nn.Module:
        """parallelize_fn, then allocate on the device and init deterministically per FQN."""
        part = self.setup.spec.parallelize_fn(part, self.parallel_dims, self.config, self.device)
        part.to_empty(device=self.device)
        part.init_weights(self.config.training.seed, checkpoint_follows=self._checkpoint_follows)
        part.set_mtp_loss_scale(self.config.mtp.loss_scaling_factor)
        part.set_attention_kernel(self.config.model.attention_kernel)
        part.set_sinkhorn_kernel(self.config.model.sinkhorn_kernel)
        part.set_expert_qat(self.config.model.expert_qat)
        part.set_attention_qat(self.config.model.attention_qat)
        part.set_sequence_shard(self.context_parallel)
        coeff = self.config.training.indexer_loss_coeff
        if coeff > 0:  # the KL is summed per token: normalise by the global batch's token count
            part.set_indexer_loss_scale(coeff / self.tokens_per_step)
        else:  # top-k selection gives them no gradient from the LM loss: frozen, and not in the optimizer
            for p in part.indexer_parameters():
                p.requires_grad_(False)
        if self.model_args.lora_rank:
            freeze_all_but_adapters(part)
        return part

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step; its phases are named ranges in profiler traces (``titan_dsv4/...``)."""
        with record_function("titan_dsv4/data_wait"):
            loading = time.perf_counter()
            batches = [next(self.dataloader) for _ in range(self.setup.grad_accum_steps)]
            loading = time.perf_counter() - loading
            inputs = [self._this_shard(b) for b in batches]
            valid = torch.tensor(sum(int((t[..., 0] != IGNORE_INDEX).sum()) for *_, t in inputs), dtype=torch.float32)
            # a batch without labels (conversations whose answers were all cut) has zero loss and gradient
            global_valid = all_reduce_sum(valid.to(self._comm_device()), self.dp_cp_group).to(self.device)
            global_valid.clamp_(min=1)
        with record_function("titan_dsv4/forward_backward"):
            for ids, pos, target in inputs:
                if self.pipeline is not None:
                    self.pipeline.step(ids, pos, target, global_valid)
                else:
                    self.loss_fn(self.model_parts[0](ids, pos, targets=target), target, global_valid).backward()
        with record_function("titan_dsv4/gradients"):  # tied replicas, replicated parameters, clipping
            if self.pipeline is not None:
                self.pipeline.ties.reduce_grads()
            reduce_replicated_grads(self.norm_params, self.dp_cp_group)
            grad_norm = clip_grad_norm_(self.norm_params, self.config.training.max_norm, self.pp_group)
            n_calls = len(batches) * (self.pipeline.plan.n_microbatches if self.pipeline else 1)
            summary = self._summarise_losses(self.loss_fn.take_parts(last=n_calls))
        lr = self.optimizer.param_groups[0]["lr"]
        summary.update(grad_norm=float(grad_norm), lr=lr, indexer_loss=self._take_indexer_loss(), skipped=False,
                       data_loading_s=loading)

        finite = all(map(math.isfinite, (summary["total_loss"], summary["grad_norm"])))  # same on every rank
        if not finite and not self.config.training.skip_nonfinite_steps:
            raise NonFiniteError(f"non-finite loss or gradient norm at step {self.step + 1} (loss "
                                 f"{summary['total_loss']}, grad_norm {summary['grad_norm']}); set "
                                 "training.skip_nonfinite_steps = true to skip such steps instead")
        with record_function("titan_dsv4/optimizer"):
            if finite:
                self.optimizer.step()
                if self.pipeline is not None:
                    self.pipeline.ties.after_optimizer_step()
            summary["skipped"] = not finite
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with record_function("titan_dsv4/expert_balance"):
            violations = update_expert_bias(self.model_parts,
                                            self.config.training.expert_bias_update_speed if finite else 0.0,
                                            self.dp_cp_group)
            summary["moe_max_violation"] = gather_max_violations(violations, self.learned_routing_moes,
                                                                 self.pp_group, self._comm_device())
        return summary

    def _this_shard(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's input ids, positions and targets (main + MTP depths, built from the whole sequences) on
        the device: under context parallelism, this rank's shard of each sequence."""
        target = build_targets(batch.labels, batch.positions, self.num_mtp)
        tensors = (batch.input_ids, batch.positions, target)
        if self.context_parallel is not None:
            tensors = tuple(self.context_parallel.part(t) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    def _summarise_losses(self, parts: torch.Tensor | None) -> dict:
        """The logged losses from this rank's loss parts, summed over all ranks (last-stage ranks hold them;
        others add zeros)."""
        if parts is None:
            parts = torch.zeros(2 + 3 * self.num_mtp, dtype=torch.float64)
        if self.distributed:
            parts = parts.to(self._comm_device())
            dist.all_reduce(parts)
        return summarise_parts(parts.cpu(), self.num_mtp, self.config.mtp.loss_scaling_factor)

    def _check_training_data(self) -> None:
        """Read the corpus's first sequence now, so data the reader cannot parse (a wrong jsonl field, say) is
        a config error before any model is built; a file broken further in fails when reached, naming it."""
        t = self.config.training
        loader = build_dataloader(t.dataset, t.dataset_path, self.setup.tokenizer, t.seq_len, 1, 0, 1)
        try:
            loader.sequences.next_sequence()
        except ValueError as e:
            raise ConfigError(f"{_data_source('training', t.dataset, t.dataset_path)}: {e}") from None

    def _read_validation_batches(self) -> list:
        """This rank's share of the validation batches, read and tokenized once: every validation reuses
        them, so its values compare across steps."""
        v, t = self.config.validation, self.config.training
        dims = self.parallel_dims
        loader = build_dataloader(v.dataset, v.dataset_path, self.setup.tokenizer, t.seq_len, t.local_batch_size,
                                  dims.dp_rank(), dims.dp, split="validation")
        try:
            batches = read_batches(loader, v.steps)
        except ValueError as e:
            raise ConfigError(f"{_data_source('validation', v.dataset, v.dataset_path)} (steps = {v.steps}): "
                              f"{e}") from None
        self._validation_first_cut = loader.sequences.first_cut
        return batches

    def _warn_if_cut(self, first_cut: int | None, section: str) -> None:
        """Once per data section: rank 0 says conversations are being cut (``first_cut``: the first one's
        tokens), so what they lose is not trained on unnoticed."""
        if self.rank == 0 and first_cut is not None and section not in self._cut_reported:
            seq_len = self.config.training.seq_len
            print(f"titan_dsv4: warning: {section} data: conversations longer than training.seq_len + 1 = "
                  f"{seq_len + 1} tokens are cut to that (the first one met has {first_cut} tokens); the rest of "
                  "each is left out. A larger training.seq_len keeps them whole.", flush=True)
            self._cut_reported.add(section)

    @torch.no_grad()
    def validate(self) -> dict:
        """Main and per-depth MTP loss and acceptance on the validation batches; the model in eval mode (it
        counts no expert loads and trains no indexer). The first runs under the start-up timeout (a compiled
        model compiles its eval graphs then)."""
        with contextlib.nullcontext() if self._validated else self._long_collectives(), \
                record_function("titan_dsv4/validation"):
            self._validated = True
            return self._validate()

    def _validate(self) -> dict:
        for part in self.model_parts:
            part.eval()
        try:
            for batch in self.validation_batches:
                ids, pos, target = self._this_shard(batch)
                if self.pipeline is not None:
                    self.pipeline.forward_only(ids, pos, target, self.loss_fn)
                else:
                    self.loss_fn(self.model_parts[0](ids, pos, targets=target), target)
        finally:
            for part in self.model_parts:
                part.train()
                for module in part.modules():  # what forward left gathered (FSDP under PP keeps it)
                    if isinstance(module, FSDPModule):
                        module.reshard()
        summary = self._summarise_losses(self.loss_fn.take_parts())
        return {key: summary[key] for key in ("loss", "mtp_losses", "mtp_acceptance", "valid_tokens")}

    def _take_indexer_loss(self) -> float | None:
        """Mean per-token indexer KL of this step, summed over CSA layers (None while the indexer is frozen)."""
        if self.config.training.indexer_loss_coeff <= 0:
            return None
        buffers = [b for part in self.model_parts for n, b in part.named_buffers() if n.endswith("indexer.kl_sum")]
        total = torch.stack(buffers).sum() if buffers else torch.zeros((), dtype=torch.float64)
        for b in buffers:
            b.zero_()
        if self.distributed:
            total = total.to(self._comm_device())
            dist.all_reduce(total)
        return float(total) / self.tokens_per_step

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------ loop
    def train(self) -> bool:
        """Run to ``training.steps``; False if a preemption signal stopped it early (after a save)."""
        cfg = self.config
        peak = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        world = dist.get_world_size() if self.distributed else 1
        flops_per_token = self.model_args.training_flops_per_token(  # MTP included
            cfg.training.seq_len, indexer_trained=cfg.training.indexer_loss_coeff > 0)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        profiler = StepProfiler(cfg.profiling, cfg.job.dump_folder, self.rank, self.step)
        collector = GarbageCollection(cfg.training.gc_freq)
        first_step, run_start = self.step, time.perf_counter()
        try:
            while self.step < cfg.training.steps:
                start = time.perf_counter()
                try:
                    summary = self.train_step()
                except DataError:  # every rank reads the whole stream: all meet it here, before any compute
                    if self.checkpointer is not None:
                        if self.step > first_step and self.step % cfg.checkpoint.interval:
                            self.save_checkpoint()
                        self.finish_checkpoints()
                    raise
                self.step += 1
                elapsed = time.perf_counter() - start
                if self.step == first_step + 1:
                    self._use_steady_timeout()
                    if cfg.compile.enable:
                        self._report_graph_breaks()
                self._warn_if_cut(self.dataloader.sequences.first_cut, "training")
                last = self.step == cfg.training.steps
                validate = cfg.validation.enable and (self.step % cfg.validation.freq == 0 or last)
                summary["validation"] = self.validate() if validate else None
                if self.step % cfg.metrics.log_freq == 0 or last or validate:
                    tokens_per_sec = self.tokens_per_step / elapsed
                    mfu = flops_per_token * tokens_per_sec / (world * peak * 1e12) if peak else None
                    record = {"step": self.step, **summary, "tokens_per_sec": tokens_per_sec,
                              "step_time_s": elapsed, **memory_record(self.device), "mfu": mfu}
                    per_step = (time.perf_counter() - run_start) / (self.step - first_step)
                    self.metrics.log(record, cfg.training.steps, per_step * (cfg.training.steps - self.step))
                    self.last_record = record
                self.run_time = (self.step - first_step, time.perf_counter() - run_start)
                if self._preempted():
                    if self.checkpointer is not None:
                        self.save_checkpoint()
                        self.finish_checkpoints()
                    if self._grace_timer is not None:
                        self._grace_timer.cancel()
                    return False
                if self.checkpointer is not None and self._save_due():
                    self.save_checkpoint(model_only=last and cfg.checkpoint.last_save_model_only)
                profiler.step(self.step)
                collector.step(self.step)
            if self.checkpointer is not None:
                self.finish_checkpoints()
            return True
        except torch.OutOfMemoryError:
            profiler.snapshot_oom()
            raise
        finally:
            profiler.close()
            collector.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _save_due(self) -> bool:
        ck = self.config.checkpoint
        return (self.step % ck.interval == 0 or self.step == self.config.training.steps
                or (self.step == 1 and ck.enable_first_step_checkpoint))

    def report_end(self, export: Path | None) -> None:
        """Rank 0's closing lines: the final losses, the run's throughput, and where its outputs are."""
        if self.rank != 0 or self.last_record is None:
            return
        record, (steps, seconds) = self.last_record, self.run_time
        losses = "  ".join(loss_parts(record))
        if record.get("validation"):
            losses += "  | validation " + "  ".join(loss_parts(record["validation"]))
        tokens_per_sec = self.tokens_per_step * steps / seconds
        lines = [f"titan_dsv4: finished step {self.step}: {losses}",
                 f"  {steps} steps in {format_duration(seconds)}, {tokens_per_sec:,.0f} tokens/s",
                 f"  metrics:    {self.metrics.path}"]
        if self.checkpointer is not None:
            lines.append(f"  checkpoint: {self.checkpointer.folder / f'step-{self.step}'}")
        if export is not None:
            lines.append(f"  export:     {export}")
        print("\n".join(lines), flush=True)

    def _report_graph_breaks(self) -> None:
        """After the first compiled step: each graph break splits a block into graphs run with Python in
        between (slower, and no fusion across it). The GPU paths have none; CPU's per-expert loop has one."""
        breaks = torch._dynamo.utils.counters["graph_break"]
        if breaks:
            reasons = "; ".join(sorted({reason.splitlines()[0] for reason in breaks}))
            print(f"titan_dsv4: rank {self.rank}: compile: {sum(breaks.values())} graph breaks ({reasons})",
                  flush=True)
        elif self.rank == 0:
            print("titan_dsv4: compile: no graph breaks", flush=True)

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal is None:
            self._signal = signum
            grace = self.config.checkpoint.preemption_grace_s
            if self.rank == 0:
                print(f"titan_dsv4: got {signal.Signals(signum).name}: saving after this step "
                      f"(giving up after {grace:.0f}s)", flush=True)
            self._grace_timer = threading.Timer(grace, self._give_up)
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def _give_up(self) -> None:
        print(f"titan_dsv4: preemption grace period of {self.config.checkpoint.preemption_grace_s:.0f}s "
              "exceeded; exiting without a new checkpoint", file=sys.stderr, flush=True)
        os._exit(1)

    def _preempted(self) -> bool:
        """Whether any rank got a preemption signal (all ranks stop at the same step)."""
        flag = torch.tensor([0.0 if self._signal is None else 1.0], device=self._comm_device())
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def export_hf(self) -> Path:
        """Write the weights in the released HF layout, streamed: each rank writes the routed experts it holds,
        the first rank of each stage its other tensors (gathered over FSDP one at a time), and global rank 0
        ``config.json`` and the index last."""
        cfg = self.config
        path = Path(cfg.job.dump_folder) / cfg.checkpoint.folder / f"step-{self.step}-hf"
        with self._long_collectives():  # the stages' first ranks write while the others wait
            dp_cp_rank = self.parallel_dims.dp_cp_rank()
            source = stage_export(model_state(self.model_parts), dp_cp_rank == 0, self.model_args.lora_scaling)
            result = ({}, 0)
            quantize = None if cfg.checkpoint.export_quantize == "none" else cfg.checkpoint.export_quantize
            if source is not None:
                pairs, first_expert = source
                pp_rank = self.parallel_dims.mesh["pp"].get_local_rank() if self.distributed else 0
                # quantised from the weights as the forward computed with them: QAT exports what it trained
                result = write_shards(
                    pairs, path, getattr(torch, cfg.checkpoint.export_dtype), quantize,
                    lambda i, n: f"model-pp{pp_rank:03d}-dp{dp_cp_rank:05d}-{i:05d}-of-{n:05d}.safetensors",
                    quantize_from=self._activation_dtype(), first_expert=first_expert)
            results = [result]
            if self.distributed:
                results = [None] * dist.get_world_size()
                dist.all_gather_object(results, result)
            if self.rank == 0:
                weight_map = {k: f for m, _ in results for k, f in m.items()}
                write_index(path, weight_map, sum(n for _, n in results), self.model_args, quantize)
            if self.distributed:
                dist.barrier()
        return path

    def close(self) -> None:
        self.dataloader.close()
        self.metrics.close()
        shutdown_distributed()


def report_config(config: JobConfig) -> None:
    """``job.print_config``: every key's value on the console; ``job.save_config_file``: as JSON under the dump
    folder."""
    values = config_to_dict(config)
    if config.job.print_config:
        print("titan_dsv4: config\n" + json.dumps(values, indent=2), flush=True)
    if config.job.save_config_file:
        path = Path(config.job.dump_folder) / config.job.save_config_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2) + "\n")


def _data_source(section: str, dataset: str, path: str | None) -> str:
    """The key and value that name a dataset in an error: its path for files, else its name."""
    return f"`{section}.dataset` = {dataset!r}" if dataset == "pydocs" else f"`{section}.dataset_path` = {path!r}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports a config error
    try:
        reference = config_help(argv, "python -m titan_dsv4.train [--job.config_file FILE.toml] "
                                      "[--section.key VALUE ...]")
        if reference is not None:
            if first_rank:
                print_help(reference)
            return 0
        config = load_config(argv)
        setup = validate_run(config, launched_world_size())
    except ConfigError as e:
        report_error("config error", e, first_rank)
        return 2
    try:
        trainer = Trainer(config, setup)
    except (ConfigError, CheckpointError) as e:  # layout problems only torch can judge; checkpoints that do not fit
        # found by the ranks that hold the stage or tensor, not necessarily rank 0: each says which it is
        rank = f" (rank {os.environ['RANK']})" if launched_world_size() > 1 else ""
        report_error(f"{'config' if isinstance(e, ConfigError) else 'checkpoint'} error{rank}", e, True)
        shutdown_distributed()
        return 2
    try:
        finished = trainer.train()  # other exceptions propagate: torchrun tears the whole group down
    except NonFiniteError as e:
        report_error("stopping", e, trainer.rank == 0)
        trainer.close()
        return 3
    except DataError as e:
        saved = (f"; step {trainer.step} is checkpointed: mend the data and rerun the same command to resume"
                 if trainer.checkpointer is not None and trainer.step > 0 else "")
        report_error(f"data error reading step {trainer.step + 1}", f"{e}{saved}", trainer.rank == 0)
        trainer.close()
        return 4
    export = trainer.export_hf() if finished and config.checkpoint.last_save_in_hf else None
    trainer.report_end(export)
    trainer.close()
    return 0


def report_error(kind: str, error: object, printing: bool) -> None:
    if printing:
        print(f"titan_dsv4: {kind}: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
