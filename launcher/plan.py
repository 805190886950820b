"""The plan: every value derived once, in the launcher (launcher/planner.py), printed, saved as
plan.json in the run directory and read back by every rank with `read_plan`. Typed, versioned,
and imports nothing heavy: the bottom of the import graph, with the schema."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError

PLAN_FILE = "plan.json"
# Raised whenever a field is added, removed or changes its meaning: ranks refuse a plan.json of
# another version instead of misreading it (a SLURM requeue after an upgrade, say).
# 4: steps_per_epoch and total_steps count the last partial micro-batch and accumulation step, as Trainer.
PLAN_VERSION = 4


@dataclass(kw_only=True)
class Plan:
    """Everything derived once, in the launcher: printed, saved as plan.json, read by every rank."""

    version: int = PLAN_VERSION
    run_dir: str
    cluster: str
    nodes: int
    nproc_per_node: int
    world_size: int
    accelerator: str
    backend: str
    threads_per_rank: int
    strategy: str
    precision: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    train_samples: int
    eval_samples: int
    steps_per_epoch: int
    num_train_epochs: float
    total_steps: int
    warmup_steps: int
    tokens_per_step: int
    # train.logging_steps, eval_steps, save_steps as step counts: a ratio below 1 of the total steps
    # resolved once here (math.ceil, as Trainer). eval_steps 0: every logging_steps.
    logging_steps: int = 0
    eval_steps: int = 0
    save_steps: int = 0
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    script: str = ""  # the sbatch script, for cluster=slurm
    memory: dict[str, float] = field(default_factory=dict)  # GB per rank (launcher/memory.py)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # older names used (transformers 4's): what to write instead
    deepspeed: dict = field(default_factory=dict)  # the derived DeepSpeed config, zero* strategies
    # Text records for a transformers model (data=jsonl, hf, stdlib_instruct): the tokenized cache
    # folder the ranks memory-map ("" in a dry run before tokenization), and its counts
    # (launcher/tokenize_step.py Tokenized: samples, tokens, packed_samples, pad_token_id, hit).
    data_cache: str = ""
    tokenized: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "plan.json") -> Plan:
        """The plan as the launcher wrote it; one of another version (or shape) is refused."""
        version = data.get("version") if isinstance(data, dict) else None
        names = {f.name for f in dataclasses.fields(cls)}
        if version != PLAN_VERSION or set(data) != names:
            raise ConfigError(source, f"is a plan of version {version!r}, this ringleader reads version {PLAN_VERSION}; start the run again with python -m launcher (same train.output_dir) to rewrite it")
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        """A plan equals another with the same fields, and the dict it is saved as (plan.json)."""
        if isinstance(other, dict):
            return self.to_dict() == other
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    @property
    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.command)}".strip()


def read_plan(run_dir: Path) -> Plan:
    """plan.json of `run_dir`, as the launcher wrote it."""
    path = Path(run_dir) / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"cannot read it ({' '.join(str(exc).split())}); start the run with python -m launcher, which writes it") from exc
    return Plan.from_dict(data, source=str(path))
