"""Build the model from its config: ringleader's GPT, a transformers causal LM
(_target_=transformers.AutoModelForCausalLM: trainer/hf_model.py), or a user's class or function by `_target_`."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from launcher.registry import GPT_TARGET, HF_TARGET
from launcher.schema import ModelConfig
from launcher.targets import load_target

GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def model_factory(cfg: ModelConfig) -> Callable[..., nn.Module]:
    return load_target(cfg._target_, "model._target_")


def model_kwargs(cfg: ModelConfig) -> dict:
    if cfg._target_ == GPT_TARGET:
        return {k: getattr(cfg, k) for k in GPT_FIELDS}
    return dict(cfg.kwargs)


def hf_spec(cfg: ModelConfig):
    from trainer.hf_model import HFModelSpec

    return HFModelSpec(
        name_or_path=cfg.name_or_path, config=cfg.config, revision=cfg.revision, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code, tokenizer=cfg.tokenizer_source,
    )


def build_model(cfg: ModelConfig, *, device: str | None = None, strategy: str = "ddp", seed: int = 0) -> nn.Module:
    """The model on this rank. A transformers model with pretrained weights under fsdp is built on
    the meta device; the strategy fills it after sharding (trainer/strategies/fsdp.py, from rank 0's
    safetensors). Under zero3 the model is built in full on each rank, then partitioned by
    DeepSpeed (deepspeed.zero.Init at build time is not wired yet)."""
    if cfg._target_ == HF_TARGET:
        from trainer.hf_model import build_causal_lm, load_plan

        spec = hf_spec(cfg)
        plan = load_plan(strategy, pretrained=bool(cfg.name_or_path))
        init = "meta" if plan.init == "meta" else "full"
        model = build_causal_lm(spec, init=init, seed=seed)
        if plan.rank0_broadcast:
            model.ringleader_weights = cfg.name_or_path  # read by FSDPStrategy.wrap after sharding
        return model
    factory = model_factory(cfg)
    if device is None:
        return factory(**model_kwargs(cfg))
    import torch

    with torch.device(device):
        return factory(**model_kwargs(cfg))
