"""Strategies: how the model is replicated or sharded. One interface; the loop never asks which."""

from __future__ import annotations

from trainer.strategies.base import Strategy


def build_strategy(name: str, **kwargs) -> Strategy:
    if name == "ddp":
        from trainer.strategies.ddp import DDPStrategy

        return DDPStrategy(**kwargs)
    if name == "fsdp":
        from trainer.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(**kwargs)
    if name in ("zero1", "zero2", "zero3", "zero3_offload"):
        from trainer.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(**kwargs)
    raise ValueError(f"unknown strategy {name}")
