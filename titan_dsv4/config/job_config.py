"""Job configuration: torchtitan 0.2.x sections and keys, plus ``[mtp]``.

Every field is documented by its comment (the one after it, or the lines above one that has none):
``--help`` prints them beside each value, so keep names, defaults and comments here authoritative.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    config_file: str | None = None  # TOML file the other values come from
    dump_folder: str = "./outputs"  # metrics, checkpoints and TensorBoard go under here
    description: str = "titan_dsv4 training job"  # free text for the logs
    print_config: bool = False  # print every key's value at start-up (rank 0)
    save_config_file: str | None = None  # also write the config as JSON to this file under dump_folder


@dataclass
class Model:
    name: str = "deepseek_v4"  # registry name
    flavor: str = "debugmodel"  # debugmodel | debugmodel_mtp2 | flash | pro
    hf_assets_path: str | None = None  # HF checkpoint folder (config.json, tokenizer.json, safetensors)
    tokenizer_path: str | None = None  # tokenizer.json or a folder holding it; default: hf_assets_path or the
    # embedded debug tokenizer
    attention_kernel: str = "auto"  # auto: the fused Triton attention kernel on CUDA when Triton is installed
    # (CUDA builds of torch bring it), the blocked torch path elsewhere | torch: the torch path everywhere
    sinkhorn_kernel: str = "auto"  # auto: each mHC site's Sinkhorn as one Triton kernel each way on CUDA when
    # Triton is installed and hc_mult is a power of two, the torch Sinkhorn elsewhere | torch: everywhere
    expert_qat: str = "none"  # none | fp4 | fp8: routed experts train quantisation-aware, their forward
    # rounding each weight to the released instruct (fp4: E2M1, a power-of-two scale per row and 32 columns) or
    # Base (fp8: 128x128 blocks) format, gradients straight through; export in that format loses nothing
    attention_qat: bool = False  # the attention's activations rounded as the released inference code rounds
    # them, gradients straight through: the KV's non-RoPE dims in FP8 (what FP8 KV caches serve), the indexer's
    # queries and keys Hadamard-rotated and in FP4; for fine-tuning the released model (trained so)


@dataclass
class Optimizer:
    # AdamW | Muon (DeepSeek-V4's optimizer: Muon with hybrid Newton-Schulz for the matrices, AdamW for the
    # embeddings, LM head, norms, sinks, mHC biases and gates, compressor position biases)
    name: str = "AdamW"
    lr: float = 8e-4  # peak learning rate (after warmup); Muon shares it (its update RMS matches AdamW's)
    beta1: float = 0.9  # first-moment decay (AdamW)
    beta2: float = 0.95  # second-moment decay (AdamW)
    eps: float = 1e-8  # added to the second moment's root (AdamW)
    weight_decay: float = 0.1  # decoupled, on every parameter as in torchtitan (AdamW and Muon)
    implementation: str = "foreach"  # for-loop | foreach | fused: AdamW's kernels (fused on CPU too)
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    muon_update_rms: float = 0.18  # RMS of Muon's update per matrix before the lr (DeepSeek-V4: 0.18)


@dataclass
class LRScheduler:
    warmup_steps: int = 2  # linear warmup from lr/(warmup+1)
    total_steps: int | None = None  # steps the schedule spans (warmup, stable, decay); None: training.steps
    decay_ratio: float | None = None  # share of steps spent decaying at the end; None = decay after warmup
    decay_type: str = "linear"  # linear | sqrt | cosine
    min_lr_factor: float = 0.0  # lr floor as a fraction of optimizer.lr


@dataclass
class Training:
    # pydocs (embedded: docstrings of Python's standard library) | text | chat (conversations, DeepSeek-V4's
    # chat format; only the assistant messages are trained on) | pretokenized (either, tokenized ahead)
    dataset: str = "pydocs"
    # text: .txt / .jsonl (.gz, .zst) / .parquet file or folder ('text' field); chat: .jsonl / .parquet
    # ('messages' field); pretokenized: the folder python -m titan_dsv4.pretokenize wrote; pydocs reads none
    dataset_path: str | None = None
    local_batch_size: int = 8  # sequences per data-parallel rank per step
    global_batch_size: int = -1  # -1: local_batch_size x data-parallel degree; larger -> grad accumulation
    seq_len: int = 256  # tokens per sequence (documents are packed, each with its own positions)
    steps: int = 30  # optimizer steps of the whole run (a resumed run continues up to it)
    max_norm: float = 1.0  # gradient clipping (<= 0 disables)
    seed: int = 0  # weights (per FQN: the same for every layout) and data order
    # each epoch takes the documents in another order (drawn from seed and epoch); needs dataset pretokenized
    shuffle: bool = False
    deterministic: bool = False  # torch deterministic algorithms (on GPUs: the torch attention core, no atomics)
    mixed_precision_param: str = "bfloat16"  # FSDP param dtype on GPU (CPU runs keep float32)
    mixed_precision_reduce: str = "float32"  # dtype of FSDP's gradient reduce-scatter
    expert_bias_update_speed: float = 1e-3  # aux-loss-free balancing step (0 disables)
    # lightning indexer: 0 freezes it (fine-tuning released weights); > 0 trains it with this weight on the
    # per-token KL to the main attention (DeepSeek-V3.2's indexer loss; needed when pre-training)
    indexer_loss_coeff: float = 0.0
    skip_nonfinite_steps: bool = False  # a NaN/inf loss or gradient norm: False stops the run, True skips the update
    # Python's cycle collector runs only every this many steps, on every rank at the same step (automatic
    # collections at random moments on one rank stall the whole pipeline)
    gc_freq: int = 50


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1  # HSDP: replicas of the FSDP group
    data_parallel_shard_degree: int = -1  # -1: whatever the world size leaves
    fsdp_reshard_after_forward: str = "default"  # default | always | never (default: never under PP)
    pipeline_parallel_degree: int = 1  # pipeline ranks (MTP lives on the last stage)
    # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble | DualPipeV
    pipeline_parallel_schedule: str = "1F1B"
    pipeline_parallel_schedule_csv: str = ""  # a CSV schedule file overrides pipeline_parallel_schedule
    pipeline_parallel_microbatch_size: int = 1  # sequences per microbatch (local_batch_size / this microbatches)
    # decoder layers per stage, which sets the stage count; None: one stage per rank (two for interleaved and
    # V schedules)
    pipeline_parallel_layers_per_stage: int | None = None
    pipeline_parallel_first_stage_less_layers: int = 1  # the embedding counts as this many layers
    pipeline_parallel_last_stage_less_layers: int = 1  # the head, loss and MTP count as this many layers
    # explicit stages: module FQNs per stage, e.g. [["embed", "layers.0"], ["layers.1", "norm", "head"]]
    module_fqns_per_model_part: list[list[str]] | None = None
    expert_parallel_degree: int = 1  # experts split by expert over this many ranks, borrowed from FSDP
    # every sequence split into this many contiguous shards, one per rank (long context); FSDP shards over them
    context_parallel_degree: int = 1


@dataclass
class Checkpoint:
    enable: bool = False  # save DCP checkpoints and resume from the latest one
    folder: str = "checkpoint"  # under job.dump_folder
    interval: int = 500  # steps between checkpoints (the last step is always saved)
    enable_first_step_checkpoint: bool = False  # also save after the first step (proves the storage early)
    initial_load_path: str | None = None  # weights to start from when no checkpoint exists yet
    initial_load_in_hf: bool = False  # initial_load_path is a Hugging Face folder (the released checkpoint)
    initial_load_model_only: bool = True  # False: also optimizer, step, data position (a DCP step-N folder)
    last_save_in_hf: bool = False  # at the end, also export the weights in the released HF layout
    last_save_model_only: bool = False  # the final checkpoint without optimizer state
    export_dtype: str = "bfloat16"  # dtype of exported weights (tensors released in fp32 stay fp32)
    export_quantize: str = "none"  # none | fp8 (128x128-block FP8 weights and experts, as the Base release) |
    # fp4 (FP8 weights, FP4 routed experts, as the instruct release); rounded from the weights the forward used
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
    enable: bool = False  # torch.compile per block (around the experts under expert parallelism)
    # model: each decoder and MTP block; loss: the fused cross-entropy's chunk functions
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    backend: str = "inductor"  # torch.compile backend (inductor | aot_eager | eager)


@dataclass
class Metrics:
    log_freq: int = 1  # steps between console lines and metrics.jsonl records
    enable_tensorboard: bool = False  # needs the metrics extra (pip install titan_dsv4[metrics])
    save_tb_folder: str = "tb"  # under job.dump_folder
    # Weights & Biases (pip install titan_dsv4[wandb]); WANDB_PROJECT (default titan_dsv4), WANDB_ENTITY,
    # WANDB_NAME, WANDB_MODE=offline etc. from the environment; a resumed run continues its W&B run
    enable_wandb: bool = False
    disable_color_printing: bool = False  # plain console lines (colour only on a terminal anyway)
    peak_tflops: float | None = None  # one device's bf16 peak for MFU; None: known GPUs by name (null on CPU)


@dataclass
class Validation:
    enable: bool = False  # held-out loss (main, every MTP depth, acceptance) every `freq` steps and at the end
    # pydocs: the embedded corpus's held-out documents (training never reads them) | text | chat | pretokenized:
    # dataset_path
    dataset: str = "pydocs"
    dataset_path: str | None = None  # as training.dataset_path
    freq: int = 10  # steps between validations
    # global batches per validation (training's local_batch_size and seq_len; the same batches every time);
    # -1: every full global batch of one pass over the dataset
    steps: int = -1


@dataclass
class Profiling:
    enable_profiling: bool = False  # torch profiler traces (Chrome/Perfetto JSON), one per rank
    save_traces_folder: str = "profile_traces"  # under job.dump_folder: iteration_{step}/rank{r}_trace.json
    profile_freq: int = 10  # steps between traces (and memory snapshots): the last step of each cycle is traced
    profiler_warmup: int = 3  # steps the profiler runs untraced before each traced one
    profiler_active: int = 1  # steps in each trace
    # CUDA allocator history (every allocation with its stack), dumped every profile_freq steps and on
    # out-of-memory; view at pytorch.org/memory_viz
    enable_memory_snapshot: bool = False
    save_memory_snapshot_folder: str = "memory_snapshot"  # under job.dump_folder


@dataclass
class Comm:
    # how long a collective may wait for the other ranks before the job fails: start-up (loading the
    # released checkpoint from shared storage), the first step (compiling), the first validation, checkpoint
    # saves and the HF export
    init_timeout_seconds: int = 1800
    train_timeout_seconds: int = 300  # every other step: a hung or dead rank ends the job this soon


@dataclass
class MTP:
    num_layers: int | None = None  # None: the model's num_nextn_predict_layers; 0 disables MTP
    loss_scaling_factor: float = 0.3  # lambda in main + lambda/D * sum(mtp)


@dataclass
class LoRA:
    rank: int = 0  # > 0: train low-rank adapters on target_modules, every other weight frozen; 0: full fine-tuning
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    # projections inside each block (MTP blocks too) that get an adapter: attn.wq_a, attn.wq_b, attn.wkv,
    # attn.wo_b, ffn.shared_experts.w1/w2/w3, ffn.experts.w1/w2/w3 (one per routed expert), e_proj, h_proj
    target_modules: list[str] = field(default_factory=lambda: ["attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b"])
    # the frozen routed experts' storage: "dense" (the parameter dtype) or "fp4" (the released FP4 bytes and
    # scales, 4.25 bits per weight; dequantised per layer in forward)
    expert_storage: str = "dense"


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
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    mtp: MTP = field(default_factory=MTP)
    lora: LoRA = field(default_factory=LoRA)
