"""What the checkpoint and resume tests share: a job whose epochs are 5 steps long, and readers."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.conftest import TINY

# 80 training samples, 16 a step (4 per device x 2 ranks x 2 accumulation): 5 steps an epoch (no
# partial last step, which Trainer's count would add for a tail), 14 steps = 2.8 epochs. Checkpoints at 4, 8, 12 and 14: step-8 is 3 steps into epoch 1. Dropout
# makes every rank's RNG stream part of the result, so a resume must restore them exactly.
RESUME_JOB = {
    **{item.split("=", 1)[0]: item.split("=", 1)[1] for item in TINY},
    "data.max_bytes": "2700",
    "train.gradient_accumulation_steps": "2",
    "train.max_steps": "14",
    "train.save_strategy": "steps",
    "train.save_steps": "4",
    "train.save_total_limit": "0",
    "model.dropout": "0.1",
    "train.report_to": "[]",  # no TensorBoard: importing it costs a second a run
}


def job(**changes: object) -> list[str]:
    """RESUME_JOB's overrides with some changed: job(**{"train.save_async": "true"})."""
    merged = {**RESUME_JOB, **{k: str(v) for k, v in changes.items()}}
    return [f"{k}={v}" for k, v in merged.items() if v != "None"]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), "different tensor names"
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


def read_dcp(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch.distributed.checkpoint folder (model and optimizer), in this process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from trainer.export import load_dcp_tensors
    from trainer.safe_dcp import SafeFileSystemReader

    metadata = SafeFileSystemReader(str(folder)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    load_dcp_tensors(folder, state)
    return state


def log_of(run_dir: Path, rank: int = 0) -> str:
    return (run_dir / "logs" / f"rank-{rank}.log").read_text(errors="replace")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (those with a COMPLETE marker)."""
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE") if re.fullmatch(r"step-\d+", p.parent.name))


def leftovers(run_dir: Path) -> list[str]:
    """Anything in checkpoints/ that is not a complete checkpoint."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not (p / "COMPLETE").is_file())


def train_losses(run_dir: Path) -> dict[int, float]:
    """The last logged training loss of each step in metrics.jsonl (a resumed run logs some twice)."""
    import json

    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "loss" in event:
            losses[event["step"]] = event["loss"]
    return losses


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def plant_code_in_metadata(checkpoint: Path, sentinel: Path) -> Path:
    """Replace the DCP .metadata by a pickle that creates `sentinel` when loaded, and re-record the
    COMPLETE marker so the checksums pass: only the loader's unpickling can stop it."""
    import json
    import pickle
    import shlex

    from trainer.checkpoint import MARKER, describe, payload_files

    metadata = checkpoint / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(RunsCode(f"touch {shlex.quote(str(sentinel))}")))
    marker = json.loads((checkpoint / MARKER).read_text())
    marker["files"] = describe(checkpoint, payload_files(checkpoint))
    (checkpoint / MARKER).write_text(json.dumps(marker))
    return metadata


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
