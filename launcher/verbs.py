"""Verbs that act on an existing run directory: `python -m launcher VERB RUN_DIR ...`.

One function per verb in VERBS; each returns the exit code. Nothing here imports torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.cli import error
from launcher.errors import ConfigError
from launcher.files import print_appended, read_json

if TYPE_CHECKING:
    from cluster.backend import Backend


def run_dir_arg(args: list[str], verb: str) -> Path | None:
    if not args or args[0].startswith("-"):
        error(f"{verb} needs a run directory: python -m launcher {verb} RUN_DIR")
        return None
    run_dir = Path(args[0]).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        error(f"{run_dir} is not a ringleader run directory (no config.yaml); give the train.output_dir of a run")
        return None
    return run_dir


def job_of(run_dir: Path) -> tuple[Backend, str] | None:
    """The backend and job id the run directory records (None: never submitted, e.g. a local run).
    A damaged record (slurm.json) raises ConfigError naming the file, which each verb prints as
    its one-line error."""
    from cluster.backend import recorded_job

    return recorded_job(run_dir)


def last_step(run_dir: Path) -> int | None:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue
        if isinstance(step, int):
            return step
    return None


def run_and_job(args: list[str], verb: str) -> tuple[Path, tuple[Backend, str] | None] | None:
    """The run directory and its recorded job, or None after printing the one-line error."""
    run_dir = run_dir_arg(args, verb)
    if run_dir is None:
        return None
    try:
        return run_dir, job_of(run_dir)
    except ConfigError as exc:
        error(str(exc))
        return None


def status(args: list[str]) -> int:
    """The run's state: the SLURM job's (if it was submitted), its last step, its result."""
    found = run_and_job(args, "status")
    if found is None:
        return 2
    run_dir, job = found
    plan = read_json(run_dir / "plan.json") or {}
    result = read_json(run_dir / "result.json") or {}
    rows = [("run directory", str(run_dir)), ("where", f"{plan.get('cluster', '?')}: {plan.get('nodes', '?')} node(s) x {plan.get('nproc_per_node', '?')}")]
    if job is not None:
        backend, job_id = job
        rows.append(("job", backend.status(job_id).detail))
    step = last_step(run_dir)
    rows.append(("step", f"{step if step is not None else 0} of {plan.get('total_steps', '?')}"))
    if result:
        text = result.get("status", "?")
        if result.get("requeue"):
            text += ", requeue asked"
        if result.get("message") or result.get("error"):
            text += f": {result.get('message') or result.get('error')}"
        rows.append(("result", text))
    else:
        rows.append(("result", "none yet (running, pending, or ended before writing result.json)"))
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"), key=lambda p: int(p.parent.name.split("-")[1]) if p.parent.name.split("-")[1].isdigit() else -1)
    if checkpoints:
        rows.append(("checkpoint", str(checkpoints[-1].parent)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


def logs(args: list[str]) -> int:
    """A rank's log (rank 0 by default; --rank N), or the batch script's (--slurm); -f follows it."""
    run_dir = run_dir_arg(args, "logs")
    if run_dir is None:
        return 2
    rank, follow, batch = 0, False, False
    rest = args[1:]
    while rest:
        arg = rest.pop(0)
        if arg in ("-f", "--follow"):
            follow = True
        elif arg == "--slurm":
            batch = True
        elif arg == "--rank" and rest and rest[0].isdigit():
            rank = int(rest.pop(0))
        else:
            return error(f"logs: unknown argument {arg}; use: logs RUN_DIR [--rank N | --slurm] [-f]")
    if batch:
        try:
            job = job_of(run_dir)
        except ConfigError as exc:
            return error(str(exc))
        if job is None:
            return error(f"{run_dir} has no SLURM job (no slurm.json)")
        backend, job_id = job
        path = backend.job_log(run_dir, job_id)
    else:
        path = run_dir / "logs" / f"rank-{rank}.log"
    if not path.exists() and not follow:
        return error(f"no log yet at {path}")
    offset = 0
    try:
        while True:
            offset = print_appended(path, offset)
            if not follow:
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def cancel(args: list[str]) -> int:
    """Cancel the run's job. On SLURM, scancel sends SIGTERM: the ranks stop at a step boundary and save
    a checkpoint (rerun the same command to resume); SLURM kills what is left after KillWait."""
    found = run_and_job(args, "cancel")
    if found is None:
        return 2
    run_dir, job = found
    if job is None:
        return error(f"{run_dir} has no SLURM job to cancel (no slurm.json); a local run stops with Ctrl-C")
    from cluster.backend import BackendError

    backend, job_id = job
    try:
        backend.cancel(job_id)
    except BackendError as exc:
        return error(str(exc))
    print(f"ringleader: cancelled job {job_id}; its ranks save a checkpoint as they stop. run directory {run_dir}")
    return 0


def summary(args: list[str]) -> int:
    """A sweep's summary (summary.csv, summary.json, eval_loss.png), rebuilt from its folder: for
    SLURM sweeps that were not waited for, run it once the trials have finished."""
    if not args:
        return error("summary needs a sweep folder: python -m launcher summary SWEEP_DIR")
    sweep_dir = Path(args[0]).expanduser().resolve()
    from launcher.sweep import TRIAL_FILE, summarize

    if not list(sweep_dir.glob(f"*/{TRIAL_FILE}")):
        return error(f"{sweep_dir} holds no trials (no */{TRIAL_FILE}); give the sweep folder (hydra.sweep.dir)")
    summarize(sweep_dir)
    return 0


def export(args: list[str]) -> int:
    """Consolidated weights from any checkpoint: OUT_DIR/model.safetensors and OUT_DIR/config.yaml,
    loadable by plain PyTorch (OUT_DIR defaults to <run>/exports/step-N). A LoRA run's checkpoint
    gives its adapter in peft's format; with --merge, the base model with the adapter merged in, a
    plain transformers folder (<run>/exports/step-N-merged). Nothing the checkpoint names is
    imported, and nothing in OUT_DIR that ringleader did not write is deleted (see
    trainer/export.py). The arguments are checked before torch is imported; this verb reads
    tensors, it is not on the launch path."""
    usage = "python -m launcher export RUN_DIR/checkpoints/step-N [OUT_DIR] [--merge]"
    merge = "--merge" in args
    args = [a for a in args if a != "--merge"]
    if not args or len(args) > 2 or any(a.startswith("-") for a in args):
        return error(f"export needs a checkpoint folder: {usage}")
    checkpoint = Path(args[0]).expanduser().absolute()
    if not checkpoint.exists():
        return error(f"export CHECKPOINT: {checkpoint}: no such checkpoint folder; give one of RUN_DIR/checkpoints/step-N")
    if not checkpoint.is_dir():
        return error(f"export CHECKPOINT: {checkpoint} is a file, not a checkpoint folder; give one of RUN_DIR/checkpoints/step-N")
    if not (checkpoint / "COMPLETE").is_file():
        return error(f"export CHECKPOINT: {checkpoint} has no COMPLETE marker, so it is not a complete checkpoint; give one of RUN_DIR/checkpoints/step-N that has one")
    from trainer.checkpoint import CheckpointError
    from trainer.export import export_checkpoint

    try:
        out = export_checkpoint(checkpoint, Path(args[1]) if len(args) > 1 else None, merge=merge)
    except CheckpointError as exc:
        return error(" ".join(str(exc).split()))  # one line, whatever a crafted file put in it
    what = "adapter_model.safetensors, adapter_config.json" if (out / "adapter_config.json").is_file() else "model.safetensors, config.yaml"
    print(f"ringleader: exported {checkpoint.resolve()} to {out} ({what}{', merged' if merge else ''})")
    return 0


VERBS: dict[str, Callable[[list[str]], int]] = {
    "status": status,
    "logs": logs,
    "cancel": cancel,
    "export": export,
    "summary": summary,
}


def run_verb(verb: str, args: list[str]) -> int:
    handler = VERBS.get(verb)
    if handler is None:
        return error(f"unknown verb '{verb}'; choose one of {', '.join(VERBS)}")
    return handler(args)
