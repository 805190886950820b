"""Shared helpers: run the launcher as a user does, read the run directory it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A model and dataset small enough that a 2-rank job takes a few seconds on 2 CPU cores.
TINY = [
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "data.seq_len=32",
    "data.max_bytes=400000",
    "train.per_device_train_batch_size=4",
    "train.per_device_eval_batch_size=8",
    "train.max_steps=8",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "train.save_strategy=no",
    "train.eval_max_batches=4",
]


# A slower variant of a behaviour another test already runs for real: CI keeps one real run per
# behaviour (the suite stays under 20 minutes on 2 cores); RINGLEADER_SLOW=1 runs the variants too.
SLOW_VARIANT = pytest.mark.skipif(not os.environ.get("RINGLEADER_SLOW"), reason="a slower variant of a behaviour tested beside it; set RINGLEADER_SLOW=1")


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def code(self) -> int:
        return self.proc.returncode

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def result(self) -> dict:
        return json.loads((self.run_dir / "result.json").read_text())

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def plan(self) -> dict:
        return json.loads((self.run_dir / "plan.json").read_text())

    def weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.run_dir / "final" / "model.safetensors"))


def launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_launcher(run_dir: Path | None, *overrides: str, timeout: float = 300, check: bool = True, env: dict | None = None, cwd: Path | None = None) -> Run:
    """`python -m launcher` with overrides (and train.output_dir=run_dir when given)."""
    args = [sys.executable, "-m", "launcher", *overrides]
    if run_dir is not None:
        args.append(f"train.output_dir={run_dir}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or launcher_env(), cwd=cwd or ROOT)
    run = Run(proc=proc, run_dir=Path(run_dir) if run_dir else Path())
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return run


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
