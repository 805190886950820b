"""`python -m launcher [overrides]`: compose, validate, plan, write the run directory, launch.

Also `python -m launcher -m ...` for sweeps, and a few verbs that act on a run directory:
`status`, `logs`, `cancel`, `export`, `summary`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

USAGE = """usage: python -m launcher [KEY=VALUE ...] [+hw=PROFILE] [--config-dir DIR] [-m]
       python -m launcher {status|logs|cancel} RUN_DIR
       python -m launcher export CHECKPOINT_DIR [OUT_DIR]
       python -m launcher summary SWEEP_DIR

Overrides are Hydra's: group=option (strategy=zero3), key=value (train.max_steps=100),
+hw=8xA100 to pick a hardware profile. dry_run=true prints the plan and starts nothing.
-m runs a sweep: optimizer.learning_rate=1e-4,3e-4 scheduler=cosine,linear.
--cfg prints the composed config. Groups and keys: conf/ and launcher/schema.py."""

VERBS = ("status", "logs", "cancel", "export", "summary")


def error(message: str) -> int:
    print(f"ringleader: error: {message}", file=sys.stderr)
    return 2


def parse_args(args: list[str]) -> tuple[list[str], list[str], str, bool]:
    """Split argv into overrides, extra config folders, the config name, and whether to print it."""
    overrides: list[str] = []
    config_dirs: list[str] = []
    config_name = "config"
    show = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-dir", "-cd", "--config-name", "-cn"):
            if i + 1 >= len(args):
                raise SystemExit(error(f"{arg} needs a value"))
            value = args[i + 1]
            if arg in ("--config-dir", "-cd"):
                config_dirs.append(str(Path(value).resolve()))
            else:
                config_name = value
            i += 2
            continue
        if arg.startswith("--config-dir="):
            config_dirs.append(str(Path(arg.split("=", 1)[1]).resolve()))
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in ("--cfg", "-c"):
            show = True
            if i + 1 < len(args) and args[i + 1] in ("job", "all", "hydra"):
                i += 1
        elif arg.startswith("-"):
            raise SystemExit(error(f"unknown option {arg}; overrides are KEY=VALUE (see --help)"))
        elif "=" not in arg:
            raise SystemExit(error(f"'{arg}' is not an override; write KEY=VALUE, e.g. train.max_steps=100"))
        elif any(c in arg for c in "\n\r\0"):
            key = arg.split("=", 1)[0].lstrip("+~")
            raise SystemExit(error(f"{key}: contains a newline or NUL character; remove it (values go into scripts)"))
        else:
            overrides.append(arg)
        i += 1
    return overrides, config_dirs, config_name, show


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] in VERBS:
        from launcher.verbs import run_verb

        return run_verb(args[0], args[1:])
    if any(a in ("-m", "--multirun") for a in args):
        from launcher.sweep import run_sweep

        return run_sweep(args)
    try:
        overrides, config_dirs, config_name, show = parse_args(args)
    except SystemExit as exc:  # parse_args has printed the one-line error
        return int(exc.code or 2)
    # Importing Hydra, composing and planning allocate many container objects (OmegaConf nodes link
    # to their parents) and free few: the cyclic collector runs ~84 passes, ~20 ms of a dry run, for
    # nothing. It is back on before any backend starts (start()), and whenever main returns.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return compose_and_start(overrides, config_dirs, config_name, show)
    finally:
        if collecting:
            gc.enable()


def compose_and_start(overrides: list[str], config_dirs: list[str], config_name: str, show: bool) -> int:
    from launcher.compose import ConfigError, compose

    from cluster.slurm import allocation_overrides

    try:
        overrides += allocation_overrides(overrides)  # `srun python -m launcher ...` inside an allocation
        composed = compose(overrides, config_dirs=config_dirs, config_name=config_name)
    except ConfigError as exc:
        return error(str(exc))
    if show:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(composed.resolved), end="")
        return 0
    return launch(composed)


def launch(composed) -> int:
    from launcher.errors import ConfigError

    try:
        return start(composed)
    except ConfigError as exc:
        return error(str(exc))


def start(composed, *, trial: bool = False) -> int:
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
    from trainer import corpus

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


if __name__ == "__main__":
    raise SystemExit(main())
