"""Start one run: validate and plan (launcher/prepare.py), claim and write the run directory,
hand the plan to its backend. The one path for a single run and for each trial of a sweep."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.compose import Composed


def start(composed: Composed, *, trial: bool = False) -> int:
    """Validate, plan, print, write the run directory and start the backend: the one path for a
    single run and for each trial of a sweep (trial=True: this process outlives the run, to read
    its result). Raises ConfigError before anything is written."""
    from launcher.prepare import prepare

    prepared = prepare(composed)
    plan, cfg = prepared.plan, prepared.config
    from cluster.slurm import allocation_task, check_can_submit

    check_can_submit(cfg)  # cluster=slurm: sbatch on PATH, before anything is written (not in a dry run)
    from launcher.rundir import check_run_dir, claim_run_dir, clear_earlier_run, is_default_name, make_unique

    task = allocation_task() if cfg.cluster.name == "slurm" else None  # one of `srun python -m launcher`'s tasks
    owner = task is None or task.rank == 0  # the one process that checks, locks and writes the run directory
    if not cfg.dry_run and owner:
        # Locked, a SLURM job still on it, a fresh start over checkpoints, a changed config: refused here.
        check_run_dir(Path(plan.run_dir), prepared.resolved, plan.world_size)
    from launcher import corpus

    corpus.save_listing_cache()  # only now that the plan holds: a refused launch writes nothing, not even a cache
    if cfg.dry_run:
        if owner:
            print(prepared.text, flush=True)
        return 0
    gc.enable()  # what follows may run for days (a local run waits on torchrun; a sweep's trial)
    from launcher.rundir import write_run_dir

    lock = None
    if owner:
        if is_default_name(Path(plan.run_dir), composed.overrides):  # created exclusively: never shared
            made = make_unique(Path(plan.run_dir))
            if str(made) != plan.run_dir:
                prepared = prepare(dataclasses.replace(composed, config=dataclasses.replace(composed.config, train=dataclasses.replace(composed.config.train, output_dir=str(made)))))
                plan, cfg = prepared.plan, prepared.config
        lock = claim_run_dir(Path(plan.run_dir))  # held until this process (and torchrun, or the exec'd task) ends
        if cfg.train.resume == "none" and cfg.train.overwrite_output_dir:
            clear_earlier_run(Path(plan.run_dir))
        print(prepared.text, flush=True)
    if task is not None:
        from cluster.slurm import run_task

        if lock is not None:
            os.set_inheritable(lock, True)  # run_task execs torchrun: the lock goes with it
            write_run_dir(Path(plan.run_dir), prepared.resolved, plan.to_dict())
        return run_task(cfg, plan, task, child=trial)
    write_run_dir(Path(plan.run_dir), prepared.resolved, plan.to_dict())
    if cfg.cluster.name == "local":
        from cluster.local import spawn

        code = spawn(plan, keep_fds=(lock,))
        report(Path(plan.run_dir), code)
        return code
    from cluster.slurm import submit

    os.close(lock)  # the batch script takes the lock when the job starts (it waits for this release)
    return submit(cfg, plan)


def report(run_dir: Path, code: int) -> None:
    """After a local run: where things are, and which rank failed and why."""
    result = run_dir / "result.json"
    if code == 0 and result.exists():
        summary = json.loads(result.read_text())
        metrics = {k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"ringleader: {summary.get('status')} after {summary.get('global_step')} steps; {shown}\nringleader: run directory {run_dir}")
        return
    print(f"ringleader: the job exited with code {code}; run directory {run_dir}", file=sys.stderr)
    for log in sorted((run_dir / "logs").glob("rank-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        errors = [line for line in lines[-40:] if "Error" in line or "error" in line]
        if errors:
            print(f"ringleader: {log.relative_to(run_dir)}: {errors[-1].strip()}", file=sys.stderr)
