"""The typed schema of a ringleader run: one dataclass per config group, plus the `train` node.

The YAML files in conf/ only pick values; every key, its type and its default live here. Field
names follow Hugging Face `TrainingArguments` wherever it has the field. This module imports
nothing heavy: the launcher (no torch) and every rank (to type the saved config) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from launcher.errors import ConfigError
from launcher.registry import (
    ACCELERATORS, BITSANDBYTES, BYTE_LEVEL_DATASETS, CLUSTERS, CONTAINER_RUNTIMES, DATA_FORMATS, DATASETS, DDP_BACKENDS, EVAL_METRICS, GPT_TARGET,
    HF_DTYPES, HF_TARGET, INTERVALS, LOWER_IS_BETTER, NONFINITE, OPTIMIZERS, SAVE_STRATEGIES, SCHEDULERS, STRATEGIES, TEXT_DATASETS, TOKEN_BYTES,
    TOKENS_SEEN, ZERO_STAGES,
)
from launcher.registry import BNB_4BIT_DTYPES, BNB_4BIT_QUANT_TYPES, BNB_4BIT_STORAGE, LORA_BIAS, PEFT_METHODS
from launcher.options import OptionError, TrackerError, parse_optim_args, resolve_report_to, schedule_kwargs, step_form_error
from launcher.rules import DOTTED_PATH, check_extra_option, check_signal_delay, check_values, check_variable_names, require, setup_words


@dataclass(kw_only=True)
class HwConfig:
    """A hardware profile: what one node has. `auto` describes the machine the launcher runs on."""

    name: str = "auto"
    accelerator: str = "auto"  # cpu | cuda | auto (detected)
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0
    bf16: bool = False
    cpus_per_node: int = 0  # 0: detected
    cpu_ranks: int = 2  # processes per node when the accelerator is cpu
    peak_tflops_bf16: float = 0.0  # dense bf16 peak of one GPU, for MFU
    nccl_env: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        require(self.accelerator in ("auto", *ACCELERATORS), "hw.accelerator", f"'{self.accelerator}' is not one of cpu, cuda")
        require(self.cpu_ranks >= 1, "hw.cpu_ranks", f"must be >= 1 (processes per node on CPU), got {self.cpu_ranks}")
        require(self.gpus_per_node >= 0, "hw.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        require(self.cpus_per_node >= 0, "hw.cpus_per_node", f"must be >= 0 (0: detected), got {self.cpus_per_node}")
        require(self.gpu_memory_gb >= 0, "hw.gpu_memory_gb", f"must be >= 0, got {self.gpu_memory_gb}")
        require(self.peak_tflops_bf16 >= 0, "hw.peak_tflops_bf16", f"must be >= 0, got {self.peak_tflops_bf16}")
        check_variable_names(self.nccl_env, "hw.nccl_env")  # they become `export NAME=...` lines and NAME=... words


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

    def check(self) -> None:
        """The strategy's own knobs agree with its name; DeepSpeed-only keys only for DeepSpeed."""
        require(self.name in STRATEGIES, "strategy.name", f"unknown strategy '{self.name}'; choose one of {', '.join(STRATEGIES)}")
        if self.name in ZERO_STAGES:
            stage = ZERO_STAGES[self.name]
            require(self.zero_stage == stage, "strategy.zero_stage", f"is {self.zero_stage} but strategy {self.name} is ZeRO stage {stage}; pick strategy=zero{self.zero_stage} instead, or drop the override")
            require(not self.offload_param or stage == 3, "strategy.offload_param", f"needs ZeRO stage 3, {self.name} is stage {stage}; use strategy=zero3_offload")
            return
        require(not self.zero_stage, "strategy.zero_stage", f"only DeepSpeed strategies have a ZeRO stage, {self.name} has none; use strategy=zero{self.zero_stage}")
        if self.offload_optimizer or self.offload_param:
            key = "strategy.offload_optimizer" if self.offload_optimizer else "strategy.offload_param"
            raise ConfigError(key, f"offload needs a DeepSpeed strategy, {self.name} has none; use strategy=zero3_offload")
        require(not self.deepspeed, "strategy.deepspeed", f"DeepSpeed keys given, but strategy {self.name} does not use DeepSpeed; pick strategy=zero1/zero2/zero3/zero3_offload or drop them")

    @property
    def is_deepspeed(self) -> bool:
        return self.name in ZERO_STAGES


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer; its name is TrainingArguments' `optim`."""

    name: str = "adamw"  # launcher/registry.py OPTIMIZERS; adamw_torch_fused is Trainer's default
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.0  # sgd
    # Trainer's optim_args: "k=v,k=v", the options of the chosen optimizer that have no field here
    # (launcher/options.py OPTIM_ARGS lists them; an unknown one is refused).
    optim_args: str = ""

    def check(self) -> None:
        try:
            parse_optim_args(self.name, self.optim_args)
        except OptionError as exc:
            raise ConfigError(f"optimizer.{exc.key}", exc.message) from None
        if self.name == "adafactor":  # Adafactor has no Adam moments: a changed value would be ignored
            for key, default in (("adam_beta1", 0.9), ("adam_beta2", 0.999), ("adam_epsilon", 1e-8)):
                require(getattr(self, key) == default, f"optimizer.{key}", f"is not used by adafactor; drop it (Adafactor's own options, e.g. beta1 or decay_rate, go in optimizer.optim_args)")
        require(self.name in OPTIMIZERS, "optimizer.name", f"unknown optimizer '{self.name}'; choose one of {', '.join(OPTIMIZERS)}")
        require(self.learning_rate > 0, "optimizer.learning_rate", f"must be > 0, got {self.learning_rate}; set e.g. optimizer.learning_rate=3e-4")
        require(self.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"optimizer.{key}", f"must be in [0, 1), got {value}")
        require(self.adam_epsilon > 0, "optimizer.adam_epsilon", f"must be > 0, got {self.adam_epsilon}")
        require(self.momentum >= 0, "optimizer.momentum", f"must be >= 0, got {self.momentum}")


@dataclass(kw_only=True)
class SchedulerConfig:
    """The learning-rate schedule; its name is TrainingArguments' `lr_scheduler_type`."""

    name: str = "linear"  # linear | cosine | constant | constant_with_warmup
    # transformers 5's form: a count, or a ratio of the total steps below 1 (rounded up, as Trainer).
    # Wins over warmup_ratio when > 0.
    warmup_steps: float = 0
    warmup_ratio: float = 0.0  # transformers 4's name (removed in 5); kept, with a note in the plan
    num_cycles: float = 0.5  # cosine: half a wave, as in transformers
    # Trainer's lr_scheduler_kwargs: the chosen schedule's own arguments (min_lr or min_lr_rate,
    # num_decay_steps, lr_end and power, timescale, ...; launcher/options.py SCHEDULE_KWARGS), checked
    # here, unknown keys refused. num_cycles is the field above.
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        require(self.name in SCHEDULERS, "scheduler.name", f"unknown schedule '{self.name}'; choose one of {', '.join(SCHEDULERS)}")
        self.check_kwargs(learning_rate=float("inf"))  # the rules against the rate: RunConfig.check
        require((why := step_form_error(self.warmup_steps)) is None, "scheduler.warmup_steps", str(why))
        require(self.num_cycles > 0, "scheduler.num_cycles", f"must be > 0, got {self.num_cycles}")
        require(0 <= self.warmup_ratio <= 1, "scheduler.warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")

    def check_kwargs(self, *, learning_rate: float) -> None:
        try:
            schedule_kwargs(self.name, self.lr_scheduler_kwargs, learning_rate=learning_rate)
        except OptionError as exc:
            raise ConfigError(f"scheduler.{exc.key}", exc.message) from None


@dataclass(kw_only=True)
class ModelConfig:
    """The model. The built-in GPT uses the fields below; a user's model sets `_target_`
    (a dotted path to a class or function) and passes its own arguments in `kwargs`.
    Contract (trainer/model_io.py): `model(input_ids, labels)` returns logits [B, T, V] or the mean
    cross-entropy over the labelled tokens (labels != -100); ringleader makes the loss token-exact."""

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
    # imports the model to count it). 0: no estimate. The built-in GPT is counted exactly, a
    # transformers model from its config.json for the common architectures (launcher/hf_config.py).
    num_parameters: int = 0
    # A transformers causal LM (_target_=transformers.AutoModelForCausalLM, model=hf or llama_tiny;
    # trainer/hf_model.py). Exactly one of name_or_path (weights) and config (random weights).
    name_or_path: str = ""  # a local folder or a hub id with weights (offline: in the hub cache)
    config: str = ""  # a config.json or its folder: random weights; "pkg:trainer/assets/llama_tiny" ships
    revision: str = ""  # the hub revision (a branch, tag or commit) of name_or_path and tokenizer
    dtype: str = "float32"  # the weights' dtype as loaded: float32 | bfloat16 | float16 (train.bf16 decides compute)
    attn_implementation: str = "sdpa"  # transformers' attention: eager | sdpa | flex_attention | flash_attention_2 | ...
    trust_remote_code: bool = False  # run the model's own modelling code from the hub or folder
    tokenizer: str = ""  # "": the tokenizer of name_or_path, or of config's folder
    device_map: Any = None  # refused: ringleader places the model on its ranks

    @property
    def is_transformers(self) -> bool:
        return self._target_ == HF_TARGET

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer comes from: model.tokenizer, else the weights' folder or id, else
        the config's folder."""
        if self.tokenizer or self.name_or_path:
            return self.tokenizer or self.name_or_path
        return self.config[:-len("/config.json")] if self.config.endswith("/config.json") else self.config

    def check(self) -> None:
        require(bool(self._target_), "model._target_", "is empty; pick a model (model=gpt_tiny) or give a dotted path, e.g. model._target_=mypkg.models.MyModel")
        require(bool(DOTTED_PATH.fullmatch(self._target_)), "model._target_", f"'{self._target_}' is not a dotted path to a class or function; write e.g. mypkg.models.MyModel")
        require(self.num_parameters >= 0, "model.num_parameters", f"must be >= 0 (0: no estimate), got {self.num_parameters}")
        if self._target_ == GPT_TARGET:
            require(self.vocab_size >= 1, "model.vocab_size", f"must be >= 1, got {self.vocab_size}")
            require(self.block_size >= 1, "model.block_size", f"must be >= 1, got {self.block_size}")
            require(self.n_layer >= 1, "model.n_layer", f"must be >= 1, got {self.n_layer}")
            require(self.n_head >= 1, "model.n_head", f"must be >= 1, got {self.n_head}")
            require(self.n_embd % self.n_head == 0, "model.n_embd", f"{self.n_embd} is not divisible by model.n_head={self.n_head}; change one of them")
            require(0 <= self.dropout < 1, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.device_map in (None, "", {}), "model.device_map", "ringleader places the model on its ranks (the strategy decides); remove model.device_map")
        hf_keys = ("name_or_path", "config", "revision", "tokenizer")
        if not self.is_transformers:
            for key in hf_keys:
                require(not getattr(self, key), f"model.{key}", f"is for transformers models; set model=hf (or model._target_={HF_TARGET}), or drop it")
            return
        require(bool(self.name_or_path) != bool(self.config), "model.name_or_path", "and model.config: set exactly one (a folder or hub id with weights, or a config.json for random weights)")
        require(self.dtype in HF_DTYPES, "model.dtype", f"'{self.dtype}' is not one of {', '.join(HF_DTYPES)}")
        require(bool(self.attn_implementation), "model.attn_implementation", "is empty; set e.g. model.attn_implementation=sdpa")
        require(not self.init_from, "model.init_from", "is for ringleader's own models; a transformers model starts from model.name_or_path (e.g. <run>/final)")
        require(not self.kwargs, "model.kwargs", f"are not passed to {HF_TARGET}; use its fields (name_or_path, config, dtype, attn_implementation, ...)")


@dataclass(kw_only=True)
class PeftConfig:
    """Parameter-efficient fine-tuning of a transformers model with pretrained weights
    (trainer/lora.py): `lora` trains low-rank adapters through peft, the base frozen; `qlora` does
    the same on a base loaded in 4 bits by bitsandbytes (CUDA only). Field names are peft's
    LoraConfig and transformers' BitsAndBytesConfig."""

    name: str = "none"
    method: str = "none"  # none | lora | qlora
    r: int = 8  # the adapters' rank
    lora_alpha: int = 8  # the adapters' output is scaled by lora_alpha / r
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" (every Linear but the output head), a module name regex, or a list of names
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained and saved with the adapter (e.g. [lm_head])
    bias: str = "none"  # none | all | lora_only: which biases train
    # QLoRA's base (bitsandbytes): 4-bit weights, dequantised to the compute dtype for each matmul.
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = True  # quantise the quantisation constants too (~0.4 bit/parameter less)
    bnb_4bit_compute_dtype: str = "bfloat16"
    # The dtype the packed 4-bit weights are stored as: FSDP and ZeRO-3 shard only floating tensors
    # of the model's dtype, so there it must be model.dtype (uint8 is bitsandbytes' default).
    bnb_4bit_quant_storage: str = "uint8"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def check(self) -> None:
        require(self.method in PEFT_METHODS, "peft.method", f"'{self.method}' is not one of {', '.join(PEFT_METHODS)}; pick peft=lora or peft=qlora")
        defaults = PeftConfig()
        if not self.enabled:  # a LoRA knob without LoRA would do nothing: refused
            for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", *QLORA_KEYS):
                require(getattr(self, key) == getattr(defaults, key), f"peft.{key}", "is a LoRA setting, but peft.method=none; add peft=lora (or qlora), or drop it")
            return
        require(self.r >= 1, "peft.r", f"must be >= 1, got {self.r}")
        require(self.lora_alpha > 0, "peft.lora_alpha", f"must be > 0, got {self.lora_alpha:g}")
        require(0 <= self.lora_dropout < 1, "peft.lora_dropout", f"must be in [0, 1), got {self.lora_dropout:g}")
        require(self.bias in LORA_BIAS, "peft.bias", f"'{self.bias}' is not one of {', '.join(LORA_BIAS)}")
        targets = self.target_modules
        good = (isinstance(targets, str) and bool(targets.strip())) or (isinstance(targets, list) and bool(targets) and all(isinstance(t, str) and t.strip() for t in targets))
        require(good, "peft.target_modules", "must be all-linear, a regex of module names, or a non-empty list of names; e.g. peft.target_modules='[q_proj,v_proj]'")
        require(all(isinstance(m, str) and m.strip() for m in self.modules_to_save), "peft.modules_to_save", "must be a list of module names, e.g. peft.modules_to_save='[lm_head]'")
        if self.method == "lora":
            for key in QLORA_KEYS:
                require(getattr(self, key) == getattr(defaults, key), f"peft.{key}", "is a QLoRA (4-bit base) setting; use peft=qlora, or drop it")
            return
        require(self.load_in_4bit, "peft.load_in_4bit", "must be true with peft.method=qlora (the 4-bit base is what QLoRA is); use peft=lora for a full-precision base")
        require(self.bnb_4bit_quant_type in BNB_4BIT_QUANT_TYPES, "peft.bnb_4bit_quant_type", f"'{self.bnb_4bit_quant_type}' is not one of {', '.join(BNB_4BIT_QUANT_TYPES)}")
        require(self.bnb_4bit_compute_dtype in BNB_4BIT_DTYPES, "peft.bnb_4bit_compute_dtype", f"'{self.bnb_4bit_compute_dtype}' is not one of {', '.join(BNB_4BIT_DTYPES)}")
        require(self.bnb_4bit_quant_storage in BNB_4BIT_STORAGE, "peft.bnb_4bit_quant_storage", f"'{self.bnb_4bit_quant_storage}' is not one of {', '.join(BNB_4BIT_STORAGE)}")


QLORA_KEYS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")


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
    # TrainingArguments' dataloader_pin_memory (pinned only where the device is CUDA),
    # dataloader_persistent_workers and dataloader_prefetch_factor (both need num_workers > 0).
    pin_memory: bool = True
    persistent_workers: bool = False
    prefetch_factor: int | None = None  # batches each worker loads ahead; None: torch's 2
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Records for a transformers model (names jsonl, hf, stdlib_instruct), tokenized once by the
    # launcher's pre-step into a cache keyed by content (trainer/tokenized.py); seq_len is the most
    # tokens per sample (TRL's max_length: longer samples are cut), or per packed row.
    format: str = "text"  # text | prompt_completion | messages
    text_field: str = "text"
    prompt_field: str = "instruction"
    input_field: str = "input"  # a second part of the prompt; "" when the data has none
    completion_field: str = "output"
    prompt_template: str = "alpaca"  # alpaca (Alpaca's own, with and without input), or a str.format template with {prompt} (and {input})
    messages_field: str = "messages"
    chat_template: str = ""  # Jinja; "": the tokenizer's own
    train_on_prompt: bool = False  # False: prompt and non-assistant tokens get no loss
    validation_paths: list[str] = field(default_factory=list)  # local validation files (jsonl); then nothing is held out
    dataset: str = ""  # hf: a hub dataset id (offline: in the datasets cache)
    dataset_config: str = ""
    revision: str = ""
    split: str = "train"
    validation_split: str = ""  # hf: a split to evaluate on; "": validation_fraction of split
    packing: bool = False  # several samples per row of seq_len tokens; attention never crosses samples
    num_proc: int = 1  # tokenizing processes (datasets.map num_proc)
    cache_dir: str = ""  # "": $XDG_CACHE_HOME/ringleader/tokenized; shared storage for SLURM

    @property
    def is_text(self) -> bool:
        return self.name in TEXT_DATASETS and not self._target_

    def check(self) -> None:
        require(not self._target_ or bool(DOTTED_PATH.fullmatch(self._target_)), "data._target_", f"'{self._target_}' is not a dotted path to a function; write e.g. mypkg.data.make_dataset")
        require(self.seq_len >= 1, "data.seq_len", f"must be >= 1, got {self.seq_len}")
        require(0 <= self.validation_fraction < 1, "data.validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.prefetch_factor is None or self.num_workers > 0, "data.prefetch_factor", "applies to loader worker processes, but data.num_workers=0; set data.num_workers >= 1, or drop it")
        require(self.prefetch_factor is None or self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        # ringleader starts each epoch's loader at the resumable sampler's position, so a worker cannot outlive its epoch yet.
        require(not self.persistent_workers, "data.persistent_workers", "is not supported yet: each epoch's loader starts its workers at the sampler's resumable position; drop it")
        require(self.max_bytes >= 0, "data.max_bytes", f"must be >= 0 (0: all), got {self.max_bytes}")
        require(self.num_samples >= 0, "data.num_samples", f"must be >= 0, got {self.num_samples}")
        require(self.name in DATASETS or bool(self._target_), "data.name", f"unknown dataset '{self.name}'; choose one of {', '.join(DATASETS)} or set data._target_")
        if self._target_:
            return
        if self.name == "text_files":
            require(bool(self.paths), "data.paths", "text_files needs files; set data.paths='[/path/to/*.txt]'")
        if self.name == "tokens_bin":  # that the file exists: launcher/validate.py
            require(len(self.paths) == 1, "data.paths", f"tokens_bin needs one existing file, got {self.paths}; set data.paths='[/path/train.bin]'")
            require(self.token_dtype in TOKEN_BYTES, "data.token_dtype", f"'{self.token_dtype}' is not one of uint8, uint16, int32")
        if self.name == "synthetic":
            require(self.num_samples >= 1, "data.num_samples", f"synthetic data needs data.num_samples >= 1, got {self.num_samples}")
        text_keys = {"packing": False, "train_on_prompt": False, "validation_paths": [], "dataset": "", "validation_split": "", "chat_template": ""}
        if not self.is_text:
            for key, default in text_keys.items():
                require(getattr(self, key) == default, f"data.{key}", f"is for text records (data=jsonl, hf or stdlib_instruct), not data={self.name}; drop it")
            return
        require(self.format in DATA_FORMATS, "data.format", f"'{self.format}' is not one of {', '.join(DATA_FORMATS)}")
        require(self.seq_len >= 2, "data.seq_len", f"must be >= 2 for text data (the most tokens per sample), got {self.seq_len}")
        require(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        require(self.format != "prompt_completion" or self.prompt_template == "alpaca" or "{prompt}" in self.prompt_template, "data.prompt_template", "must be alpaca or contain {prompt}; set e.g. data.prompt_template='{prompt}'")
        require(not self.chat_template or self.format == "messages", "data.chat_template", f"is used by data.format=messages only, format is {self.format}; drop it")
        if self.name == "jsonl":
            require(bool(self.paths), "data.paths", "jsonl needs files; set data.paths='[/path/train.jsonl]' (.jsonl, .json, .parquet or .csv)")
            require(not self.dataset, "data.dataset", "is for data=hf; with data=jsonl give files in data.paths")
            require(not self.validation_split, "data.validation_split", "local files have one split; set data.validation_paths or data.validation_fraction")
        if self.name == "hf":
            require(bool(self.dataset), "data.dataset", "hf needs a hub dataset id; set data.dataset=ORG/NAME (or use data=jsonl for local files)")
            require(not self.paths and not self.validation_paths, "data.paths", "are for data=jsonl; with data=hf name the hub dataset in data.dataset")
        if self.name == "stdlib_instruct":
            require(not self.paths and not self.validation_paths and not self.dataset, "data.paths", "stdlib_instruct writes its own files; drop data.paths (or use data=jsonl)")
            require(self.format in ("prompt_completion", "messages"), "data.format", f"stdlib_instruct is instruction data: prompt_completion or messages, not {self.format}")


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the job runs: `local` (torchrun on this machine) or `slurm` (an sbatch script of
    ringleader's own, cluster/slurm.py); each name is a backend (cluster/backend.py BACKENDS)."""

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

    def check(self) -> None:
        require(self.name in CLUSTERS, "cluster.name", f"unknown cluster '{self.name}'; choose one of {', '.join(CLUSTERS)}")
        require(self.nodes >= 1, "cluster.nodes", f"must be >= 1, got {self.nodes}")
        require(self.name != "local" or self.nodes == 1, "cluster.nodes", f"{self.nodes} nodes need a cluster; use cluster=slurm, or cluster.nodes=1 for this machine")
        require(self.max_nodes >= 0, "cluster.max_nodes", f"must be >= 0 (0: no cap), got {self.max_nodes}")
        require(self.max_nodes == 0 or self.nodes <= self.max_nodes, "cluster.nodes", f"{self.nodes} is more than this cluster's {self.max_nodes} nodes; lower cluster.nodes")
        require(self.nproc_per_node >= 0, "cluster.nproc_per_node", f"must be >= 0 (0: from the hw profile), got {self.nproc_per_node}")
        require(self.max_restarts >= 0, "cluster.max_restarts", f"must be >= 0, got {self.max_restarts}")
        require(self.monitor_interval > 0, "cluster.monitor_interval", f"must be > 0 seconds, got {self.monitor_interval}")
        require(self.cpus_per_task >= 0, "cluster.cpus_per_task", f"must be >= 0 (0: hw.cpus_per_node), got {self.cpus_per_task}")
        require(self.mem_gb >= 0, "cluster.mem_gb", f"must be >= 0 (0: the partition's default), got {self.mem_gb}")
        require(self.gpus_per_node >= -1, "cluster.gpus_per_node", f"must be >= 0, or -1 for the hw profile's; got {self.gpus_per_node}")
        require(self.signal_delay_s >= 0, "cluster.signal_delay_s", f"must be >= 0 seconds, got {self.signal_delay_s}")
        require(self.max_requeues >= 0, "cluster.max_requeues", f"must be >= 0, got {self.max_requeues}")
        require(self.time_min >= 1, "cluster.time_min", f"must be >= 1 minute, got {self.time_min}")
        require(self.container_runtime in CONTAINER_RUNTIMES, "cluster.container_runtime", f"'{self.container_runtime}' is not one of pyxis, apptainer")
        require(1 <= self.rdzv_port <= 65535, "cluster.rdzv_port", f"must be a TCP port, got {self.rdzv_port}")
        if self.name == "slurm":
            self.check_slurm()

    def check_slurm(self) -> None:
        """What only a SLURM job's values can get wrong: words that would become options, shell in a
        setup line, sbatch options the script owns, a time limit that leaves no time to train."""
        require(not self.container.startswith("-"), "cluster.container", f"'{self.container}' begins with '-' and would be read as an option; give an image name or path")
        for key in ("partition", "account", "qos", "constraint"):
            require(not str(getattr(self, key)).startswith("-"), f"cluster.{key}", f"'{getattr(self, key)}' begins with '-', which no SLURM name does; give the {key}'s name")
        for index, line in enumerate(self.setup):
            setup_words(line, index)
        for key in self.sbatch_extra:
            check_extra_option(str(key))
        check_signal_delay(self.signal_delay_s, self.time_min)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes
COMPILE_BACKENDS = ("inductor", "aot_eager", "aot_eager_decomp_partition", "eager", "cudagraphs", "tvm", "openxla")  # torch._dynamo.list_backends
# torch.utils.checkpoint's keyword arguments a config can hold (context_fn is code), with their values.
CHECKPOINT_KWARGS: dict[str, tuple[Any, ...]] = {"use_reentrant": (False, True), "preserve_rng_state": (True, False), "determinism_check": ("default", "none"), "debug": (False, True)}


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
    # logging_steps, eval_steps, save_steps: a count, or (transformers 5) a ratio below 1 of the
    # total steps, resolved once by the planner as Trainer does (math.ceil(total * ratio)).
    logging_steps: float = 10
    logging_first_step: bool = False  # Trainer's default; conf/config.yaml's default job turns it on
    eval_strategy: str = "no"  # no | steps | epoch
    evaluation_strategy: str = ""  # transformers 4's name (removed in 5): used as eval_strategy, with a note
    eval_steps: float = 0  # 0: logging_steps, as in transformers
    eval_delay: float = 0  # no evaluation before this many steps (eval_strategy=steps) or epochs (epoch), as Trainer
    eval_max_batches: int = 0  # 0: the whole validation split
    eval_on_start: bool = False  # evaluate before the first step (a baseline; not tracked as best)
    # Prompts completed greedily at each evaluation, by every rank together (collective under
    # sharding), logged by rank 0 to metrics.jsonl ("generations") and TensorBoard text; written
    # as data.format writes prompts (messages: the chat template with the generation prompt).
    # Transformers models only (trainer/generate.py).
    eval_prompts: list[str] = field(default_factory=list)
    eval_max_new_tokens: int = 32  # the most tokens each completion gets (it stops earlier at eos)
    # A user's metrics: a dotted path to fn(logits, labels) -> {name: value or (numerator,
    # denominator)}, called on every evaluation batch of every rank and summed (trainer/model_io.py
    # EvalStatistics); reported as eval_<name>. Needs a model that gives logits.
    compute_metrics: str = ""
    save_strategy: str = "no"  # no | steps | epoch | best (after an evaluation that improved metric_for_best_model)
    save_steps: float = 500
    save_total_limit: int = 0  # 0: keep all
    save_async: bool = False
    # Trainer's save_only_model: a checkpoint holds the model's weights (a LoRA run's: the adapter)
    # and the loop's position, not the optimizer, scaler or RNG state; smaller, and export and
    # load_best_model_at_end work from it. A resume from one (train.resume, an elastic restart, a
    # requeue) cannot be exact: it loads the weights, the data position and the schedule's step,
    # restarts the optimizer, and says so in the log and metrics.jsonl (trainer/checkpoint.py).
    save_only_model: bool = False
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool | None = None  # None: False for *loss metrics
    early_stopping_patience: int = 0  # 0: off; counted in evaluations
    early_stopping_threshold: float = 0.0
    bf16: bool = False
    fp16: bool = False
    tf32: bool | None = None  # CUDA matmul and cuDNN in TF32 (Trainer's); None: torch's defaults. Refused on CPU
    label_smoothing_factor: float = 0.0  # F.cross_entropy's label_smoothing: Trainer's LabelSmoother, token-exact
    include_num_input_tokens_seen: str = "no"  # no | all | non_padding (true/false: all/no): num_input_tokens_seen in the logs
    gradient_checkpointing: bool = False
    full_determinism: bool = False  # transformers' enable_full_determinism: deterministic algorithms, CUBLAS workspace, seeds
    seed: int = 42
    data_seed: int | None = None  # the data order's seed (Trainer's meaning); None: seed
    # Trainer's: drop each epoch's last incomplete micro-batch (per-device batch x world size); by default it
    # trains, and so does a last partial accumulation step (launcher/steps.py)
    dataloader_drop_last: bool = False
    logging_dir: str = ""  # "": <output_dir>/tensorboard
    # Trainer's report_to: a name or a list of tensorboard, wandb, mlflow; all; none (trainer/trackers.py).
    report_to: Any = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""  # the tracker run's name; "": the run directory's name
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
    # Trainer's torch.compile switch (trainer/compile.py): each transformer block (or a model without
    # blocks whole) is compiled before the strategy wraps or shards it, as torchtitan does. Setting
    # a mode or a backend turns it on, as in Trainer. Backend None: inductor (needs a C++ compiler on CPU).
    torch_compile: bool = False
    torch_compile_mode: str | None = None  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    torch_compile_backend: str | None = None  # inductor, aot_eager, eager, cudagraphs, ... (COMPILE_BACKENDS)
    # On an out-of-memory error the per-device batch is divided (halved when even) and the
    # accumulation multiplied by the same factor, so the effective batch, each step's samples and
    # the schedule stay the plan's (Trainer changes the effective batch instead); trainer/autobatch.py.
    auto_find_batch_size: bool = False
    # NEFTune (Trainer's): uniform noise of alpha / sqrt(seq_len x hidden) on the input embeddings, training only.
    neftune_noise_alpha: float | None = None
    # torch.utils.checkpoint's keyword arguments with train.gradient_checkpointing (CHECKPOINT_KWARGS).
    gradient_checkpointing_kwargs: dict[str, Any] | None = None  # None: {use_reentrant: false}

    def __post_init__(self) -> None:
        """transformers 4's evaluation_strategy, when set, is eval_strategy (with a note in the plan);
        Trainer's boolean include_num_input_tokens_seen is all or no."""
        self.notes: list[str] = []
        if self.torch_compile_mode or self.torch_compile_backend:  # as Trainer: either one turns compilation on
            self.torch_compile = True
        if self.evaluation_strategy in INTERVALS:
            self.notes.append(f"train.evaluation_strategy is transformers 4's name (removed in transformers 5); used as train.eval_strategy={self.evaluation_strategy}: write that instead")
            self.eval_strategy = self.evaluation_strategy
        if str(self.include_num_input_tokens_seen).lower() in ("true", "false"):  # Trainer's boolean form
            self.include_num_input_tokens_seen = "all" if str(self.include_num_input_tokens_seen).lower() == "true" else "no"

    def check(self) -> None:
        require(bool(self.output_dir.strip()), "train.output_dir", "is empty; give a folder for the run, e.g. train.output_dir=runs/my-run")
        require(self.per_device_train_batch_size >= 1, "train.per_device_train_batch_size", f"must be >= 1, got {self.per_device_train_batch_size}")
        require(self.per_device_eval_batch_size >= 1, "train.per_device_eval_batch_size", f"must be >= 1, got {self.per_device_eval_batch_size}")
        require(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", f"must be >= 1, got {self.gradient_accumulation_steps}")
        require(self.max_steps >= -1, "train.max_steps", f"must be > 0, or -1 to train for train.num_train_epochs; got {self.max_steps}")
        require(self.max_steps > 0 or self.num_train_epochs > 0, "train.num_train_epochs", "must be > 0 when train.max_steps is not set; set one of them")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")
        require(self.logging_steps > 0, "train.logging_steps", f"must be >= 1 (a count) or in (0, 1) (a ratio of the total steps), got {self.logging_steps:g}")
        require(self.evaluation_strategy in ("", *INTERVALS), "train.evaluation_strategy", f"'{self.evaluation_strategy}' is not one of no, steps, epoch (and it is transformers 4's name: set train.eval_strategy)")
        require(self.eval_strategy in INTERVALS, "train.eval_strategy", f"'{self.eval_strategy}' is not one of no, steps, epoch")
        require(self.save_strategy in SAVE_STRATEGIES, "train.save_strategy", f"'{self.save_strategy}' is not one of {', '.join(SAVE_STRATEGIES)}")
        for key in ("logging_steps", "eval_steps", "save_steps"):
            require((why := step_form_error(getattr(self, key))) is None, f"train.{key}", str(why))
        require(self.save_strategy != "steps" or self.save_steps > 0, "train.save_steps", f"must be >= 1 (or a ratio in (0, 1)) with save_strategy=steps, got {self.save_steps:g}")
        require(self.eval_delay >= 0, "train.eval_delay", f"must be >= 0 (steps or epochs, as train.eval_strategy), got {self.eval_delay:g}")
        require(self.eval_delay == 0 or self.eval_strategy != "no", "train.eval_delay", "delays evaluations, but train.eval_strategy=no; set train.eval_strategy=steps or epoch, or drop it")
        require(self.save_strategy != "best" or self.eval_strategy != "no", "train.save_strategy", "best saves after an evaluation that improved train.metric_for_best_model; set train.eval_strategy=steps or epoch")
        require(0 <= self.label_smoothing_factor < 1, "train.label_smoothing_factor", f"must be in [0, 1), got {self.label_smoothing_factor:g}")
        require(self.include_num_input_tokens_seen in TOKENS_SEEN, "train.include_num_input_tokens_seen", f"'{self.include_num_input_tokens_seen}' is not one of {', '.join(TOKENS_SEEN)} (or true/false)")
        require(not self.compute_metrics or bool(DOTTED_PATH.fullmatch(self.compute_metrics)), "train.compute_metrics", f"'{self.compute_metrics}' is not a dotted path to a function; write e.g. mypkg.metrics.exact_match")
        require(self.eval_max_new_tokens >= 1, "train.eval_max_new_tokens", f"must be >= 1, got {self.eval_max_new_tokens}")
        require(all(isinstance(p, str) and p.strip() for p in self.eval_prompts), "train.eval_prompts", "must be a list of non-empty strings; write e.g. train.eval_prompts='[\"What does json.dumps do?\"]'")
        require(not self.eval_prompts or self.eval_strategy != "no", "train.eval_prompts", "are completed at evaluations, but train.eval_strategy=no; set train.eval_strategy=steps or epoch")
        require(self.eval_max_batches >= 0, "train.eval_max_batches", f"must be >= 0 (0: the whole validation split), got {self.eval_max_batches}")
        require(self.early_stopping_threshold >= 0, "train.early_stopping_threshold", f"must be >= 0, got {self.early_stopping_threshold}")
        try:
            resolve_report_to(self.report_to, installed_only=False)
        except TrackerError as exc:
            raise ConfigError("train.report_to", str(exc)) from None
        require(self.torch_compile_mode in (None, *COMPILE_MODES), "train.torch_compile_mode", f"'{self.torch_compile_mode}' is not one of {', '.join(COMPILE_MODES)}")
        require(self.torch_compile_backend in (None, *COMPILE_BACKENDS), "train.torch_compile_backend", f"'{self.torch_compile_backend}' is not one of {', '.join(COMPILE_BACKENDS)}")
        require(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0, "train.neftune_noise_alpha", f"must be > 0 (or null for no noise), got {self.neftune_noise_alpha}")
        # With drop_last an epoch keeps whole micro-batches only: a smaller one would keep more of the tail than the plan counted.
        require(not (self.auto_find_batch_size and self.dataloader_drop_last), "train.auto_find_batch_size", "cannot keep the planned steps with train.dataloader_drop_last (a smaller micro-batch drops less of each epoch); drop one of them")
        kwargs = self.gradient_checkpointing_kwargs or {}
        require(not kwargs or self.gradient_checkpointing, "train.gradient_checkpointing_kwargs", "apply only with train.gradient_checkpointing=true; set it, or drop them")
        for key, value in kwargs.items():
            require(key in CHECKPOINT_KWARGS, "train.gradient_checkpointing_kwargs", f"'{key}' is not one of {', '.join(CHECKPOINT_KWARGS)} (torch.utils.checkpoint's arguments that a config can hold)")
            allowed = CHECKPOINT_KWARGS[key]
            require(value in allowed and type(value) is type(allowed[0]), f"train.gradient_checkpointing_kwargs.{key}", f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        require(self.save_total_limit >= 0, "train.save_total_limit", f"must be >= 0 (0 keeps all), got {self.save_total_limit}")
        require(self.nonfinite in NONFINITE, "train.nonfinite", f"'{self.nonfinite}' is not one of error, skip")
        require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        require(self.data_seed is None or self.data_seed >= 0, "train.data_seed", f"must be >= 0, or null to follow train.seed; got {self.data_seed}")
        require(self.ddp_timeout >= 1, "train.ddp_timeout", f"must be >= 1 second, got {self.ddp_timeout}")
        require(self.ddp_backend in ("", *DDP_BACKENDS), "train.ddp_backend", f"'{self.ddp_backend}' is not one of gloo, nccl (or empty for the default)")
        require(not (self.bf16 and self.fp16), "train.fp16", "bf16 and fp16 are both on; turn one off (train.fp16=false)")
        evaluates = self.eval_strategy != "no"
        require(evaluates or not self.load_best_model_at_end, "train.load_best_model_at_end", "needs evaluations; set train.eval_strategy=steps or epoch")
        require(evaluates or self.early_stopping_patience == 0, "train.early_stopping_patience", "needs evaluations; set train.eval_strategy=steps or epoch")
        require(self.early_stopping_patience >= 0, "train.early_stopping_patience", f"must be >= 0, got {self.early_stopping_patience}")
        if self.load_best_model_at_end and self.save_strategy != "best":  # best saves at evaluations by construction
            require(self.save_strategy == self.eval_strategy, "train.save_strategy", f"must equal train.eval_strategy ({self.eval_strategy}) when load_best_model_at_end")
            eval_steps = self.eval_steps or self.logging_steps
            ratios = (self.save_steps < 1, eval_steps < 1)
            require(ratios[0] == ratios[1], "train.save_steps", f"{self.save_steps:g} and eval_steps {eval_steps:g} mix a ratio and a count with load_best_model_at_end; give both as counts or both as ratios")
            # As Trainer: a multiple, checked on the values given (ratios scaled to whole numbers).
            scaled = [round(v * 1_000_000) if ratios[0] else int(v) for v in (self.save_steps, eval_steps)]
            require(
                self.save_strategy != "steps" or scaled[0] % scaled[1] == 0,
                "train.save_steps",
                f"{self.save_steps:g} is not a multiple of eval_steps {eval_steps:g} with load_best_model_at_end; set train.save_steps={eval_steps * max(1, round(self.save_steps / eval_steps)):g}",
            )
        require(self.eval_metric in EVAL_METRICS or bool(self.compute_metrics), "train.metric_for_best_model", f"'{self.metric_for_best_model}' is not produced by evaluation; use one of {', '.join(EVAL_METRICS)}, or a name your train.compute_metrics returns")
        # What an existing run directory means (launcher/rundir.py check_run_dir): each knob acts on one kind of start only.
        require(not self.overwrite_output_dir or self.resume == "none", "train.overwrite_output_dir", f"applies to a fresh start only, but train.resume={self.resume}; set train.resume=none with it, or drop it to continue the run")
        require(not self.resume_with_changed_config or self.resume != "none", "train.resume_with_changed_config", "applies to a resume only, but train.resume=none; drop it, or set train.resume=auto or a checkpoint path")

    @property
    def eval_metric(self) -> str:
        """metric_for_best_model as evaluation names it (with its eval_ prefix)."""
        return self.metric_for_best_model if self.metric_for_best_model.startswith("eval_") else f"eval_{self.metric_for_best_model}"

    @property
    def maximize(self) -> bool:
        """greater_is_better, resolved: unset, a loss or perplexity is minimised, anything else
        maximised (Trainer's rule is `not name.endswith("loss")`, which would maximise perplexity)."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.eval_metric in LOWER_IS_BETTER or self.eval_metric.endswith("loss"))

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


@dataclass(kw_only=True)
class RunConfig:
    """The whole run. Groups: hw, strategy, optimizer, scheduler, model, peft, data, cluster."""

    hw: HwConfig = field(default_factory=HwConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dry_run: bool = False

    def check(self) -> None:
        """Every rule that needs only the config: each group's own, then those across groups.
        Rules that need the host, files or data: launcher/validate.py check_environment."""
        check_values(self)
        for group in (self.train, self.hw, self.optimizer, self.scheduler, self.strategy, self.model, self.peft, self.data, self.cluster):
            group.check()
        m, d, t = self.model, self.data, self.train
        if m._target_ == GPT_TARGET:
            require(d.seq_len <= m.block_size, "data.seq_len", f"{d.seq_len} is longer than model.block_size={m.block_size}; lower data.seq_len or raise model.block_size")
            byte_level = d.name in BYTE_LEVEL_DATASETS
            require(not byte_level or m.vocab_size >= 256, "model.vocab_size", f"{m.vocab_size} is below 256, but data.{d.name} is byte-level; set model.vocab_size=256")
        require(not d.is_text or m.is_transformers, "data.name", f"{d.name} is tokenized for a transformers model; set model=hf or model=llama_tiny (or use data=pystdlib with model={m.name})")
        require(not t.eval_prompts or m.is_transformers, "train.eval_prompts", f"are completed with a transformers model's generate; model={m.name} is not one: drop train.eval_prompts, or set model=hf or llama_tiny")
        require(not m.is_transformers or d.is_text or bool(d._target_), "model", f"a transformers model trains on tokenized records; set data=jsonl, hf or stdlib_instruct (data={d.name} is byte-level)")
        if d._target_:
            require(d.num_samples > 0 or t.max_steps > 0, "data.num_samples", "a custom dataset needs data.num_samples (training samples) or train.max_steps to plan the run")
        self.check_peft()
        self.scheduler.check_kwargs(learning_rate=self.optimizer.learning_rate)  # min_lr, lr_end against the rate
        # An out-of-memory error in a DeepSpeed step leaves its partitioned gradient buffers half reduced: no retry there.
        require(not (t.auto_find_batch_size and self.strategy.is_deepspeed), "train.auto_find_batch_size", f"works with strategy=ddp or fsdp, not {self.strategy.name}; set train.per_device_train_batch_size yourself")
        # FSDP2 is built and tested (here and in torchtitan) with non-reentrant checkpointing only.
        require(not (t.gradient_checkpointing_kwargs or {}).get("use_reentrant") or self.strategy.name != "fsdp", "train.gradient_checkpointing_kwargs.use_reentrant", "true is not supported with strategy=fsdp; set it to false")
        s = self.strategy
        # Offload runs the update in DeepSpeed's CPU Adam: an optimizer ringleader builds itself cannot go there.
        if s.is_deepspeed and self.optimizer.name in (*BITSANDBYTES, "adamw_torch_fused", "adafactor") and (s.offload_optimizer or s.offload_param):
            raise ConfigError("optimizer", f"{self.optimizer.name} cannot be combined with ZeRO offload (DeepSpeed's CPU Adam runs the update); use optimizer=adamw")


    def check_peft(self) -> None:
        """LoRA needs a transformers model with pretrained weights (the adapter is useless without a
        base that loads again); QLoRA only where bitsandbytes' 4-bit weights can go (peft's and
        accelerate's FSDP/DeepSpeed guides). CUDA and bitsandbytes themselves: launcher/validate.py."""
        p, m, s = self.peft, self.model, self.strategy
        if not p.enabled:
            return
        require(m.is_transformers, "peft.method", f"{p.method} adapts a transformers model, but model={m.name} is ringleader's own; set model=hf model.name_or_path=DIR (pretrained weights)")
        require(bool(m.name_or_path), "model.name_or_path", f"peft={p.method} trains an adapter for pretrained weights that must load again; set model.name_or_path=DIR (a from_pretrained folder or hub id) instead of model.config")
        if p.method != "qlora":
            return
        require(s.name != "zero3_offload", "strategy", "zero3_offload moves parameters to the CPU, where bitsandbytes' 4-bit weights cannot compute; use strategy=zero3 or fsdp with peft=qlora")
        if s.name in ("fsdp", "zero3"):  # they shard floating tensors of one dtype: the packed 4-bit weights must be stored as the model's
            require(
                p.bnb_4bit_quant_storage == m.dtype,
                "peft.bnb_4bit_quant_storage",
                f"is {p.bnb_4bit_quant_storage}, but strategy={s.name} shards the 4-bit weights only when they are stored as the model's dtype ({m.dtype}); set peft.bnb_4bit_quant_storage={m.dtype} (with model.dtype=bfloat16 for bf16)",
            )
        if s.name == "zero3":
            require(
                p.bnb_4bit_compute_dtype == m.dtype,
                "peft.bnb_4bit_compute_dtype",
                f"is {p.bnb_4bit_compute_dtype}, but ZeRO-3 gathers the 4-bit weights as model.dtype={m.dtype}; set model.dtype and peft.bnb_4bit_quant_storage to {p.bnb_4bit_compute_dtype}",
            )


GROUPS: dict[str, type] = {
    "hw": HwConfig,
    "strategy": StrategyConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "cluster": ClusterConfig,
}
