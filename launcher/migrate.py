"""`python -m launcher --from-training-args FILE.json`: Hugging Face TrainingArguments to a
ringleader command line.

Reads the JSON that `TrainingArguments.to_json_string()` writes (or a folder holding a
`training_args.json`), and prints `python -m launcher KEY=VALUE ...`: the optimizer and schedule as
group choices, then every value that differs from what ringleader would compose without it (its
conf/ defaults are not Trainer's, so equal-to-Trainer's-default values are printed too when
ringleader's default differs). A field set to a value other than Trainer's default that
ringleader has no equivalent for is refused, all of them named in one line, exit 2.

Trainer's defaults are a table here (transformers 5.24), not read from transformers: the launcher
never imports it. A target key that the schema does not have (yet) counts as no equivalent.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher import registry

# TrainingArguments() defaults, transformers 5.24 (to_json_string of TrainingArguments(output_dir=...)).
TRAINER_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8, "num_train_epochs": 3.0, "max_steps": -1, "learning_rate": 5e-05,
    "lr_scheduler_type": "linear", "lr_scheduler_kwargs": None, "warmup_steps": 0, "optim": "adamw_torch_fused",
    "optim_args": None, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08,
    "optim_target_modules": None, "gradient_accumulation_steps": 1, "average_tokens_across_devices": True,
    "max_grad_norm": 1.0, "label_smoothing_factor": 0.0, "bf16": False, "fp16": False, "bf16_full_eval": False,
    "fp16_full_eval": False, "tf32": None, "activation_checkpointing": False, "activation_checkpointing_kwargs": None,
    "gradient_checkpointing": False, "gradient_checkpointing_kwargs": None, "torch_compile": False,
    "torch_compile_backend": None, "torch_compile_mode": None, "use_liger_kernel": False, "liger_kernel_config": None,
    "use_cache": False, "neftune_noise_alpha": None, "torch_empty_cache_steps": None, "auto_find_batch_size": False,
    "logging_strategy": "steps", "logging_steps": 500, "logging_first_step": False, "log_on_each_node": True,
    "logging_nan_inf_filter": True, "include_num_input_tokens_seen": "no", "log_level": "passive",
    "log_level_replica": "warning", "disable_tqdm": False, "report_to": [], "run_name": None, "project": "huggingface",
    "trackio_space_id": None, "trackio_bucket_id": None, "trackio_static_space_id": None, "eval_strategy": "no",
    "eval_steps": None, "eval_delay": 0, "per_device_eval_batch_size": 8, "prediction_loss_only": False,
    "eval_on_start": False, "eval_do_concat_batches": True, "eval_use_gather_object": False,
    "eval_accumulation_steps": None, "include_for_metrics": [], "batch_eval_metrics": False, "save_only_model": False,
    "save_strategy": "steps", "save_steps": 500, "save_on_each_node": False, "save_total_limit": None,
    "enable_jit_checkpoint": False, "push_to_hub": False, "hub_token": "<HUB_TOKEN>", "hub_private_repo": None,
    "hub_model_id": None, "hub_strategy": "every_save", "hub_always_push": False, "hub_revision": None,
    "load_best_model_at_end": False, "metric_for_best_model": None, "greater_is_better": None,
    "ignore_data_skip": False, "restore_callback_states_from_checkpoint": False, "full_determinism": False,
    "seed": 42, "data_seed": None, "use_cpu": False,
    "accelerator_config": {"split_batches": False, "dispatch_batches": None, "even_batches": True, "use_seedable_sampler": True, "non_blocking": False, "gradient_accumulation_kwargs": None},
    "parallelism_config": None, "dataloader_drop_last": False, "dataloader_num_workers": 0, "dataloader_pin_memory": True,
    "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None, "dataloader_multiprocessing_context": None,
    "dataloader_in_order": True, "remove_unused_columns": True, "label_names": None, "train_sampling_strategy": "random",
    "length_column_name": "length", "ddp_find_unused_parameters": None, "ddp_bucket_cap_mb": None,
    "ddp_broadcast_buffers": None, "ddp_static_graph": None, "ddp_backend": None, "ddp_timeout": 1800, "fsdp": None,
    "fsdp_config": None, "deepspeed": None, "debug": [], "skip_memory_metrics": True, "do_train": False,
    "do_eval": False, "do_predict": False, "resume_from_checkpoint": None, "local_rank": -1,
    # transformers 4 names still found in saved files, with their defaults there
    "evaluation_strategy": "no", "warmup_ratio": 0.0, "overwrite_output_dir": False, "logging_dir": None,
    "save_safetensors": True, "fp16_opt_level": "O1", "half_precision_backend": "auto", "use_mps_device": False,
}

# Fields with no effect on what is trained (or that ringleader sets itself): a note, never a refusal.
IGNORED: dict[str, str] = {
    "output_dir": "given as train.output_dir",
    "do_train": "not read by Trainer either", "do_eval": "not read by Trainer either", "do_predict": "not read by Trainer either",
    "local_rank": "torchrun sets it", "log_level": "ringleader's rank logs are logs/rank-N.log",
    "log_level_replica": "ringleader's rank logs are logs/rank-N.log", "log_on_each_node": "ranks log to their own file",
    "disable_tqdm": "the progress bar shows only on a terminal", "skip_memory_metrics": "peak memory is logged on GPUs",
    "hub_token": "a secret; not used", "logging_dir": "TensorBoard writes to train.logging_dir (inside the run directory by default)",
    "overwrite_output_dir": "ringleader refuses a fresh start over checkpoints; add train.resume=none train.overwrite_output_dir=true to replace a run",
    "use_cpu": "the machine comes from +hw (+hw=cpu for CPU ranks)", "save_safetensors": "ringleader saves safetensors", "fp16_opt_level": "apex only", "half_precision_backend": "autocast is the only backend",
}
HUB_FIELDS = ("hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision")

# Trainer's names ringleader has (adamw is ringleader's own older name, not Trainer's).
OPTIMIZERS = set(registry.OPTIMIZERS) - {"adamw"}
SCHEDULES = set(registry.SCHEDULERS)
TRACKERS = set(registry.TRACKERS)


class Refused(Exception):
    """A field whose value ringleader cannot reproduce; the message says why."""


def same(target: str) -> Callable[[Any], dict[str, Any]]:
    return lambda v: {target: v}


def none_as(target: str, empty: Any) -> Callable[[Any], dict[str, Any]]:
    return lambda v: {target: empty if v is None else v}


def whole_steps(target: str, empty: int = 0) -> Callable[[Any], dict[str, Any]]:
    def convert(v: Any) -> dict[str, Any]:
        if v is None:
            return {target: empty}
        return {target: v if isinstance(v, float) and v < 1 else int(v)}  # a ratio below 1 of the total steps, as transformers 5

    return convert


def strategy_value(allowed: tuple[str, ...]) -> Callable[[str], Callable[[Any], dict[str, Any]]]:
    def make(target: str) -> Callable[[Any], dict[str, Any]]:
        def convert(v: Any) -> dict[str, Any]:
            if v not in allowed:
                raise Refused(f"'{v}' is not one of {', '.join(allowed)} in ringleader")
            return {target: v}

        return convert

    return make


def warmup(v: Any) -> dict[str, Any]:
    """transformers 5: warmup_steps is a count, or a ratio of the total steps when below 1."""
    if isinstance(v, float) and 0 < v < 1:
        return {"scheduler.warmup_steps": 0, "scheduler.warmup_ratio": v}
    return {"scheduler.warmup_steps": int(v), "scheduler.warmup_ratio": 0.0}


def report_to(v: Any) -> dict[str, Any]:
    names = [v] if isinstance(v, str) else list(v or [])
    if names in (["none"], []):
        return {"train.report_to": []}
    if names == ["all"]:
        return {"train.report_to": ["all"]}
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise Refused(f"{', '.join(unknown)}: ringleader writes to {', '.join(sorted(TRACKERS))} only")
    return {"train.report_to": names}


def metric(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    return {"train.metric_for_best_model": v if v.startswith("eval_") else f"eval_{v}"}


def scheduler_kwargs(v: Any) -> dict[str, Any]:
    kwargs = dict(v or {})
    out: dict[str, Any] = {}
    if "num_cycles" in kwargs:
        out["scheduler.num_cycles"] = kwargs.pop("num_cycles")
    out["scheduler.lr_scheduler_kwargs"] = kwargs
    return out


def optim_args(v: Any) -> dict[str, Any]:
    return {"optimizer.optim_args": v or ""}


def logging_strategy(v: Any) -> dict[str, Any]:
    if v != "steps":
        raise Refused("ringleader logs every train.logging_steps; use logging_strategy=steps")
    return {}


def resume(v: Any) -> dict[str, Any]:
    if v in (None, False, ""):
        return {}
    if v is True:
        return {"train.resume": "auto"}
    raise Refused("a Trainer checkpoint is not a ringleader checkpoint; start from its weights with model.name_or_path, or resume a ringleader run with train.resume")


# Trainer field -> how it becomes ringleader keys (the group choices optim and lr_scheduler_type
# are handled apart). Each is applied whatever its value: ringleader's own defaults differ.
MAPPED: dict[str, Callable[[Any], dict[str, Any]]] = {
    "per_device_train_batch_size": same("train.per_device_train_batch_size"),
    "per_device_eval_batch_size": same("train.per_device_eval_batch_size"),
    "gradient_accumulation_steps": same("train.gradient_accumulation_steps"),
    "num_train_epochs": lambda v: {"train.num_train_epochs": float(v)},
    "max_steps": same("train.max_steps"),
    "max_grad_norm": same("train.max_grad_norm"),
    "learning_rate": same("optimizer.learning_rate"),
    "weight_decay": same("optimizer.weight_decay"),
    "adam_beta1": same("optimizer.adam_beta1"),
    "adam_beta2": same("optimizer.adam_beta2"),
    "adam_epsilon": same("optimizer.adam_epsilon"),
    "optim_args": optim_args,
    "lr_scheduler_kwargs": scheduler_kwargs,
    "warmup_steps": warmup,
    "warmup_ratio": lambda v: {"scheduler.warmup_ratio": float(v)} if v else {},
    "logging_steps": whole_steps("train.logging_steps", 500),
    "logging_first_step": same("train.logging_first_step"),
    "logging_strategy": lambda v: logging_strategy(v),
    "eval_strategy": strategy_value(("no", "steps", "epoch"))("train.eval_strategy"),
    "evaluation_strategy": strategy_value(("no", "steps", "epoch"))("train.eval_strategy"),
    "eval_steps": whole_steps("train.eval_steps"),
    "eval_on_start": same("train.eval_on_start"),
    "save_strategy": strategy_value(("no", "steps", "epoch", "best"))("train.save_strategy"),
    "save_steps": whole_steps("train.save_steps", 500),
    "save_total_limit": none_as("train.save_total_limit", 0),
    "load_best_model_at_end": same("train.load_best_model_at_end"),
    "metric_for_best_model": metric,
    "greater_is_better": same("train.greater_is_better"),
    "bf16": same("train.bf16"),
    "fp16": same("train.fp16"),
    "gradient_checkpointing": same("train.gradient_checkpointing"),
    "activation_checkpointing": same("train.gradient_checkpointing"),  # transformers 5's name; either turns it on

    "seed": same("train.seed"),
    "ddp_backend": none_as("train.ddp_backend", ""),
    "ddp_timeout": same("train.ddp_timeout"),
    "report_to": report_to,
    "run_name": none_as("train.run_name", ""),
    "resume_from_checkpoint": resume,
    "dataloader_num_workers": same("data.num_workers"),
    # Fields other helpers add to the schema: mapped once the key exists there, refused until then.
    "label_smoothing_factor": same("train.label_smoothing_factor"),
    "data_seed": same("train.data_seed"),
    "save_only_model": same("train.save_only_model"),
    "eval_delay": same("train.eval_delay"),
    "tf32": same("train.tf32"),
    "full_determinism": same("train.full_determinism"),
    "include_num_input_tokens_seen": same("train.include_num_input_tokens_seen"),
    "neftune_noise_alpha": same("train.neftune_noise_alpha"),
    "gradient_checkpointing_kwargs": same("train.gradient_checkpointing_kwargs"),
    "activation_checkpointing_kwargs": same("train.gradient_checkpointing_kwargs"),
    "dataloader_drop_last": same("train.dataloader_drop_last"),
    "dataloader_pin_memory": same("data.pin_memory"),
    "dataloader_persistent_workers": same("data.persistent_workers"),
    "dataloader_prefetch_factor": same("data.prefetch_factor"),
    "auto_find_batch_size": same("train.auto_find_batch_size"),
    "torch_compile": same("train.torch_compile"),
    "torch_compile_mode": same("train.torch_compile_mode"),
    "torch_compile_backend": same("train.torch_compile_backend"),
}
# What ringleader itself uses for a field the schema lacks but whose Trainer default it already does.
REASONS: dict[str, str] = {
    "neftune_noise_alpha": "no noise is added to embeddings", "label_smoothing_factor": "the loss is plain cross-entropy",
    "use_liger_kernel": "no Liger kernels", "fsdp": "pick strategy=fsdp", "fsdp_config": "pick strategy=fsdp and its strategy.* keys",
    "deepspeed": "pick strategy=zero1/zero2/zero3 and put extra DeepSpeed keys under strategy.deepspeed", "push_to_hub": "ringleader does not upload",
"auto_find_batch_size": "not yet (issue 15, item 5)", "torch_compile": "not yet (issue 15, item 4)",
}


def schema_keys() -> set[str]:
    """Every dotted key of the schema (group.field), without composing."""
    from launcher.schema import RunConfig

    keys: set[str] = set()
    for f in dataclasses.fields(RunConfig):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            keys.update(f"{f.name}.{g.name}" for g in dataclasses.fields(sub))
        else:
            keys.add(f.name)
    return keys


def load_arguments(path: Path) -> dict[str, Any]:
    if path.is_dir():
        for name in ("training_args.json", "training_arguments.json"):
            if (path / name).is_file():
                return load_arguments(path / name)
        if (path / "training_args.bin").exists():
            raise Refused(
                f"{path} holds training_args.bin, a pickle ringleader will not load; write the JSON with "
                "TrainingArguments.to_json_string() (e.g. torch.load('training_args.bin', weights_only=False).to_json_string(), if you trust the file) and pass that"
            )
        raise Refused(f"{path} holds no training_args.json; pass the JSON that TrainingArguments.to_json_string() writes")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise Refused(f"{path} is not JSON ({exc}); pass what TrainingArguments.to_json_string() writes") from None
    if not isinstance(data, dict) or "output_dir" not in data and "per_device_train_batch_size" not in data:
        raise Refused(f"{path} does not look like TrainingArguments (no output_dir, no per_device_train_batch_size)")
    return data


def is_default(field: str, value: Any) -> bool:
    if field not in TRAINER_DEFAULTS:
        return value in (None, False, "", [], {})
    default = TRAINER_DEFAULTS[field]
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, default)]
    if all(numbers):
        return float(value) == float(default)
    return value == default


def translate(args: dict[str, Any]) -> tuple[list[str], dict[str, Any], list[str], list[str]]:
    """(group choices, wanted key values, refusals, notes) for one TrainingArguments dict."""
    keys = schema_keys()
    refusals: list[str] = []
    notes: list[str] = []
    wanted: dict[str, Any] = {}
    groups: list[str] = []

    optim = args.get("optim", TRAINER_DEFAULTS["optim"])
    if optim in OPTIMIZERS:
        groups.append(f"optimizer={optim}")
    else:
        refusals.append(f"optim={optim} (ringleader has {', '.join(sorted(OPTIMIZERS))})")
    schedule = args.get("lr_scheduler_type", TRAINER_DEFAULTS["lr_scheduler_type"])
    if schedule in SCHEDULES:
        groups.append(f"scheduler={schedule}")
    else:
        refusals.append(f"lr_scheduler_type={schedule} (ringleader has {', '.join(sorted(SCHEDULES))})")
    if args.get("output_dir"):
        wanted["train.output_dir"] = args["output_dir"]
    wanted["train.eval_max_batches"] = 0  # Trainer evaluates the whole evaluation set

    for field, value in args.items():
        if field in ("optim", "lr_scheduler_type", "output_dir"):
            continue
        if field in MAPPED:
            try:
                converted = MAPPED[field](value)
            except Refused as exc:
                refusals.append(f"{field}={json.dumps(value)} ({exc})")
                continue
            missing = [k for k in converted if k not in keys]
            if missing:
                if not is_default(field, value):
                    refusals.append(f"{field}={json.dumps(value)} ({REASONS.get(field, 'no ' + missing[0] + ' in ringleader yet')})")
                continue
            for k, v in converted.items():
                wanted[k] = wanted.get(k) or v if k == "train.gradient_checkpointing" else v
        elif field in IGNORED:
            if not is_default(field, value):
                notes.append(f"{field}: {IGNORED[field]}")
        elif field in HUB_FIELDS and not args.get("push_to_hub"):
            continue
        elif not is_default(field, value):
            refusals.append(f"{field}={json.dumps(value)} ({REASONS.get(field, 'no ringleader equivalent')})")
    return groups, wanted, refusals, notes


def render(value: Any) -> str:
    """A Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/.][\w./-]*", text) and text not in ("true", "false", "null", "none"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides_for(args: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The overrides that reproduce `args` (raises Refused naming every field without an
    equivalent), and notes on ignored fields."""
    groups, wanted, refusals, notes = translate(args)
    if refusals:
        raise Refused("no ringleader equivalent for " + "; ".join(refusals) + "; drop them from the arguments, or set them to Trainer's defaults")
    from launcher.compose import compose

    composed = compose([*groups, f"train.output_dir={render(wanted.get('train.output_dir', 'runs/x'))}"]).config
    out = list(groups)
    for key, value in wanted.items():
        group, name = key.split(".", 1)
        current = getattr(getattr(composed, group), name)
        if isinstance(value, dict) and isinstance(current, dict):
            # Key by key: Hydra merges a dict override into the group file's dict, and a key the
            # file lacks needs `+`, one it has but Trainer's does not needs `~`.
            out += [f"~{key}.{k}" for k in current if k not in value]
            out += [f"{'' if k in current else '+'}{key}.{k}={render(v)}" for k, v in value.items() if k not in current or current[k] != v]
        elif key == "train.output_dir" or current != value:
            out.append(f"{key}={render(value)}")
    return out, notes


def main_from_training_args(argv: list[str]) -> int:
    """`--from-training-args FILE.json`: print the command, or one line of refusal (exit 2)."""
    if len(argv) != 1:
        print("ringleader: error: --from-training-args takes one file: the JSON TrainingArguments.to_json_string() writes", file=sys.stderr)
        return 2
    from launcher.errors import ConfigError

    try:
        overrides, notes = overrides_for(load_arguments(Path(argv[0])))
    except Refused as exc:
        print(f"ringleader: error: --from-training-args {argv[0]}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # from composing: one line, as every launcher error
        print(f"ringleader: error: --from-training-args {argv[0]}: {exc}", file=sys.stderr)
        return 2
    print(shlex.join(["python", "-m", "launcher", *overrides]))
    for note in notes:
        print(f"# ignored {note}", file=sys.stderr)
    print("# add model=... data=... for your model and data, and +hw=PROFILE for the machine", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m launcher.migrate FILE.json (the launcher's --from-training-args)
    raise SystemExit(main_from_training_args(sys.argv[1:]))
