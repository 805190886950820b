"""Build the model from its config: ringleader's GPT, a transformers causal LM
(_target_=transformers.AutoModelForCausalLM: trainer/hf_model.py), or a user's class or function by `_target_`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn as nn

from launcher.registry import GPT_TARGET, HF_TARGET
from launcher.schema import ModelConfig
from launcher.targets import load_target

GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def zero3_pretrained(spec, ds_config: dict) -> nn.Module:
    """from_pretrained under ZeRO-3: the HfDeepSpeedConfig makes transformers build inside
    deepspeed.zero.Init and load each weight into its partitions. It stays alive with the model:
    transformers asks it whether ZeRO-3 is on while training (embedding resizes, generation)."""
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from trainer.hf_model import build_causal_lm

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo", dist_init_required=False)
    keep = HfDeepSpeedConfig(dict(ds_config))
    model = build_causal_lm(spec, init="full")
    setattr(model, "ringleader_hf_deepspeed", keep)  # kept alive with the model (zero.Init reads it)
    params = list(model.parameters())
    held, total = sum(getattr(p, "ds_tensor", p).numel() for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)
    logging.getLogger("ringleader").info("zero3: pretrained weights loaded partitioned, %d of %d parameter elements on this rank", held, total)
    return model


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


def build_model(cfg: ModelConfig, *, device: str | None = None, strategy: str = "ddp", seed: int = 0, deepspeed: dict | None = None) -> nn.Module:
    """The model on this rank. A transformers model with pretrained weights under fsdp is built on
    the meta device; the strategy fills it after sharding (trainer/strategies/fsdp.py, from rank 0's
    safetensors). Under zero3 (`deepspeed`: the plan's DeepSpeed config) pretrained weights load
    inside deepspeed.zero.Init (transformers does it while an HfDeepSpeedConfig is alive), so each
    parameter is partitioned as it is created. Random weights are made in full on every rank (the
    same seed gives the same model on every strategy)."""
    if cfg._target_ == HF_TARGET:
        from trainer.hf_model import build_causal_lm, load_plan

        spec = hf_spec(cfg)
        plan = load_plan(strategy, pretrained=bool(cfg.name_or_path))
        if plan.init == "zero3" and cfg.name_or_path and deepspeed:
            return zero3_pretrained(spec, deepspeed)
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
