"""Build the model from its config: ringleader's GPT, or a user's class or function by `_target_`."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from launcher.registry import GPT_TARGET
from launcher.schema import ModelConfig
from launcher.targets import load_target

GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def model_factory(cfg: ModelConfig) -> Callable[..., nn.Module]:
    return load_target(cfg._target_, "model._target_")


def model_kwargs(cfg: ModelConfig) -> dict:
    if cfg._target_ == GPT_TARGET:
        return {k: getattr(cfg, k) for k in GPT_FIELDS}
    return dict(cfg.kwargs)


def build_model(cfg: ModelConfig, *, device: str | None = None) -> nn.Module:
    factory = model_factory(cfg)
    if device is None:
        return factory(**model_kwargs(cfg))
    import torch

    with torch.device(device):
        return factory(**model_kwargs(cfg))
