"""Which config keys change a run's trajectory, and which of them differ between two configs.

A resume continues a run: the launcher (before anything is written) and every rank (when it loads
a checkpoint) compare the new config with the one the checkpoint was written with, and refuse the
keys listed by `changed_keys` unless train.resume_with_changed_config is on. No torch import: the
launcher uses it.

Keys that do NOT change the trajectory (the weights a run computes, step after step) are ignored:
where the run lives and logs (train.output_dir, train.logging_dir, train.report_to, logging_*),
how it resumes (train.resume, train.overwrite_output_dir, train.resume_with_changed_config), when
and how it saves (save_*, export_final), evaluation (eval_*, per_device_eval_batch_size: they
measure, they do not train), the collectives' backend and timeout, data loader workers, the warm
start (a checkpoint wins over model.init_from), and placement (hw.*, cluster.*: partition, time,
nodes...). The batch layout (per-device batch, accumulation, world size) counts as one value, the
effective batch: samples per optimizer step. The same effective batch spread differently gives the
same steps (the loss is token-exact across ranks); the data position maps by samples consumed.
Every other key, including any key added to the schema later, counts.
"""

from __future__ import annotations

from typing import Any

IGNORED_PREFIXES = ("hw.", "cluster.")
IGNORED = frozenset({
    "dry_run",
    "train.output_dir", "train.logging_dir", "train.report_to", "train.run_name", "train.logging_steps", "train.logging_first_step",
    "train.resume", "train.overwrite_output_dir", "train.resume_with_changed_config",
    "train.save_strategy", "train.save_steps", "train.save_total_limit", "train.save_async", "train.save_only_model", "train.export_final",
    "train.eval_strategy", "train.eval_steps", "train.eval_max_batches", "train.eval_on_start", "train.eval_prompts", "train.eval_max_new_tokens", "train.per_device_eval_batch_size",
    "train.evaluation_strategy", "train.eval_delay", "train.compute_metrics", "train.include_num_input_tokens_seen",
    "train.ddp_backend", "train.ddp_timeout",
    "data.num_workers", "data.pin_memory", "data.prefetch_factor", "data.persistent_workers",
    "train.auto_find_batch_size",  # it keeps the effective batch, and with it every step's samples
    "model.init_from",
    # compared as one value, EFFECTIVE_BATCH
    "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
})
EFFECTIVE_BATCH = "effective batch (train.per_device_train_batch_size x world size x train.gradient_accumulation_steps)"


def flatten(node: Any, prefix: str = "", *, whole: frozenset[str] = frozenset()) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists, empty dicts below the top and the sections named in
    `whole` stay values (an empty dict at the top flattens to nothing: no key is ever "").
    The one flattening of nested config (config changes, DeepSpeed's user keys, trackers' parameters)."""
    key = prefix.rstrip(".")
    if isinstance(node, dict) and (node or not key) and key not in whole:
        out: dict[str, Any] = {}
        for name, value in node.items():
            out.update(flatten(value, f"{prefix}{name}.", whole=whole))
        return out
    return {key: node}


def counts(key: str) -> bool:
    return key not in IGNORED and not key.startswith(IGNORED_PREFIXES)


def effective_batch(config: dict[str, Any], world_size: int | None) -> int | None:
    train = config.get("train") or {}
    try:
        return int(train["per_device_train_batch_size"]) * int(world_size) * int(train["gradient_accumulation_steps"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


def schema_defaults() -> dict[str, Any]:
    """Every schema key with a default, flattened ({"train.dataloader_drop_last": False, ...})."""
    import dataclasses

    from launcher.schema import RunConfig

    def default(f: dataclasses.Field) -> Any:
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return f.default

    out: dict[str, Any] = {}
    for group in dataclasses.fields(RunConfig):
        value = default(group)
        if not dataclasses.is_dataclass(value):
            out[group.name] = value
            continue
        for f in dataclasses.fields(value):
            if f.name.startswith("_") and f.name != "_target_" or default(f) is dataclasses.MISSING:
                continue
            out.update(flatten(default(f), f"{group.name}.{f.name}."))
    return out


def changed_keys(old: dict[str, Any], old_world_size: int | None, new: dict[str, Any], new_world_size: int | None) -> dict[str, tuple[Any, Any]]:
    """The keys that change the trajectory and differ, {key: (old value, new value)}, sorted. A key
    the old config lacks (it was written before the key existed) is its schema default there, so
    an upgrade alone changes nothing; any other key missing on one side shows as None there."""
    a, b = flatten(old), flatten(new)
    a = {**{k: v for k, v in schema_defaults().items() if k in b and k not in a and _group_in(k, old)}, **a}
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if counts(k) and a.get(k) != b.get(k)}
    batches = effective_batch(old, old_world_size), effective_batch(new, new_world_size)
    if None not in batches and batches[0] != batches[1]:
        diff[EFFECTIVE_BATCH] = batches
    return diff


def _group_in(key: str, config: dict[str, Any]) -> bool:
    """The key's group is in the config (a config missing a whole group is not an older one)."""
    return "." not in key or isinstance(config.get(key.split(".", 1)[0]), dict)


def describe(diff: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """One line: `optimizer.learning_rate 0.001 -> 0.002, seed 42 -> 1`."""
    shown = [f"{k} {v[0]!r} -> {v[1]!r}" for k, v in list(diff.items())[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(shown) + more
