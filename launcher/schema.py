"""The typed schema of a ringleader run: one dataclass per config group, plus the `train` node.

The YAML files in conf/ only pick values; every key, its type and its default live here. Field
names follow Hugging Face `TrainingArguments` wherever it has the field. This module imports
nothing heavy: the launcher (no torch) and every rank (to type the saved config) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass(kw_only=True)
class HwConfig:
    """A hardware profile: what one node has. `auto` describes the machine the launcher runs on."""

    name: str = "auto"
    accelerator: str = "auto"  # cpu | cuda | auto (detected)
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0
    bf16: bool = False
    fp8: bool = False
    interconnect: str = ""  # e.g. nvlink, pcie, infiniband; informational, printed in the plan
    cpus_per_node: int = 0  # 0: detected
    cpu_ranks: int = 2  # processes per node when the accelerator is cpu
    peak_tflops_bf16: float = 0.0  # dense bf16 peak of one GPU, for MFU
    nccl_env: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class StrategyConfig:
    """How the model is replicated or sharded. `deepspeed` holds DeepSpeed-only extra keys."""

    name: str = "ddp"  # ddp | fsdp | zero1 | zero2 | zero3 | zero3_offload
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    find_unused_parameters: bool = False
    reshard_after_forward: bool = True  # FSDP2
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer; its name is TrainingArguments' `optim`."""

    name: str = "adamw"  # adamw | sgd | paged_adamw_32bit | paged_adamw_8bit
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.0  # sgd


@dataclass(kw_only=True)
class SchedulerConfig:
    """The learning-rate schedule; its name is TrainingArguments' `lr_scheduler_type`."""

    name: str = "linear"  # linear | cosine | constant | constant_with_warmup
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    warmup_ratio: float = 0.0
    num_cycles: float = 0.5  # cosine: half a wave, as in transformers


@dataclass(kw_only=True)
class ModelConfig:
    """The model. The built-in GPT uses the fields below; a user's model sets `_target_`
    (a dotted path to a class or function) and passes its own arguments in `kwargs`.
    Contract: `model(input_ids, labels)` returns the mean cross-entropy over all tokens."""

    name: str = "gpt_tiny"
    _target_: str = "trainer.model.GPT"
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Warm start: a consolidated model.safetensors (final/ of any earlier run, whatever its
    # strategy and world size) loaded into the model before it is wrapped. A checkpoint found by
    # train.resume wins over it.
    init_from: str = ""
    # A user's model: its parameter count, for the plan's memory estimate (the launcher never
    # imports the model to count it). 0: no estimate. The built-in GPT is counted exactly.
    num_parameters: int = 0


@dataclass(kw_only=True)
class DataConfig:
    """The dataset. Samples are token windows of `seq_len + 1` (inputs and shifted labels).
    A user's dataset sets `_target_`: called as `fn(split=..., seq_len=..., **kwargs)`, it
    returns a map-style dataset of (input_ids, labels) pairs; set `num_samples` (training samples
    per epoch) or `train.max_steps` so the launcher can plan without loading it."""

    name: str = "pystdlib"
    _target_: str = ""
    seq_len: int = 128
    validation_fraction: float = 0.05
    max_bytes: int = 0  # pystdlib/text_files: cap on bytes read (0: all)
    paths: list[str] = field(default_factory=list)  # text_files: globs; tokens_bin: one file
    token_dtype: str = "uint16"  # tokens_bin
    num_samples: int = 0  # synthetic, or a user's dataset: training samples per epoch
    num_workers: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the job runs: `local` (torchrun on this machine) or `slurm` (submitit)."""

    name: str = "local"
    nodes: int = 1
    nproc_per_node: int = 0  # 0: GPUs per node of the hw profile, or hw.cpu_ranks on CPU
    max_restarts: int = 0  # torchrun's elastic restarts
    monitor_interval: float = 0.5  # torchrun's default of 5 s adds ~15 s per restart
    rdzv_port: int = 29400
    # SLURM
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 60
    constraint: str = ""
    exclusive: bool = False
    mem_gb: int = 0
    cpus_per_task: int = 0  # 0: hw.cpus_per_node
    gpus_per_node: int = -1  # -1: from the hw profile
    max_nodes: int = 0  # 0: no cap; set to the cluster's size to refuse bigger requests early
    max_requeues: int = 3
    signal_delay_s: int = 120
    setup: list[str] = field(default_factory=list)
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    container: str = ""
    container_runtime: str = "pyxis"  # pyxis | apptainer
    wait: bool = False


@dataclass(kw_only=True)
class TrainConfig:
    """The loop's arguments, named as in Hugging Face TrainingArguments."""

    output_dir: str = MISSING
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 wins over num_train_epochs
    max_grad_norm: float = 1.0  # 0 disables clipping
    logging_steps: int = 10
    logging_first_step: bool = True
    eval_strategy: str = "no"  # no | steps | epoch
    eval_steps: int = 0  # 0: logging_steps, as in transformers
    eval_max_batches: int = 0  # 0: the whole validation split
    eval_on_start: bool = False  # evaluate before the first step (a baseline; not tracked as best)
    save_strategy: str = "no"  # no | steps | epoch
    save_steps: int = 500
    save_total_limit: int = 0  # 0: keep all
    save_async: bool = False
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool | None = None  # None: False for *loss metrics
    early_stopping_patience: int = 0  # 0: off; counted in evaluations
    early_stopping_threshold: float = 0.0
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_dir: str = ""  # "": <output_dir>/tensorboard
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    ddp_backend: str = ""  # "": nccl on GPUs, gloo on CPU
    ddp_timeout: int = 1800  # seconds a collective may wait before the job ends
    resume: str = "auto"  # auto | none | a checkpoint path
    # resume=PATH may name a checkpoint of another run directory: it is loaded as the start (weights,
    # optimizer, schedule, data position), and this run saves into its own train.output_dir.
    # What an existing run directory means (as transformers' overwrite_output_dir): a fresh start
    # (resume=none) into a directory that holds complete checkpoints is refused, unless this is true;
    # then, before the run starts, the launcher removes the earlier run's checkpoints/step-N folders
    # (and step-N.tmp, .deleting-* leftovers), metrics.jsonl and result.json: files only ringleader
    # writes. logs/ keep growing, final/ is replaced at the end, every other file is left alone.
    overwrite_output_dir: bool = False
    # A resume whose config changes the trajectory (launcher/trajectory.py lists what counts) is
    # refused, naming the keys, unless this is true. Then each new value applies from the restored
    # step on: optimizer.* hyperparameters replace the restored ones; scheduler.*, max_steps and
    # epochs rebuild the schedule from the new config at the restored step (it is not restored);
    # a new effective batch (batch, accumulation, world size) maps the data position by samples
    # consumed; a new seed or data.* reorders from the restored position on (the rest of the current
    # epoch is taken from the new order, so a few samples may repeat or be skipped); model.* and
    # strategy.* changes load only where the checkpoint's tensors fit.
    resume_with_changed_config: bool = False
    nonfinite: str = "error"  # error | skip: what a NaN/inf loss or gradient norm does
    export_final: bool = True  # write final/model.safetensors
    torch_compile: bool = False


@dataclass(kw_only=True)
class RunConfig:
    """The whole run. Groups: hw, strategy, optimizer, scheduler, model, data, cluster."""

    hw: HwConfig = field(default_factory=HwConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dry_run: bool = False


GROUPS: dict[str, type] = {
    "hw": HwConfig,
    "strategy": StrategyConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "cluster": ClusterConfig,
}
