"""Optimizers and learning-rate schedules, with transformers' definitions of each schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from launcher.schema import OptimizerConfig, SchedulerConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms and embeddings of rank < 2 are not decayed (as nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, foreach=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)
    if cfg.name in ("paged_adamw_32bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb  # CUDA only; the launcher refuses these on CPU

        kind = bnb.optim.PagedAdamW32bit if cfg.name.endswith("32bit") else bnb.optim.PagedAdamW8bit
        return kind(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    raise ValueError(f"unknown optimizer {cfg.name}")


def lr_lambda(cfg: SchedulerConfig, *, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at step s (0-based), as transformers' get_scheduler."""

    def warmup(step: int) -> float:
        return step / max(1, warmup_steps)

    def linear(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cfg.num_cycles * 2.0 * progress)))

    def constant_with_warmup(step: int) -> float:
        return warmup(step) if step < warmup_steps else 1.0

    return {"linear": linear, "cosine": cosine, "constant": lambda step: 1.0, "constant_with_warmup": constant_with_warmup}[cfg.name]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps=total_steps, warmup_steps=warmup_steps))
