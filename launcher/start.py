"""Start one run: validate and plan (launcher/prepare.py), claim and write the run directory,
hand the plan to its backend. The one path for a single run and for each trial of a sweep."""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.compose import Composed


def start(composed: Composed, *, trial: bool = False) -> int:
    """Validate, plan, print, write the run directory and start the backend: the one path for a
    single run and for each trial of a sweep (trial=True: this process outlives the run, to read
    its result). Raises ConfigError before anything is written."""
    from cluster.backend import backend_for
    from launcher.prepare import prepare
    from launcher.rundir import check_run_dir, claim_run_dir, clear_earlier_run, is_default_name, make_unique, write_run_dir

    prepared = prepare(composed)  # every check, the backend's own included, before anything is written
    plan, cfg = prepared.plan, prepared.config
    backend = backend_for(cfg.cluster.name)
    task = backend.allocation_task()  # one of several tasks that already hold the job's nodes (`srun python -m launcher`)
    owner = task is None or task.rank == 0  # the one process that checks, locks and writes the run directory
    if not cfg.dry_run and owner:
        # Locked, a job still on it, a fresh start over checkpoints, a changed config: refused here.
        check_run_dir(Path(plan.run_dir), prepared.resolved, plan.world_size)
    from launcher import corpus

    corpus.save_listing_cache()  # only now that the plan holds: a refused launch writes nothing, not even a cache
    if cfg.dry_run:
        if owner:
            print(prepared.text, flush=True)
        return 0
    gc.enable()  # what follows may run for days (a local run waits on torchrun; a sweep's trial)
    lock = None
    if owner:
        if is_default_name(Path(plan.run_dir), composed.overrides):  # created exclusively: never shared
            made = make_unique(Path(plan.run_dir))
            if str(made) != plan.run_dir:
                prepared = prepare(dataclasses.replace(composed, config=dataclasses.replace(composed.config, train=dataclasses.replace(composed.config.train, output_dir=str(made)))))
                plan, cfg = prepared.plan, prepared.config
        lock = claim_run_dir(Path(plan.run_dir))  # held until this process (and what it hands the lock to) ends
        if cfg.train.resume == "none" and cfg.train.overwrite_output_dir:
            clear_earlier_run(Path(plan.run_dir))
        print(prepared.text, flush=True)
        write_run_dir(Path(plan.run_dir), prepared.resolved, plan.to_dict())
    if task is not None:
        if lock is not None:
            os.set_inheritable(lock, True)  # run_task execs torchrun: the lock goes with it
        return backend.run_task(cfg, plan, task, child=trial)
    return backend.start(cfg, plan, lock=lock)
