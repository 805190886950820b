"""`python -m launcher [overrides]`: compose, validate, plan, write the run directory, launch.

Also `python -m launcher -m ...` for sweeps, and a few verbs that act on a run directory:
`status`, `logs`, `cancel`, `export`, `summary`.
"""

from __future__ import annotations

import gc
import json
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
    from cluster.slurm import check_can_submit

    check_can_submit(cfg)  # cluster=slurm: sbatch on PATH, before anything is written (not in a dry run)
    from trainer import corpus

    corpus.save_listing_cache()  # only now that the plan holds: a refused launch writes nothing, not even a cache
    from cluster.slurm import allocation_task

    task = allocation_task() if cfg.cluster.name == "slurm" else None  # one of `srun python -m launcher`'s tasks
    if task is None or task.rank == 0:
        print(prepared.text, flush=True)
    if cfg.dry_run:
        return 0
    gc.enable()  # what follows may run for days (a local run waits on torchrun; a sweep's trial)
    from launcher.rundir import write_run_dir

    if task is not None:
        from cluster.slurm import run_task

        if task.rank == 0:
            write_run_dir(Path(plan.run_dir), prepared.resolved, plan.to_dict())
        return run_task(cfg, plan, task, child=trial)
    write_run_dir(Path(plan.run_dir), prepared.resolved, plan.to_dict())
    if cfg.cluster.name == "local":
        from cluster.local import spawn

        code = spawn(plan)
        report(Path(plan.run_dir), code)
        return code
    from cluster.slurm import submit

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
