"""Write the run directory the plan describes: config.yaml, plan.json, logs/. The only writer in the launcher."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def write_run_dir(run_dir: Path, resolved: DictConfig, plan_dict: dict) -> None:
    """Every rank of every restart reads config.yaml from here; a rerun into the same directory
    (to resume) replaces config.yaml and plan.json and keeps everything else."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    atomic_write(run_dir / "plan.json", json.dumps(plan_dict, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON file of the run directory, or None while it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def print_appended(path: Path, offset: int) -> int:
    """Print what a log file gained since `offset`; return the new offset (logs/ follow-mode)."""
    if not path.exists():
        return offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)
