"""Refuse bad input before anything starts: each check raises a ConfigError naming the key and the fix.

Checks that need only the config come first; those that need the host or the dataset follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from cluster.environment import Host
from launcher.errors import ConfigError
from launcher.schema import RunConfig
from trainer import corpus

OPTIMIZERS = ("adamw", "sgd", "paged_adamw_32bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload")
CLUSTERS = ("local", "slurm")
INTERVALS = ("no", "steps", "epoch")
# What evaluation produces, so what metric_for_best_model may name (early stopping and best-model
# tracking would silently never fire on a metric that never appears).
EVAL_METRICS = ("eval_loss",)
# Trackers the metrics logger really writes to; anything else would be accepted and ignored.
TRACKERS = ("tensorboard", "none")
DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def leaves(node: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every value of the config with its dotted key, dataclasses, dicts and lists walked through."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from leaves(getattr(node, f.name), f"{prefix}{f.name}.")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), node


def check_values(cfg: RunConfig) -> None:
    """No string may hold a newline or NUL (they end up in scripts, sbatch directives and logs), and
    no float may be inf or NaN (`optimizer.learning_rate=inf` would pass every range check below
    and fail on the ranks, or never)."""
    for key, value in leaves(cfg):
        if isinstance(value, str) and ("\n" in value or "\r" in value or "\0" in value):
            raise ConfigError(key, "contains a newline or NUL character; remove it (values go into scripts)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")


def is_checkpoint_folder(path: Path) -> bool:
    """A ringleader checkpoint: a folder with its completion marker (trainer/checkpoint.py)."""
    return path.is_dir() and (path / "COMPLETE").is_file()


def safetensors_error(path: Path) -> str | None:
    """Why `path` is not a safetensors file (8-byte header length, then a JSON header), or None.
    Reads the header only, without torch."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "too short to be a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > min(path.stat().st_size - 8, 100 * 2**20):
                return "not a safetensors file (bad header length)"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors file (its header is not JSON)"
    return None if isinstance(header, dict) else "not a safetensors file"


def validate_config(cfg: RunConfig) -> None:
    check_values(cfg)
    t, o, s, m, d, c, hw = cfg.train, cfg.optimizer, cfg.scheduler, cfg.model, cfg.data, cfg.cluster, cfg.hw

    require(bool(t.output_dir.strip()), "train.output_dir", "is empty; give a folder for the run, e.g. train.output_dir=runs/my-run")
    require(hw.cpu_ranks >= 1, "hw.cpu_ranks", f"must be >= 1 (processes per node on CPU), got {hw.cpu_ranks}")
    require(hw.gpus_per_node >= 0, "hw.gpus_per_node", f"must be >= 0, got {hw.gpus_per_node}")
    require(hw.cpus_per_node >= 0, "hw.cpus_per_node", f"must be >= 0 (0: detected), got {hw.cpus_per_node}")
    require(hw.gpu_memory_gb >= 0, "hw.gpu_memory_gb", f"must be >= 0, got {hw.gpu_memory_gb}")
    require(hw.peak_tflops_bf16 >= 0, "hw.peak_tflops_bf16", f"must be >= 0, got {hw.peak_tflops_bf16}")

    require(o.name in OPTIMIZERS, "optimizer.name", f"unknown optimizer '{o.name}'; choose one of {', '.join(OPTIMIZERS)}")
    require(o.learning_rate > 0, "optimizer.learning_rate", f"must be > 0, got {o.learning_rate}; set e.g. optimizer.learning_rate=3e-4")
    require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(o, key)
        require(0 <= value < 1, f"optimizer.{key}", f"must be in [0, 1), got {value}")
    require(o.adam_epsilon > 0, "optimizer.adam_epsilon", f"must be > 0, got {o.adam_epsilon}")
    require(o.momentum >= 0, "optimizer.momentum", f"must be >= 0, got {o.momentum}")

    require(s.name in SCHEDULERS, "scheduler.name", f"unknown schedule '{s.name}'; choose one of {', '.join(SCHEDULERS)}")
    require(s.warmup_steps >= 0, "scheduler.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    require(s.num_cycles > 0, "scheduler.num_cycles", f"must be > 0, got {s.num_cycles}")
    require(0 <= s.warmup_ratio <= 1, "scheduler.warmup_ratio", f"must be in [0, 1], got {s.warmup_ratio}")

    require(cfg.strategy.name in STRATEGIES, "strategy.name", f"unknown strategy '{cfg.strategy.name}'; choose one of {', '.join(STRATEGIES)}")

    require(t.per_device_train_batch_size >= 1, "train.per_device_train_batch_size", f"must be >= 1, got {t.per_device_train_batch_size}")
    require(t.per_device_eval_batch_size >= 1, "train.per_device_eval_batch_size", f"must be >= 1, got {t.per_device_eval_batch_size}")
    require(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", f"must be >= 1, got {t.gradient_accumulation_steps}")
    require(t.max_steps >= -1, "train.max_steps", f"must be > 0, or -1 to train for train.num_train_epochs; got {t.max_steps}")
    require(t.max_steps > 0 or t.num_train_epochs > 0, "train.num_train_epochs", "must be > 0 when train.max_steps is not set; set one of them")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0 turns clipping off), got {t.max_grad_norm}")
    require(t.logging_steps >= 1, "train.logging_steps", f"must be >= 1, got {t.logging_steps}")
    require(t.eval_strategy in INTERVALS, "train.eval_strategy", f"'{t.eval_strategy}' is not one of no, steps, epoch")
    require(t.save_strategy in INTERVALS, "train.save_strategy", f"'{t.save_strategy}' is not one of no, steps, epoch")
    require(t.eval_steps >= 0, "train.eval_steps", f"must be >= 0 (0: every logging_steps), got {t.eval_steps}")
    require(t.save_strategy != "steps" or t.save_steps >= 1, "train.save_steps", f"must be >= 1 with save_strategy=steps, got {t.save_steps}")
    require(t.eval_max_batches >= 0, "train.eval_max_batches", f"must be >= 0 (0: the whole validation split), got {t.eval_max_batches}")
    require(t.early_stopping_threshold >= 0, "train.early_stopping_threshold", f"must be >= 0, got {t.early_stopping_threshold}")
    unknown = [r for r in t.report_to if r not in TRACKERS]
    require(not unknown, "train.report_to", f"{unknown[0] if unknown else ''} is not supported yet; use tensorboard or none (metrics.jsonl is always written)")
    require(not t.torch_compile, "train.torch_compile", "is not supported yet; set train.torch_compile=false")
    require(t.save_total_limit >= 0, "train.save_total_limit", f"must be >= 0 (0 keeps all), got {t.save_total_limit}")
    require(t.nonfinite in ("error", "skip"), "train.nonfinite", f"'{t.nonfinite}' is not one of error, skip")
    require(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    require(t.ddp_timeout >= 1, "train.ddp_timeout", f"must be >= 1 second, got {t.ddp_timeout}")
    require(t.ddp_backend in ("", "gloo", "nccl"), "train.ddp_backend", f"'{t.ddp_backend}' is not one of gloo, nccl (or empty for the default)")
    require(not (t.bf16 and t.fp16), "train.fp16", "bf16 and fp16 are both on; turn one off (train.fp16=false)")
    evaluates = t.eval_strategy != "no"
    require(evaluates or not t.load_best_model_at_end, "train.load_best_model_at_end", "needs evaluations; set train.eval_strategy=steps or epoch")
    require(evaluates or t.early_stopping_patience == 0, "train.early_stopping_patience", "needs evaluations; set train.eval_strategy=steps or epoch")
    require(t.early_stopping_patience >= 0, "train.early_stopping_patience", f"must be >= 0, got {t.early_stopping_patience}")
    if t.load_best_model_at_end:
        require(t.save_strategy == t.eval_strategy, "train.save_strategy", f"must equal train.eval_strategy ({t.eval_strategy}) when load_best_model_at_end")
        eval_steps = t.eval_steps or t.logging_steps
        require(
            t.save_strategy != "steps" or t.save_steps % eval_steps == 0,
            "train.save_steps",
            f"{t.save_steps} is not a multiple of eval_steps {eval_steps} with load_best_model_at_end; set train.save_steps={eval_steps * max(1, round(t.save_steps / eval_steps))}",
        )
    metric = t.metric_for_best_model if t.metric_for_best_model.startswith("eval_") else f"eval_{t.metric_for_best_model}"
    require(metric in EVAL_METRICS, "train.metric_for_best_model", f"'{t.metric_for_best_model}' is not produced by evaluation; use one of {', '.join(EVAL_METRICS)}")
    if t.resume not in ("auto", "none"):
        resume = Path(t.resume).expanduser()
        require(resume.exists(), "train.resume", f"no checkpoint at '{t.resume}'; give auto, none, or an existing checkpoint folder")
        require(is_checkpoint_folder(resume), "train.resume", f"'{t.resume}' is not a complete ringleader checkpoint (no COMPLETE marker); give auto, none, or <run>/checkpoints/step-N")

    require(not m.init_from or Path(m.init_from).expanduser().is_file(), "model.init_from", f"no file at '{m.init_from}'; give a model.safetensors, e.g. <run>/final/model.safetensors")
    if m.init_from:
        problem = safetensors_error(Path(m.init_from).expanduser())
        require(problem is None, "model.init_from", f"'{m.init_from}' is {problem}; give a model.safetensors, e.g. <run>/final/model.safetensors")
    require(bool(m._target_), "model._target_", "is empty; pick a model (model=gpt_tiny) or give a dotted path, e.g. model._target_=mypkg.models.MyModel")
    require(bool(DOTTED_PATH.fullmatch(m._target_)), "model._target_", f"'{m._target_}' is not a dotted path to a class or function; write e.g. mypkg.models.MyModel")
    require(not d._target_ or bool(DOTTED_PATH.fullmatch(d._target_)), "data._target_", f"'{d._target_}' is not a dotted path to a function; write e.g. mypkg.data.make_dataset")
    require(m.num_parameters >= 0, "model.num_parameters", f"must be >= 0 (0: no estimate), got {m.num_parameters}")
    if m._target_ == "trainer.model.GPT":
        require(m.vocab_size >= 1, "model.vocab_size", f"must be >= 1, got {m.vocab_size}")
        require(m.block_size >= 1, "model.block_size", f"must be >= 1, got {m.block_size}")
        require(m.n_layer >= 1, "model.n_layer", f"must be >= 1, got {m.n_layer}")
        require(m.n_head >= 1, "model.n_head", f"must be >= 1, got {m.n_head}")
        require(m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}; change one of them")
        require(d.seq_len <= m.block_size, "data.seq_len", f"{d.seq_len} is longer than model.block_size={m.block_size}; lower data.seq_len or raise model.block_size")
        byte_level = d.name in ("pystdlib", "text_files")
        require(not byte_level or m.vocab_size >= 256, "model.vocab_size", f"{m.vocab_size} is below 256, but data.{d.name} is byte-level; set model.vocab_size=256")
        require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    require(d.seq_len >= 1, "data.seq_len", f"must be >= 1, got {d.seq_len}")
    require(0 <= d.validation_fraction < 1, "data.validation_fraction", f"must be in [0, 1), got {d.validation_fraction}")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    require(d.max_bytes >= 0, "data.max_bytes", f"must be >= 0 (0: all), got {d.max_bytes}")
    require(d.num_samples >= 0, "data.num_samples", f"must be >= 0, got {d.num_samples}")
    known = ("pystdlib", "text_files", "tokens_bin", "synthetic")
    require(d.name in known or bool(d._target_), "data.name", f"unknown dataset '{d.name}'; choose one of {', '.join(known)} or set data._target_")
    if d._target_:
        require(d.num_samples > 0 or t.max_steps > 0, "data.num_samples", "a custom dataset needs data.num_samples (training samples) or train.max_steps to plan the run")
    if d.name == "text_files" and not d._target_:
        require(bool(d.paths), "data.paths", "text_files needs files; set data.paths='[/path/to/*.txt]'")
        for i, pattern in enumerate(d.paths):
            require(bool(corpus.text_files([pattern])), f"data.paths.{i}", f"'{pattern}' matches no file; check the path or the glob")
    if d.name == "tokens_bin" and not d._target_:
        require(len(d.paths) == 1 and Path(os.path.expanduser(d.paths[0])).is_file(), "data.paths", f"tokens_bin needs one existing file, got {d.paths}; set data.paths='[/path/train.bin]'")
        require(d.token_dtype in ("uint8", "uint16", "int32"), "data.token_dtype", f"'{d.token_dtype}' is not one of uint8, uint16, int32")
    if d.name == "synthetic" and not d._target_:
        require(d.num_samples >= 1, "data.num_samples", f"synthetic data needs data.num_samples >= 1, got {d.num_samples}")

    require(c.name in CLUSTERS, "cluster.name", f"unknown cluster '{c.name}'; choose one of {', '.join(CLUSTERS)}")
    require(c.nodes >= 1, "cluster.nodes", f"must be >= 1, got {c.nodes}")
    require(c.name != "local" or c.nodes == 1, "cluster.nodes", f"{c.nodes} nodes need a cluster; use cluster=slurm, or cluster.nodes=1 for this machine")
    require(c.max_nodes >= 0, "cluster.max_nodes", f"must be >= 0 (0: no cap), got {c.max_nodes}")
    require(c.max_nodes == 0 or c.nodes <= c.max_nodes, "cluster.nodes", f"{c.nodes} is more than this cluster's {c.max_nodes} nodes; lower cluster.nodes")
    require(c.nproc_per_node >= 0, "cluster.nproc_per_node", f"must be >= 0 (0: from the hw profile), got {c.nproc_per_node}")
    require(c.max_restarts >= 0, "cluster.max_restarts", f"must be >= 0, got {c.max_restarts}")
    require(c.monitor_interval > 0, "cluster.monitor_interval", f"must be > 0 seconds, got {c.monitor_interval}")
    require(c.cpus_per_task >= 0, "cluster.cpus_per_task", f"must be >= 0 (0: hw.cpus_per_node), got {c.cpus_per_task}")
    require(c.mem_gb >= 0, "cluster.mem_gb", f"must be >= 0 (0: the partition's default), got {c.mem_gb}")
    require(c.gpus_per_node >= -1, "cluster.gpus_per_node", f"must be >= 0, or -1 for the hw profile's; got {c.gpus_per_node}")
    require(c.signal_delay_s >= 0, "cluster.signal_delay_s", f"must be >= 0 seconds, got {c.signal_delay_s}")
    require(c.max_requeues >= 0, "cluster.max_requeues", f"must be >= 0, got {c.max_requeues}")
    require(c.time_min >= 1, "cluster.time_min", f"must be >= 1 minute, got {c.time_min}")
    require(c.container_runtime in ("pyxis", "apptainer"), "cluster.container_runtime", f"'{c.container_runtime}' is not one of pyxis, apptainer")
    require(1 <= c.rdzv_port <= 65535, "cluster.rdzv_port", f"must be a TCP port, got {c.rdzv_port}")
    # What an existing run directory means (launcher/rundir.py check_run_dir): each knob acts on one kind of start only.
    require(not t.overwrite_output_dir or t.resume == "none", "train.overwrite_output_dir", f"applies to a fresh start only, but train.resume={t.resume}; set train.resume=none with it, or drop it to continue the run")
    require(not t.resume_with_changed_config or t.resume != "none", "train.resume_with_changed_config", "applies to a resume only, but train.resume=none; drop it, or set train.resume=auto or a checkpoint path")


def validate_hardware(cfg: RunConfig, host: Host) -> None:
    """Checks against the hw profile (already resolved from the host when it was `auto`)."""
    hw, t, c = cfg.hw, cfg.train, cfg.cluster
    require(hw.accelerator in ("cpu", "cuda"), "hw.accelerator", f"'{hw.accelerator}' is not one of cpu, cuda")
    require(not t.bf16 or hw.bf16, "train.bf16", f"the hw profile {hw.name} has no bf16; set train.fp16=true instead, or pick another +hw")
    require(not t.fp16 or hw.accelerator == "cuda", "train.fp16", "fp16 needs CUDA GPUs; on CPU use train.bf16=true or fp32")
    require(t.ddp_backend != "nccl" or hw.accelerator == "cuda", "train.ddp_backend", "nccl needs CUDA GPUs; use gloo on CPU (or leave it empty)")
    paged = cfg.optimizer.name.startswith("paged_")
    require(not paged or hw.accelerator == "cuda", "optimizer", f"{cfg.optimizer.name} (bitsandbytes) needs CUDA GPUs; use optimizer=adamw on CPU")
    if hw.accelerator == "cuda":
        require(hw.gpus_per_node >= 1, "hw.gpus_per_node", f"a cuda profile needs GPUs, got {hw.gpus_per_node}")
        require(
            c.nproc_per_node <= hw.gpus_per_node,
            "cluster.nproc_per_node",
            f"{c.nproc_per_node} processes but {hw.gpus_per_node} GPUs per node; set cluster.nproc_per_node<={hw.gpus_per_node}",
        )
        if c.name == "local" and not cfg.dry_run:
            require(
                host.gpus >= (c.nproc_per_node or hw.gpus_per_node),
                "hw",
                f"profile {hw.name} wants {c.nproc_per_node or hw.gpus_per_node} GPUs but this machine has {host.gpus}; use +hw=cpu, a smaller profile, or cluster=slurm",
            )
