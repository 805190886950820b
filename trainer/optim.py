"""Optimizers and learning-rate schedules, each with Hugging Face Trainer's meaning.

Schedules are pure functions of the step (transformers' formulas, written out here so a rank never
imports transformers for them); tests/test_schedulers.py checks every one step by step against
`transformers.get_scheduler`. The tables and parsers at the top import nothing heavy: the launcher
calls them to refuse bad `scheduler.lr_scheduler_kwargs` and `optimizer.optim_args` before anything
starts. torch is imported only by the functions that build optimizers and schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from launcher.schema import OptimizerConfig, SchedulerConfig

# -- schedules ------------------------------------------------------------------------------------

# Each schedule's lr_scheduler_kwargs: name -> (type, default). `None` default: optional, no value.
# `num_cycles` is not among them: it is scheduler.num_cycles, one place for one setting.
_MIN_LR = {"min_lr": (float, None), "min_lr_rate": (float, None)}
SCHEDULE_KWARGS: dict[str, dict[str, tuple[type, Any]]] = {
    "linear": {},
    "cosine": {},
    "cosine_with_restarts": {},
    "constant": {},
    "constant_with_warmup": {},
    "polynomial": {"lr_end": (float, 1e-7), "power": (float, 1.0)},
    "inverse_sqrt": {"timescale": (int, None)},
    "cosine_with_min_lr": dict(_MIN_LR),
    "cosine_warmup_with_min_lr": {**_MIN_LR, "warmup_lr_rate": (float, None)},
    "warmup_stable_decay": {
        "num_decay_steps": (int, None),  # required, as in transformers
        "num_stable_steps": (int, None),  # None: total - warmup - decay
        "warmup_type": (str, "linear"),
        "decay_type": (str, "cosine"),
        "min_lr_ratio": (float, 0.0),
    },
}
SCHEDULES = tuple(SCHEDULE_KWARGS)
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
# Trainer schedules ringleader does not run, and why (the refusal says it).
UNSUPPORTED_SCHEDULES = {
    "reduce_lr_on_plateau": "it steps on an evaluation metric, not on the optimizer step; use cosine_with_min_lr or warmup_stable_decay",
    "greedy": "it steps on the training loss; use cosine_with_min_lr or warmup_stable_decay",
}


class OptionError(ValueError):
    """A bad schedule or optimizer option: `key` names it (relative to its group), `message` the fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise OptionError(key, f"must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(key, f"must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise OptionError(key, f"must be a whole number of steps, got {value!r}")
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise OptionError(key, f"must be a finite number, got {value}")
    return value


def schedule_kwargs(name: str, given: dict[str, Any] | None, *, learning_rate: float) -> dict[str, Any]:
    """The schedule's arguments with transformers' defaults filled in, checked. Raises OptionError
    naming `lr_scheduler_kwargs.<key>` for an unknown key, a wrong type or a bad value."""
    if name in UNSUPPORTED_SCHEDULES:
        raise OptionError("name", f"{name} is not supported: {UNSUPPORTED_SCHEDULES[name]}")
    if name not in SCHEDULE_KWARGS:
        raise OptionError("name", f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    spec = SCHEDULE_KWARGS[name]
    out: dict[str, Any] = {}
    for key, value in (given or {}).items():
        where = f"lr_scheduler_kwargs.{key}"
        if key == "num_cycles":
            raise OptionError(where, "is scheduler.num_cycles in ringleader; set scheduler.num_cycles=... and drop it from lr_scheduler_kwargs")
        if key not in spec:
            takes = ", ".join(spec) or "none"
            raise OptionError(where, f"is not an argument of the {name} schedule (it takes: {takes}); drop it or pick another scheduler")
        out[key] = None if value is None else _coerce(where, value, spec[key][0])
    for key, (_, default) in spec.items():
        if out.get(key) is None:
            out[key] = default
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        if out["min_lr"] is not None and out["min_lr_rate"] is not None:
            raise OptionError("lr_scheduler_kwargs.min_lr", "and min_lr_rate are both set; keep one (~scheduler.lr_scheduler_kwargs.min_lr_rate drops the group file's)")
        if out["min_lr"] is None and out["min_lr_rate"] is None:
            raise OptionError("lr_scheduler_kwargs", f"the {name} schedule needs min_lr or min_lr_rate; set e.g. +scheduler.lr_scheduler_kwargs.min_lr_rate=0.1")
        if out["min_lr"] is not None:
            if out["min_lr"] < 0:
                raise OptionError("lr_scheduler_kwargs.min_lr", f"must be >= 0, got {out['min_lr']}")
            out["min_lr_rate"] = out["min_lr"] / learning_rate  # as transformers: min_lr / optimizer lr
        if not 0 <= out["min_lr_rate"] <= 1:
            raise OptionError("lr_scheduler_kwargs.min_lr_rate", f"must be in [0, 1] (a fraction of the learning rate), got {out['min_lr_rate']}")
        del out["min_lr"]
    if name == "polynomial":
        if not out["lr_end"] < learning_rate:
            raise OptionError("lr_scheduler_kwargs.lr_end", f"{out['lr_end']} must be below optimizer.learning_rate {learning_rate}; lower it")
        if out["power"] <= 0:
            raise OptionError("lr_scheduler_kwargs.power", f"must be > 0, got {out['power']}")
    if name == "inverse_sqrt" and out["timescale"] is not None and out["timescale"] < 1:
        raise OptionError("lr_scheduler_kwargs.timescale", f"must be >= 1 step, got {out['timescale']}")
    if name == "warmup_stable_decay":
        if out["num_decay_steps"] is None:
            raise OptionError("lr_scheduler_kwargs.num_decay_steps", "is required by warmup_stable_decay; set e.g. scheduler.lr_scheduler_kwargs.num_decay_steps=100")
        if out["num_decay_steps"] < 0:
            raise OptionError("lr_scheduler_kwargs.num_decay_steps", f"must be >= 0, got {out['num_decay_steps']}")
        if out["num_stable_steps"] is not None and out["num_stable_steps"] < 0:
            raise OptionError("lr_scheduler_kwargs.num_stable_steps", f"must be >= 0, got {out['num_stable_steps']}")
        for key in ("warmup_type", "decay_type"):
            if out[key] not in WSD_SHAPES:
                raise OptionError(f"lr_scheduler_kwargs.{key}", f"'{out[key]}' is not one of {', '.join(WSD_SHAPES)}")
        if not 0 <= out["min_lr_ratio"] <= 1:
            raise OptionError("lr_scheduler_kwargs.min_lr_ratio", f"must be in [0, 1], got {out['min_lr_ratio']}")
    return out


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

# `optim` names: adamw is ringleader's historical name for adamw_torch (foreach AdamW).
ADAMW = ("adamw", "adamw_torch", "adamw_torch_fused")
BNB = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")  # bitsandbytes: CUDA only
OPTIMIZERS = (*ADAMW, "sgd", "adafactor", *BNB)
# optim_args each optimizer takes, with the type of the value (Trainer passes a "k=v,k=v" string).
# Settings that have their own optimizer.* field are refused there, naming the field.
OPTIM_ARGS: dict[str, dict[str, type]] = {
    **dict.fromkeys(ADAMW, {"amsgrad": bool}),
    "sgd": {"dampening": float, "nesterov": bool},
    "adafactor": {"clip_threshold": float, "decay_rate": float, "beta1": float, "scale_parameter": bool},
    **dict.fromkeys(BNB, {"min_8bit_size": int, "percentile_clipping": int}),
}
# optim_args keys that are optimizer.* fields in ringleader (one place for one setting).
FIELD_OF = {"lr": "learning_rate", "learning_rate": "learning_rate", "weight_decay": "weight_decay"}
ADAM_FIELD_OF = {"betas": "adam_beta1 and optimizer.adam_beta2", "beta1": "adam_beta1", "beta2": "adam_beta2", "eps": "adam_epsilon"}


def reserved_field(name: str, key: str) -> str | None:
    """The optimizer.* field that holds `key` for optimizer `name`, if it has one."""
    if key in FIELD_OF:
        return FIELD_OF[key]
    if name == "sgd" and key == "momentum":
        return "momentum"
    if name in ADAMW or name in BNB:
        return ADAM_FIELD_OF.get(key)
    return None


UNSUPPORTED_OPTIMIZERS = {
    "adamw_torch_xla": "XLA is not a ringleader device",
    "adamw_torch_npu_fused": "NPU is not a ringleader device",
}


def parse_optim_args(name: str, text: str) -> dict[str, Any]:
    """Trainer's optim_args ("k=v,k=v", spaces ignored), typed for the optimizer `name`.
    Raises OptionError naming `optim_args.<key>` for an unknown key or a bad value."""
    allowed = OPTIM_ARGS.get(name, {})
    out: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if item.count("=") != 1:
            raise OptionError("optim_args", f"'{item}' is not KEY=VALUE; write e.g. optimizer.optim_args='amsgrad=true'")
        key, value = item.split("=")
        where = f"optim_args.{key}"
        if field_name := reserved_field(name, key):
            raise OptionError(where, f"is optimizer.{field_name} in ringleader; set that and drop it from optim_args")
        if key not in allowed:
            raise OptionError(where, f"is not an option of {name} (it takes: {', '.join(allowed) or 'none'}); drop it")
        kind = allowed[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise OptionError(where, f"must be true or false, got '{value}'")
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise OptionError(where, f"must be a{'n integer' if kind is int else ' number'}, got '{value}'") from None
            if kind is float and not math.isfinite(out[key]):
                raise OptionError(where, f"must be finite, got '{value}'")
    return out


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
    if cfg.name in BNB:
        import bitsandbytes as bnb  # CUDA only; the launcher refuses these on CPU

        # As Trainer: bitsandbytes' AdamW with the state's bits and paging chosen by the name.
        bits = 8 if cfg.name.endswith("8bit") else 32
        return bnb.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, optim_bits=bits, is_paged=cfg.name.startswith("paged_"), **extra)
    raise ValueError(f"unknown optimizer {cfg.name}")
