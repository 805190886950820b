"""The options of a run that are spelled as Trainer spells them and checked before anything starts:
a schedule's lr_scheduler_kwargs, an optimizer's optim_args ("k=v,k=v"), and report_to.

Pure tables and parsers (no torch, no transformers, no tracker library): the schema's check()
methods refuse bad values with them, and the ranks (trainer/optim.py, trainer/trackers.py) read
the same tables, so what is accepted is what is built.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from launcher.registry import ADAMW, BITSANDBYTES, TRACKERS

# -- schedules ---------------------------------------------------------------------------------------

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
        raise OptionError("name", f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULE_KWARGS)}")
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


# -- optimizers --------------------------------------------------------------------------------------

# optim_args each optimizer takes, with the type of the value (Trainer passes a "k=v,k=v" string).
# Settings that have their own optimizer.* field are refused there, naming the field.
OPTIM_ARGS: dict[str, dict[str, type]] = {
    **dict.fromkeys(ADAMW, {"amsgrad": bool}),
    "sgd": {"dampening": float, "nesterov": bool},
    "adafactor": {"clip_threshold": float, "decay_rate": float, "beta1": float, "scale_parameter": bool},
    **dict.fromkeys(BITSANDBYTES, {"min_8bit_size": int, "percentile_clipping": int}),
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
    if name in ADAMW or name in BITSANDBYTES:
        return ADAM_FIELD_OF.get(key)
    return None


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


# -- trackers ----------------------------------------------------------------------------------------


class TrackerError(ValueError):
    """A bad report_to value; the message names the fix."""


def resolve_report_to(value: str | list[str] | tuple[str, ...] | None, *, installed_only: bool = True) -> list[str]:
    """Trainer's report_to as a list of tracker names: a string or a list; `all` is every tracker
    ringleader writes to that is installed (tensorboard always); `none` (or an empty list) is none."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names]
    if "none" in names or not names:
        if len(names) > 1:
            raise TrackerError(f"'none' is mixed with {', '.join(n for n in names if n != 'none')}; give none alone, or drop it")
        return []
    out: list[str] = []
    for name in names:
        if name == "all":
            chosen = [t for t in TRACKERS if t == "tensorboard" or not installed_only or importlib.util.find_spec(t) is not None]
        elif name in TRACKERS:
            chosen = [name]
        else:
            raise TrackerError(f"'{name}' is not a tracker ringleader writes to; use one or more of {', '.join(TRACKERS)}, all, or none (metrics.jsonl is always written)")
        out += [c for c in chosen if c not in out]
    return out


# -- step counts: transformers 5's count-or-ratio forms --------------------------------------------


def step_form_error(value: float) -> str | None:
    """What is wrong with a step count given as transformers 5 takes it (warmup_steps, logging_steps,
    eval_steps, save_steps): a whole count, or a ratio of the total steps in (0, 1). None: fine."""
    if value < 0:
        return f"must be >= 0, got {value:g}"
    if value >= 1 and value != int(value):
        return f"{value:g} is neither a whole number of steps nor a ratio below 1 of the total steps; give e.g. {int(value)} or 0.1"
    return None


def resolve_steps(value: float, total_steps: int) -> int:
    """A count, or a ratio below 1 of the total steps rounded up: Trainer's own rule
    (TrainingArguments.get_warmup_steps and TrainerState.compute_steps: math.ceil(total * ratio))."""
    return int(value) if value >= 1 or value == 0 else math.ceil(total_steps * value)


# train.full_determinism: the environment transformers' enable_full_determinism sets (cuBLAS needs
# its workspace setting before CUDA starts, so the plan exports it to every rank; the CUDA launch
# blocking and FlashAttention switches come with it, as there). trainer/numerics.py does the rest.
DETERMINISM_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":16:8", "CUDA_LAUNCH_BLOCKING": "1", "FLASH_ATTENTION_DETERMINISTIC": "1"}
