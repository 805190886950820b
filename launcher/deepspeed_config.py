"""The DeepSpeed config, derived from ringleader's one schema: no setting is written twice.

A pure function of the run's config and world size. The launcher shows it in the plan (a dry run
prints it) and every rank of a zero* run passes the same dict to `deepspeed.initialize`. Imports
nothing heavy.

What the schema owns (a user key under `strategy.deepspeed` that contradicts it is refused):
micro-batch, accumulation, batch size, clipping, precision, optimizer, scheduler, ZeRO stage and
whether to offload. Everything else DeepSpeed knows (bucket sizes, overlap, offload device,
pin_memory, ...) the user may add under `strategy.deepspeed`; it is merged in as given.

The learning-rate schedule is not in the dict: the trainer passes ringleader's LambdaLR (the
formulas of transformers) to `deepspeed.initialize`, because DeepSpeed's WarmupLR and
WarmupDecayLR ramp differently, and DDP, FSDP and ZeRO must follow the same numbers.
"""

from __future__ import annotations

import copy
from typing import Any

from launcher.trajectory import flatten

from launcher.errors import ConfigError
from launcher.registry import ZERO_STAGES
from launcher.schema import RunConfig

# Keys of the derived dict and the schema key that owns each. A whole section (optimizer,
# scheduler) is owned as one: DeepSpeed must not build another optimizer or schedule.
OWNED: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "train.per_device_train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.per_device_train_batch_size",
    "gradient_clipping": "train.max_grad_norm",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "bf16.enabled": "train.bf16",
    "fp16.enabled": "train.fp16",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer": "strategy.offload_optimizer",
    "zero_optimization.offload_param": "strategy.offload_param",
}
# Inside an offload section the device is the user's choice (cpu or nvme), but "none" would
# contradict the schema's offload switch.
OFFLOAD_DEVICES = ("cpu", "nvme")


def optimizer_section(cfg: RunConfig) -> dict[str, Any] | None:
    """DeepSpeed builds the optimizer from this; None: the trainer passes its own (bitsandbytes).

    torch_adam: PyTorch's AdamW, the same update as DDP and FSDP (DeepSpeed's FusedAdam needs
    CUDA). With offload the update runs in DeepSpeed's CPU Adam, built by JIT the first time."""
    o = cfg.optimizer
    if o.name in ("adamw", "adamw_torch"):
        params: dict[str, Any] = {"lr": o.learning_rate, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_epsilon, "weight_decay": o.weight_decay}
        if not cfg.strategy.offload_optimizer:
            params["torch_adam"] = True
        return {"type": "AdamW", "params": params}
    if o.name == "sgd":
        return {"type": "SGD", "params": {"lr": o.learning_rate, "momentum": o.momentum, "weight_decay": o.weight_decay}}
    return None


def derive(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    """The config before the user's extra keys."""
    t, s = cfg.train, cfg.strategy
    zero: dict[str, Any] = {"stage": ZERO_STAGES[s.name]}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if s.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": t.bf16},
        "fp16": {"enabled": t.fp16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # ringleader logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    section = optimizer_section(cfg)
    if section is not None:
        ds["optimizer"] = section
    if section is None or section["type"] != "AdamW":
        # torch's SGD and bitsandbytes (a client optimizer) are not on ZeRO's tested list.
        ds["zero_allow_untested_optimizer"] = True
    if t.fp16:
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1})
    return ds



def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_user_keys(derived: dict[str, Any], user: dict[str, Any]) -> None:
    """Refuse a user key that sets something the schema owns to another value."""
    for key, value in flatten(user, whole=frozenset({"optimizer", "scheduler"})).items():  # those sections stay whole
        owner = next((o for o in OWNED if key == o or key.startswith(o + ".")), None)
        if owner is None:
            continue
        schema_key = OWNED[owner]
        where = f"strategy.deepspeed.{key}"
        if owner in ("optimizer", "scheduler"):
            raise ConfigError(where, f"the {owner} comes from ringleader's `{owner}` group; set {schema_key}=... or its fields, and drop strategy.deepspeed.{owner}")
        if owner.startswith("zero_optimization.offload_"):
            on = lookup(derived, owner) is not None
            if not on:
                raise ConfigError(where, f"contradicts {schema_key}=false; set {schema_key}=true (or strategy=zero3_offload) instead")
            if key == owner + ".device" and value not in OFFLOAD_DEVICES:
                raise ConfigError(where, f"is {value!r} but {schema_key}=true; give one of {', '.join(OFFLOAD_DEVICES)}, or set {schema_key}=false")
            continue  # device cpu/nvme, pin_memory, buffer sizes, nvme_path: DeepSpeed-only
        ours = lookup(derived, owner)
        if ours != value:
            raise ConfigError(where, f"is {value!r} but {schema_key} gives {ours!r}; DeepSpeed's value is derived from {schema_key}: set that key and drop strategy.deepspeed.{key}")


def lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def deepspeed_config(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize: derived from the schema, plus the user's
    DeepSpeed-only keys from strategy.deepspeed. Raises ConfigError on a contradiction."""
    derived = derive(cfg, world_size=world_size)
    user = cfg.strategy.deepspeed or {}
    check_user_keys(derived, user)
    return merge(derived, user)
