"""Job configuration: torchtitan 0.2.x sections and keys, plus ``[mtp]``.

Every field is documented by its comment; ``docs/config.md`` is generated from nothing but this file's
reading, so keep names and defaults here authoritative.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    config_file: str | None = None  # TOML file the other values come from
    dump_folder: str = "./outputs"  # metrics, checkpoints and TensorBoard go under here
    description: str = "titan_dsv4 training job"


@dataclass
class Model:
    name: str = "deepseek_v4"  # registry name
    flavor: str = "debugmodel"  # debugmodel | debugmodel_mtp2 | flash | pro
    hf_assets_path: str | None = None  # HF checkpoint folder (config.json, tokenizer.json, safetensors)
    tokenizer_path: str | None = None  # tokenizer.json or a folder holding it; default: hf_assets_path or the
    # embedded debug tokenizer


@dataclass
class Optimizer:
    name: str = "AdamW"  # AdamW
    lr: float = 8e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    implementation: str = "foreach"  # for-loop | foreach | fused (fused needs CUDA)


@dataclass
class LRScheduler:
    warmup_steps: int = 2  # linear warmup from lr/(warmup+1)
    decay_ratio: float | None = None  # share of steps spent decaying at the end; None = decay after warmup
    decay_type: str = "linear"  # linear | sqrt | cosine
    min_lr_factor: float = 0.0  # lr floor as a fraction of optimizer.lr


@dataclass
class Training:
    dataset: str = "pydocs"  # pydocs (embedded: docstrings of Python's standard library) | text
    dataset_path: str | None = None  # .txt / .jsonl / .parquet file or folder (dataset = "text")
    local_batch_size: int = 8  # sequences per data-parallel rank per step
    global_batch_size: int = -1  # -1: local_batch_size x data-parallel degree; larger -> grad accumulation
    seq_len: int = 256
    steps: int = 30
    max_norm: float = 1.0  # gradient clipping (<= 0 disables)
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms
    mixed_precision_param: str = "bfloat16"  # FSDP param dtype on GPU (CPU runs keep float32)
    mixed_precision_reduce: str = "float32"
    expert_bias_update_speed: float = 1e-3  # aux-loss-free balancing step (0 disables)
    # lightning indexer: 0 freezes it (fine-tuning released weights); > 0 trains it with this weight on the
    # per-token KL to the main attention (DeepSeek-V3.2's indexer loss; needed when pre-training)
    indexer_loss_coeff: float = 0.0
    skip_nonfinite_steps: bool = False  # a NaN/inf loss or gradient norm: False stops the run, True skips the update


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    data_parallel_shard_degree: int = -1  # -1: whatever the world size leaves
    fsdp_reshard_after_forward: str = "default"  # default | always | never (default: never under PP)
    pipeline_parallel_degree: int = 1
    pipeline_parallel_schedule: str = "1F1B"
    pipeline_parallel_schedule_csv: str = ""  # a CSV schedule file overrides pipeline_parallel_schedule
    pipeline_parallel_microbatch_size: int = 1
    pipeline_parallel_layers_per_stage: int | None = None
    pipeline_parallel_first_stage_less_layers: int = 1
    pipeline_parallel_last_stage_less_layers: int = 1
    module_fqns_per_model_part: list[list[str]] | None = None
    expert_parallel_degree: int = 1


@dataclass
class Checkpoint:
    enable: bool = False
    folder: str = "checkpoint"  # under job.dump_folder
    interval: int = 500
    initial_load_path: str | None = None
    initial_load_in_hf: bool = False
    initial_load_model_only: bool = True  # False: also optimizer, step, data position (a DCP step-N folder)
    last_save_in_hf: bool = False
    last_save_model_only: bool = False
    export_dtype: str = "bfloat16"
    async_mode: str = "disabled"  # disabled | async
    keep_latest_k: int = 10  # 0 keeps all
    load_step: int = -1  # -1: the latest complete checkpoint
    # on SIGTERM / SIGUSR1 (preemption): finish the step, save, exit 0; give up (exit 1) after this long
    preemption_grace_s: float = 120.0


@dataclass
class ActivationCheckpoint:
    mode: str = "none"  # none | full | selective
    # selective: "N" (an integer) recomputes every N-th block whole; "op" keeps each block's projection
    # GEMM outputs (linears, router, experts) and recomputes the rest, the attention core included
    selective_ac_option: str = "2"


@dataclass
class Compile:
    enable: bool = False
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    backend: str = "inductor"  # torch.compile backend (inductor | aot_eager | eager)


@dataclass
class Metrics:
    log_freq: int = 1
    enable_tensorboard: bool = False
    save_tb_folder: str = "tb"
    disable_color_printing: bool = False
    peak_tflops: float | None = None  # one device's bf16 peak for MFU; None: known GPUs by name (null on CPU)


@dataclass
class MTP:
    num_layers: int | None = None  # None: the model's num_nextn_predict_layers; 0 disables MTP
    loss_scaling_factor: float = 0.3  # lambda in main + lambda/D * sum(mtp)


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    metrics: Metrics = field(default_factory=Metrics)
    mtp: MTP = field(default_factory=MTP)
