"""From a validated config to a plan (launcher/plan.py): the derived values and the exact command.
Pure: no I/O but reading dataset sizes, no processes, no files written."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from cluster.backend import backend_for
from cluster.environment import Host
from launcher.errors import ConfigError
from launcher.deepspeed_config import deepspeed_config
from launcher.memory import plan_memory
from launcher.options import DETERMINISM_ENV, resolve_steps
from launcher.plan import Plan
from launcher.steps import StepLayout
from launcher.schema import HwConfig, RunConfig
from launcher import corpus
from launcher.tokenize_step import Tokenized


def resolve_hw(hw: HwConfig, host: Host) -> HwConfig:
    """`auto` describes this machine: its GPUs if it has any, else CPU ranks."""
    if hw.name != "auto" and hw.accelerator != "auto":
        cpus = hw.cpus_per_node or host.cpus
        return dataclasses.replace(hw, cpus_per_node=cpus)
    if host.gpus > 0:
        return dataclasses.replace(hw, name=f"auto ({host.gpus} GPU)", accelerator="cuda", gpus_per_node=host.gpus, bf16=True, cpus_per_node=host.cpus)
    return dataclasses.replace(hw, name="auto (CPU)", accelerator="cpu", gpus_per_node=0, bf16=True, cpus_per_node=host.cpus)


def processes_per_node(cfg: RunConfig) -> int:
    if cfg.cluster.nproc_per_node:
        return cfg.cluster.nproc_per_node
    return cfg.hw.gpus_per_node if cfg.hw.accelerator == "cuda" else cfg.hw.cpu_ranks


def count_samples(cfg: RunConfig, split: str, tokenized: Tokenized | None = None) -> int | None:
    """Samples of a split; None when the launcher does not know it (text data in a dry run before
    tokenization; a data._target_ dataset, whose code runs on the ranks only, except the training
    samples data.num_samples gives). With packing, the packed rows."""
    if cfg.data.is_text:
        return tokenized.count(split, packing=cfg.data.packing) if tokenized is not None else None
    if cfg.data._target_:
        return (cfg.data.num_samples or None) if split == "train" else None
    try:
        return corpus.num_samples(cfg.data, split)
    except OSError as exc:
        raise ConfigError("data.paths", f"cannot read the dataset ({exc}); check data.paths") from exc


def plan_run(cfg: RunConfig, host: Host, run_dir: Path, *, tokenized: Tokenized | None = None) -> Plan:
    t = cfg.train
    nproc = processes_per_node(cfg)
    world = cfg.cluster.nodes * nproc
    effective = t.per_device_train_batch_size * world * t.gradient_accumulation_steps
    counted = count_samples(cfg, "train", tokenized)
    unknown = counted is None  # a dry run before tokenization: plan what can be planned
    train_samples = counted or 0
    eval_counted = count_samples(cfg, "validation", tokenized)
    eval_samples = eval_counted or 0
    # As Trainer: the last, smaller micro-batch and the last partial accumulation step of an epoch
    # count (launcher/steps.py), unless dataloader_drop_last drops that micro-batch.
    layout = StepLayout(samples=train_samples, micro_batch=t.per_device_train_batch_size * world, accumulation=t.gradient_accumulation_steps, drop_last=t.dataloader_drop_last)
    steps_per_epoch = layout.steps_per_epoch
    if 0 < train_samples < t.per_device_train_batch_size and not (cfg.data._target_ and t.max_steps > 0):
        # No batch of that size exists: Trainer would run one smaller batch an epoch, surely not what was meant.
        raise ConfigError(
            "train.per_device_train_batch_size",
            f"{t.per_device_train_batch_size} is more than the {train_samples} training samples, so no batch of it exists; "
            f"lower it (e.g. train.per_device_train_batch_size={train_samples}) or use more data",
        )
    if steps_per_epoch == 0 and not unknown and not (cfg.data._target_ and t.max_steps > 0):
        if t.dataloader_drop_last and train_samples:
            raise ConfigError(
                "train.dataloader_drop_last",
                f"the dataset has {train_samples} training samples, fewer than one micro-batch of {layout.micro_batch} "
                f"({t.per_device_train_batch_size} per device x {world} ranks), and drop_last drops it; set train.dataloader_drop_last=false or lower the batch",
            )
        raise ConfigError("data", "the dataset has no training samples; check data.paths (or data.max_bytes)")
    # A split counted on the ranks only (data._target_) is checked there (trainer/loop.py).
    if t.eval_strategy != "no" and eval_samples < world and eval_counted is not None:
        raise ConfigError("data.validation_fraction", f"the validation split has {eval_samples} samples for {world} ranks; raise data.validation_fraction or set train.eval_strategy=no")
    if t.max_steps > 0:
        total = t.max_steps
    else:
        total = math.ceil(t.num_train_epochs * steps_per_epoch)  # as transformers' Trainer
    sch = cfg.scheduler
    # transformers 5: warmup_steps is a count, or a ratio below 1 of the total steps. transformers 4's
    # warmup_ratio, when set, gives the ratio (the conf/scheduler files hold their default ratio in
    # warmup_steps); a count in warmup_steps still wins over it, as in transformers 4.
    if sch.warmup_ratio > 0 and sch.warmup_steps < 1:
        warmup = math.ceil(total * sch.warmup_ratio)
    else:
        warmup = resolve_steps(sch.warmup_steps, total)
    backend = t.ddp_backend or ("nccl" if cfg.hw.accelerator == "cuda" else "gloo")
    threads = max(1, cfg.hw.cpus_per_node // nproc) if cfg.hw.accelerator == "cpu" else max(1, min(8, cfg.hw.cpus_per_node // max(1, nproc)))
    env = {"OMP_NUM_THREADS": str(threads), **cfg.hw.nccl_env}
    if t.full_determinism:  # what transformers' enable_full_determinism exports, set before CUDA starts
        env.update(DETERMINISM_ENV)
    plan = Plan(
        run_dir=str(run_dir),
        cluster=cfg.cluster.name,
        nodes=cfg.cluster.nodes,
        nproc_per_node=nproc,
        world_size=world,
        accelerator=cfg.hw.accelerator,
        backend=backend,
        threads_per_rank=threads,
        strategy=cfg.strategy.name,
        precision=t.precision,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        effective_batch_size=effective,
        train_samples=train_samples,
        eval_samples=eval_samples,
        steps_per_epoch=steps_per_epoch,
        num_train_epochs=(total / steps_per_epoch) if steps_per_epoch else 0.0,
        total_steps=total,
        warmup_steps=warmup,
        tokens_per_step=effective * cfg.data.seq_len,
        logging_steps=resolve_steps(t.logging_steps, total) or 1,
        eval_steps=resolve_steps(t.eval_steps, total),
        save_steps=resolve_steps(t.save_steps, total),
        env=env,
        notes=list(t.notes),
    )
    if sch.warmup_ratio > 0:
        plan.notes.append(f"scheduler.warmup_ratio is transformers 4's name (removed in transformers 5); write scheduler.warmup_steps={sch.warmup_ratio:g} (a ratio below 1)")
    if tokenized is not None and tokenized.folder:
        plan.data_cache = tokenized.folder
        plan.tokenized = dataclasses.asdict(tokenized)
    elif unknown and cfg.data.is_text:
        plan.warnings.append("samples: known after tokenization (a dry run tokenizes nothing); steps from train.max_steps only")
    if t.save_only_model:
        plan.warnings.append(
            "train.save_only_model: checkpoints hold the model only; a resume from one (train.resume, a restart or requeue) "
            "restarts the optimizer and is not exact (it says so in the log); set it to false for exact resumes"
        )
    if cfg.strategy.is_deepspeed:
        plan.deepspeed = deepspeed_config(cfg, world_size=world)
    plan.memory, memory_warnings = plan_memory(cfg, world_size=world)
    plan.warnings.extend(memory_warnings)
    job = backend_for(cfg.cluster.name).render(cfg, plan, python=sys.executable)
    plan.command, plan.script = job.command, job.script
    return plan


def format_gb(gb: float) -> str:
    return f"{gb:.3g} GB" if gb >= 0.1 else f"{gb * 1e3:.3g} MB"


def samples_line(plan: Plan, cfg: RunConfig) -> str:
    if cfg.data.is_text and not plan.data_cache:
        return "known after tokenization"
    if cfg.data._target_:  # its code runs on the ranks, not in the launcher
        train = f"{plan.train_samples} train (data.num_samples)" if plan.train_samples else "train"
        return f"{train}{' and' if not plan.train_samples else ','} validation known on the ranks ({cfg.data._target_} is called there)"
    line = f"{plan.train_samples} train, {plan.eval_samples} validation"
    if plan.data_cache:
        tok = plan.tokenized
        packed = f" packed rows of {cfg.data.seq_len} tokens from {tok['samples'].get('train', 0)} samples," if cfg.data.packing else ""
        how = "cache hit, nothing tokenized" if tok.get("hit") else f"tokenized in {tok.get('seconds', 0):.1f} s"
        line += f" ({packed} {tok['tokens'].get('train', 0)} train tokens; {how}: {plan.data_cache})".replace("( ", "(")
    return line


def tokens_line(plan: Plan, cfg: RunConfig) -> str:
    """tokens_per_step is batch x seq_len: exact for fixed-length data, an upper bound for padded
    text; with the tokenized cache known, the mean number of labelled tokens a step beside it."""
    if not cfg.data.is_text:
        return f"{plan.tokens_per_step} tokens/step"
    labelled, samples = plan.tokenized.get("labelled", {}).get("train"), plan.train_samples
    mean = f"; {labelled / samples * plan.effective_batch_size:.0f} labelled tokens/step on average" if labelled and samples else ""
    return f"at most {plan.tokens_per_step} tokens/step{mean}"


def steps_line(plan: Plan, cfg: RunConfig) -> str:
    """Steps per epoch and in all; without a sample count (a data._target_ dataset without
    data.num_samples, text before tokenization) the epoch's steps are known later, the total is
    train.max_steps (the schema asks for it then)."""
    if plan.steps_per_epoch == 0 and not plan.train_samples:
        when = "after tokenization" if cfg.data.is_text else "on the ranks"
        return f"per epoch known {when}, {plan.total_steps} total (train.max_steps), warmup {plan.warmup_steps}"
    return f"{plan.steps_per_epoch} per epoch, {plan.total_steps} total ({plan.num_train_epochs:.3g} epochs), warmup {plan.warmup_steps}"


def intervals_line(plan: Plan, cfg: RunConfig) -> str:
    """Logging, evaluation and saving as the ranks will do them (ratios resolved to steps)."""
    t = cfg.train
    parts = [f"log every {plan.logging_steps}" + (" and step 1" if t.logging_first_step else "")]
    if t.eval_strategy != "no":
        every = f"every {plan.eval_steps or plan.logging_steps} steps" if t.eval_strategy == "steps" else "every epoch"
        parts.append(f"evaluate {every}" + (f" from {t.eval_delay:g} {'steps' if t.eval_strategy == 'steps' else 'epochs'}" if t.eval_delay else ""))
    if t.save_strategy != "no":
        parts.append({"steps": f"save every {plan.save_steps} steps", "epoch": "save every epoch", "best": f"save when {t.eval_metric} improves"}[t.save_strategy])
    return ", ".join(parts)


def render_plan(plan: Plan, cfg: RunConfig) -> str:
    """The plan as a person reads it, printed before every launch."""
    rows = [
        ("run directory", plan.run_dir),
        ("where", f"{plan.cluster}: {plan.nodes} node(s) x {plan.nproc_per_node} process(es) = world size {plan.world_size}"),
        ("hardware", f"{cfg.hw.name}: {plan.accelerator}, {plan.backend}, {plan.threads_per_rank} thread(s) per rank"),
        ("model / data", f"{cfg.model.name} / {cfg.data.name} (seq_len {cfg.data.seq_len})"),
        ("strategy", f"{plan.strategy}, {plan.precision}" + (", gradient checkpointing" if cfg.train.gradient_checkpointing else "")),
        ("batch", f"{plan.per_device_train_batch_size} per device x {plan.world_size} ranks x {plan.gradient_accumulation_steps} accumulation = {plan.effective_batch_size} effective ({tokens_line(plan, cfg)})"),
        ("samples", samples_line(plan, cfg)),
        ("steps", steps_line(plan, cfg)),
        ("intervals", intervals_line(plan, cfg)),
        ("optimizer", f"{cfg.optimizer.name} lr {cfg.optimizer.learning_rate:g}, {cfg.scheduler.name} schedule"),
    ]
    if plan.memory:
        mem = dict(plan.memory)
        count = mem.pop("num_parameters", 0.0)
        trainable = mem.pop("num_trainable_parameters", None)  # LoRA: the adapter's (frozen parameters: the base's weights)
        counts = f"{count / 1e6:.4g} M parameters" + (f", {trainable / 1e6:.4g} M train ({cfg.peft.method} r {cfg.peft.r})" if trainable is not None else "")
        rows.append(("memory/rank", f"{counts}; " + ", ".join(f"{k.replace('_', ' ')} {format_gb(v)}" for k, v in mem.items())))
    width = max(len(k) for k, _ in rows)
    lines = ["ringleader plan"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append(f"  command  {plan.command_line}")
    if plan.deepspeed:
        lines += ["  deepspeed config:", *("    " + line for line in json.dumps(plan.deepspeed, indent=2).splitlines())]
    if plan.script:
        lines += ["  sbatch script:", *("    " + line for line in plan.script.splitlines())]
    return "\n".join(lines)
