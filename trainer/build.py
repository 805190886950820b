"""Build the model from its config: ringleader's GPT, a transformers causal LM
(_target_=transformers.AutoModelForCausalLM: trainer/hf_model.py), or a user's class or function by `_target_`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn as nn

from launcher.registry import GPT_TARGET, HF_TARGET
from launcher.schema import ModelConfig, PeftConfig
from launcher.targets import load_target

GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def zero3_pretrained(spec, ds_config: dict) -> nn.Module:
    """Pretrained weights under ZeRO-3: built inside deepspeed.zero.Init (the HfDeepSpeedConfig
    turns it on), rank 0 reading each weight into its partitions (hf_model.zero3_load_pretrained;
    transformers' from_pretrained where that cannot serve). It stays alive with the model:
    transformers asks it whether ZeRO-3 is on while training (embedding resizes, generation)."""
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from trainer.hf_model import build_causal_lm

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo", dist_init_required=False)
    keep = HfDeepSpeedConfig(dict(ds_config))
    model = build_causal_lm(spec, init="zero3")
    setattr(model, "ringleader_hf_deepspeed", keep)  # kept alive with the model (zero.Init reads it)
    params = list(model.parameters())
    held, total = sum(getattr(p, "ds_tensor", p).numel() for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)
    logging.getLogger("ringleader").info("zero3: pretrained weights loaded partitioned, %d of %d parameter elements on this rank", held, total)
    return model


def zero3_random(spec, ds_config: dict, *, seed: int) -> nn.Module:
    """Random weights under ZeRO-3, built partitioned: every rank builds inside
    deepspeed.zero.Init (transformers does while an HfDeepSpeedConfig is alive), so no rank keeps
    the whole model from that build. The values are the seed's: rank 0 alone makes the seeded
    model in full, exactly as ddp builds it, and copies it into the partitions one parameter at a
    time (gathered with rank 0 as the modifier, then partitioned again), so the same seed gives
    the same model on every strategy. Host memory: one full copy on rank 0 while it builds, none
    on the other ranks (before: one on every rank)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from trainer.hf_model import build_causal_lm

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo", dist_init_required=False)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    # Built before the HfDeepSpeedConfig exists, so transformers makes it in full, as for ddp.
    reference = dict(build_causal_lm(spec, init="full", seed=seed).named_parameters()) if rank0 else {}
    keep = HfDeepSpeedConfig(dict(ds_config))
    model = build_causal_lm(spec, init="full", seed=seed)  # inside zero.Init: partitioned as created
    setattr(model, "ringleader_hf_deepspeed", keep)  # kept alive with the model (zero.Init reads it)
    with torch.no_grad():
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank0:
                    param.data.copy_(reference.pop(name).data)
    params = list(model.parameters())
    held, total = sum(getattr(p, "ds_tensor", p).numel() for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)
    logging.getLogger("ringleader").info("zero3: random weights (seed %d) built partitioned, %d of %d parameter elements on this rank", seed, held, total)
    return model


def build_adapted(cfg: ModelConfig, *, strategy: str, seed: int, deepspeed: dict | None, peft: PeftConfig, gradient_checkpointing: bool) -> nn.Module:
    """A transformers model with LoRA/QLoRA adapters (trainer/lora.py). The base loads as for full
    training: in full (ddp, zero1/2), on the meta device to be filled after sharding (fsdp), or
    partitioned inside zero.Init (zero3); QLoRA's 4-bit base is made by bitsandbytes as it loads,
    so never on the meta device. peft then injects the adapters, before any strategy wraps it."""
    from trainer.hf_model import build_causal_lm, load_plan
    from trainer.lora import apply_lora, bnb_config

    spec = hf_spec(cfg)
    qlora = peft.method == "qlora"
    if qlora:
        spec.quantization = bnb_config(peft)
    plan = load_plan(strategy, pretrained=not (qlora and strategy == "fsdp"))  # model.name_or_path is required (the launcher checks)
    if plan.init == "zero3" and deepspeed:
        model = zero3_pretrained(spec, deepspeed)
    else:
        model = build_causal_lm(spec, init="meta" if plan.init == "meta" else "full", seed=seed)
        if plan.rank0_broadcast:
            model.ringleader_weights = cfg.name_or_path  # read by FSDPStrategy.wrap after sharding
    return apply_lora(model, peft, seed=seed, base=cfg.name_or_path, gradient_checkpointing=gradient_checkpointing)


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


def build_model(
    cfg: ModelConfig, *, device: str | None = None, strategy: str = "ddp", seed: int = 0, deepspeed: dict | None = None, peft: PeftConfig | None = None, gradient_checkpointing: bool = False,
) -> nn.Module:
    """The model on this rank. A transformers model with pretrained weights under fsdp is built on
    the meta device; the strategy fills it after sharding (trainer/strategies/fsdp.py, from rank 0's
    safetensors). Under zero3 (`deepspeed`: the plan's DeepSpeed config) pretrained weights load
    inside deepspeed.zero.Init (transformers does it while an HfDeepSpeedConfig is alive), so each
    parameter is partitioned as it is created; random weights too, with rank 0's seeded values
    (zero3_random). Elsewhere random weights are made in full on every rank (the same seed gives
    the same model on every strategy)."""
    if peft is not None and peft.enabled:  # LoRA/QLoRA (the launcher allows them on transformers models only)
        return build_adapted(cfg, strategy=strategy, seed=seed, deepspeed=deepspeed, peft=peft, gradient_checkpointing=gradient_checkpointing)
    if cfg._target_ == HF_TARGET:
        from trainer.hf_model import build_causal_lm, load_plan

        spec = hf_spec(cfg)
        plan = load_plan(strategy, pretrained=bool(cfg.name_or_path))
        if plan.init == "zero3" and deepspeed:
            return zero3_pretrained(spec, deepspeed) if cfg.name_or_path else zero3_random(spec, deepspeed, seed=seed)
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
