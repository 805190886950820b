"""Optimizers and learning-rate schedules, each with Hugging Face Trainer's meaning.

Schedules are pure functions of the step (transformers' formulas, written out here so a rank never
imports transformers for them); tests/test_schedulers.py checks every one step by step against
`transformers.get_scheduler`. The options' tables and parsers are launcher/options.py's (the launcher
refuses bad `scheduler.lr_scheduler_kwargs` and `optimizer.optim_args` with them before anything
starts). torch is imported only by the functions that build optimizers and schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from launcher.options import OptionError, parse_optim_args, schedule_kwargs  # noqa: F401  (the checked tables)
from launcher.registry import ADAMW, BITSANDBYTES

if TYPE_CHECKING:
    import torch

    from launcher.schema import OptimizerConfig, SchedulerConfig

# -- schedules ------------------------------------------------------------------------------------

def schedule_lambda(name: str, kwargs: dict[str, Any], *, total_steps: int, warmup_steps: int, num_cycles: float = 0.5) -> Callable[[int], float]:
    """The multiplier of the base learning rate at step s (0-based): transformers' lr_lambda of the
    same name, with `kwargs` as schedule_kwargs returned them. Written with transformers'
    operations in transformers' order, so the rates agree to the last bit or nearly."""
    W, T = warmup_steps, total_steps

    def warmup(step: int) -> float:
        return float(step) / float(max(1, W))

    def linear(step: int) -> float:
        if step < W:
            return warmup(step)
        return max(0.0, float(T - step) / float(max(1, T - W)))

    def progress(step: int) -> float:
        return float(step - W) / float(max(1, T - W))

    def cosine(step: int) -> float:
        if step < W:
            return warmup(step)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress(step))))

    def cosine_with_restarts(step: int) -> float:
        if step < W:
            return warmup(step)
        p = progress(step)
        if p >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * p) % 1.0))))

    def cosine_with_min_lr(step: int) -> float:
        if step < W:
            return warmup(step)
        rate = kwargs["min_lr_rate"]
        factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress(step)))
        return max(0, factor * (1 - rate) + rate)

    def cosine_warmup_with_min_lr(step: int) -> float:
        # transformers' variant: the warmup starts above 0 and the decay one step earlier.
        s, w, t = float(step), float(W), float(T)
        rate, start = kwargs["min_lr_rate"], kwargs["warmup_lr_rate"]
        if s < w:
            if start is None:
                return (s + 1.0) / max(1.0, w)
            return float(start) + (1.0 - float(start)) * s / max(1, w - 1)
        p = (s - w + 1.0) / max(1.0, t - w)
        factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * p))
        return max(0, factor * (1 - rate) + rate)

    def polynomial(step: int) -> float:
        # transformers divides by the initial rate; LambdaLR multiplies by it again.
        lr_init, lr_end, power = kwargs["lr_init"], kwargs["lr_end"], kwargs["power"]
        if step < W:
            return warmup(step)
        if step > T or T == W:  # T == W: transformers divides by zero at step T; the run is over
            return lr_end / lr_init
        pct_remaining = 1 - (step - W) / (T - W)
        return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init

    timescale = kwargs.get("timescale") or W or 10_000  # transformers' default

    def inverse_sqrt(step: int) -> float:
        if step < W:
            return warmup(step)
        return 1.0 / math.sqrt((step + timescale - W) / timescale)

    def constant_with_warmup(step: int) -> float:
        return warmup(step) if step < W else 1.0

    def warmup_stable_decay(step: int) -> float:
        decay, ratio = kwargs["num_decay_steps"], kwargs["min_lr_ratio"]
        stable = kwargs["num_stable_steps"]
        if stable is None:
            stable = T - W - decay
        if step < W:
            p = float(step) / float(max(1, W))
            f = {"linear": lambda: p, "cosine": lambda: 0.5 * (1.0 - math.cos(math.pi * p)), "1-sqrt": lambda: 1.0 - math.sqrt(1.0 - p)}[kwargs["warmup_type"]]()
            return max(0.0, f * (1.0 - ratio) + ratio)
        if step < W + stable:
            return 1.0
        if step < W + stable + decay:
            p = float(step - W - stable) / float(max(1, decay))
            f = {"linear": lambda: 1.0 - p, "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * p)), "1-sqrt": lambda: 1.0 - math.sqrt(p)}[kwargs["decay_type"]]()
            return max(0.0, f * (1.0 - ratio) + ratio)
        return ratio

    table: dict[str, Callable[[int], float]] = {
        "linear": linear,
        "cosine": cosine,
        "cosine_with_restarts": cosine_with_restarts,
        "constant": lambda step: 1.0,
        "constant_with_warmup": constant_with_warmup,
        "polynomial": polynomial,
        "inverse_sqrt": inverse_sqrt,
        "cosine_with_min_lr": cosine_with_min_lr,
        "cosine_warmup_with_min_lr": cosine_warmup_with_min_lr,
        "warmup_stable_decay": warmup_stable_decay,
    }
    return table[name]


def lr_lambda(cfg: SchedulerConfig, *, total_steps: int, warmup_steps: int, learning_rate: float) -> Callable[[int], float]:
    """The multiplier of the base learning rate at step s (0-based), as transformers' get_scheduler."""
    kwargs = schedule_kwargs(cfg.name, getattr(cfg, "lr_scheduler_kwargs", None), learning_rate=learning_rate)
    kwargs["lr_init"] = learning_rate
    return schedule_lambda(cfg.name, kwargs, total_steps=total_steps, warmup_steps=warmup_steps, num_cycles=cfg.num_cycles)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    # The base rate the schedule starts from, as transformers reads optimizer.defaults["lr"]
    # (DeepSpeed hands a wrapped optimizer without `defaults`, whose groups carry the rate).
    group = optimizer.param_groups[0]
    learning_rate = float(group.get("initial_lr", group["lr"]))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps=total_steps, warmup_steps=warmup_steps, learning_rate=learning_rate))


# -- optimizers -----------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms and embeddings of rank < 2 are not decayed (as nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    import torch

    groups = param_groups(model, cfg.weight_decay)
    extra = parse_optim_args(cfg.name, getattr(cfg, "optim_args", ""))
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.name in ("adamw", "adamw_torch"):
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, foreach=True, **extra)
    if cfg.name == "adamw_torch_fused":
        # One fused kernel per step. torch 2.13 has it for CPU and CUDA tensors alike (checked on
        # this CPU build); a device without it makes torch raise here, never a silent fallback.
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, fused=True, **extra)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum, **extra)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # Trainer's arguments: a fixed rate from the schedule, no parameter-scale rescaling.
        kwargs: dict[str, Any] = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **extra}
        return Adafactor(groups, lr=cfg.learning_rate, **kwargs)
    if cfg.name in BITSANDBYTES:
        import bitsandbytes as bnb  # CUDA only; the launcher refuses these on CPU

        # As Trainer: bitsandbytes' AdamW with the state's bits and paging chosen by the name.
        bits = 8 if cfg.name.endswith("8bit") else 32
        return bnb.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, optim_bits=bits, is_paged=cfg.name.startswith("paged_"), **extra)
    raise ValueError(f"unknown optimizer {cfg.name}")
