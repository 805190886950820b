"""Write the run directory the plan describes: config.yaml, plan.json, logs/. The only writer in the launcher.

It also decides whether a launch may use a run directory at all, before anything is written
(check_run_dir): one job at a time (an flock on <run_dir>/.lock, its holder written in the file; a
SLURM job recorded in slurm.json that still runs), no fresh start over an earlier run's
checkpoints unless train.overwrite_output_dir, no resume with a config that changes the
trajectory unless train.resume_with_changed_config. Then claim_run_dir takes the lock and
write_run_dir writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.files import atomic_write, read_json

LOCK_FILE = ".lock"
STEP_DIR = re.compile(r"^step-\d+$")
LEFTOVER = re.compile(r"^(step-\d+\.tmp|\.deleting-step-\d+|\.replaced-step-\d+)$")  # what crashed saves leave
# The default run name (conf/config.yaml): a timestamp to the microsecond; a launch that finds it
# taken (two in the same microsecond, or a clock set back) takes the next free `-N` suffix.
DEFAULT_NAME = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}$")


def write_run_dir(run_dir: Path, resolved: DictConfig, plan_dict: dict) -> None:
    """Every rank of every restart reads config.yaml from here; a rerun into the same directory
    (to resume) replaces config.yaml and plan.json and keeps everything else."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    atomic_write(run_dir / "plan.json", json.dumps(plan_dict, indent=2) + "\n")


# -- may this launch use the run directory? (reads only) ------------------------------------------


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run directory's lock (the text its holder wrote), None when nobody does.
    Opens the lock file read-only and never creates it."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return " ".join(os.read(fd, 4096).decode(errors="replace").split()) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_job(run_dir: Path) -> str | None:
    """`SLURM job N (STATE)` when the run directory records a job its scheduler still runs or queues."""
    from cluster.backend import recorded_job

    recorded = recorded_job(run_dir)
    if recorded is None:
        return None
    backend, job_id = recorded
    status = backend.status(job_id)
    return f"{backend.name.upper()} job {job_id} ({status.state})" if status.active else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step-N folders with their COMPLETE marker, oldest save first (the marker's save
    counter; folders written before it existed count as older, by step)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]

    def order(p: Path) -> tuple[int, int]:
        try:
            seq = json.loads((p / "COMPLETE").read_text()).get("save_seq", -1)
        except (OSError, ValueError, AttributeError):
            seq = -1
        return (seq if isinstance(seq, int) else -1, int(p.name.split("-")[1]))

    return sorted(found, key=order)


def saved_config(checkpoint: Path, run_dir: Path) -> tuple[dict, int | None, Path] | None:
    """The config a checkpoint was written with (its own config.yaml, else the run directory's),
    the world size that wrote it, and the file read."""
    source = checkpoint / "config.yaml" if (checkpoint / "config.yaml").is_file() else run_dir / "config.yaml"
    if not source.is_file():
        return None
    try:
        config = OmegaConf.to_container(OmegaConf.load(source))
    except Exception:  # unreadable: the ranks' checksum check names the damaged file
        return None
    state = read_json(checkpoint / "trainer_state.json") or {}
    world = state.get("world_size") if isinstance(state.get("world_size"), int) else (read_json(run_dir / "plan.json") or {}).get("world_size")
    return (config, world, source) if isinstance(config, dict) else None


def check_run_dir(run_dir: Path, resolved: DictConfig, world_size: int) -> None:
    """Refuse, with a ConfigError naming the key and the fix, a launch that must not use `run_dir`:
    before anything is written, so a refused launch leaves the directory as it was."""
    resolved_train = resolved.train
    resume, overwrite = str(resolved_train.resume), bool(resolved_train.overwrite_output_dir)
    if run_dir.is_dir():
        if holder := lock_holder(run_dir):
            raise ConfigError("train.output_dir", f"{run_dir} is in use by {holder}; wait for it to end (or stop it), or choose another train.output_dir")
        if job := running_job(run_dir):
            raise ConfigError("train.output_dir", f"{run_dir} is in use by {job}; wait for it to end (python -m launcher status/cancel {run_dir}), or choose another train.output_dir")
    checkpoints = complete_checkpoints(run_dir) if run_dir.is_dir() else []
    if resume == "none":
        if checkpoints and not overwrite:
            raise ConfigError("train.resume", f"resume=none starts afresh, but {run_dir} holds {len(checkpoints)} checkpoint(s) of an earlier run (newest {checkpoints[-1].name}); set train.resume=auto to continue it, train.overwrite_output_dir=true to start over (its checkpoints are removed), or choose another train.output_dir")
        return
    if resume == "auto":
        if not checkpoints:
            return
        checkpoint = checkpoints[-1]
    else:
        checkpoint = Path(resume)
    check_same_trajectory(checkpoint, run_dir, resolved, world_size)


def check_same_trajectory(checkpoint: Path, run_dir: Path, resolved: DictConfig, world_size: int) -> None:
    """A resume whose config changes the trajectory is refused, naming the keys, unless opted in."""
    from launcher.trajectory import changed_keys, describe

    if bool(resolved.train.resume_with_changed_config):
        return
    saved = saved_config(checkpoint, checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else run_dir)
    if saved is None:
        return
    old, old_world, _ = saved
    new: dict[str, Any] = OmegaConf.to_container(resolved)  # type: ignore[assignment]  # a DictConfig gives a dict
    diff = changed_keys(old, old_world, new, world_size)
    if diff:
        raise ConfigError("train.resume", f"{checkpoint} was written with another config: {describe(diff)}; rerun with its values, set train.resume_with_changed_config=true to continue with the new ones (launcher/schema.py says what each means), or start over (train.resume=none train.overwrite_output_dir=true)")


# -- taking the directory (writes) -----------------------------------------------------------------


def is_default_name(run_dir: Path, overrides: tuple[str, ...] | list[str]) -> bool:
    """The run directory's name came from conf/config.yaml's timestamp, not from the user."""
    given = any(o.split("=", 1)[0].lstrip("+~") == "train.output_dir" for o in overrides)
    return not given and bool(DEFAULT_NAME.match(run_dir.name))


def make_unique(run_dir: Path) -> Path:
    """Create `run_dir` exclusively, or the first free `run_dir-N`: two launches never share a
    default-named run directory, even in the same microsecond."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        candidate = run_dir if n == 0 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConfigError("train.output_dir", f"{run_dir}: 1000 run directories of that name exist; choose another train.output_dir")


def holder_text() -> str:
    import socket  # here: a dry run never takes a lock

    job = os.environ.get("SLURM_JOB_ID")
    where = f"SLURM job {job}, " if job else ""
    return f"{where}pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"


def claim_run_dir(run_dir: Path) -> int:
    """Take the run directory's lock for this process (and what it passes the descriptor to: the
    local torchrun, a task's exec of torchrun); return the descriptor. The holder's pid, host and
    job are written into the lock file, for the next launch's refusal. Refused (ConfigError) when
    another process took it since check_run_dir looked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = " ".join(os.read(fd, 4096).decode(errors="replace").split()) or "another process"
        os.close(fd)
        raise ConfigError("train.output_dir", f"{run_dir} is in use by {holder}; wait for it to end (or stop it), or choose another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_text() + "\n").encode(), 0)
    return fd


def clear_earlier_run(run_dir: Path) -> None:
    """train.overwrite_output_dir with a fresh start: remove what the earlier run's ranks wrote and
    the new run would mix with its own: checkpoints/step-N (with or without marker) and the
    leftovers of crashed saves, metrics.jsonl, result.json, trackers.json (a fresh start is a new
    wandb/MLflow run: trainer/trackers.py). Only names ringleader writes."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (STEP_DIR.match(p.name) or LEFTOVER.match(p.name)):
                shutil.rmtree(p)
                print(f"ringleader: train.overwrite_output_dir: removed {p}", flush=True)
    for name in ("metrics.jsonl", "result.json", "trackers.json"):
        (run_dir / name).unlink(missing_ok=True)
