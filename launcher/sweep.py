"""Sweeps: `python -m launcher -m ...` runs Hydra's app, so its sweepers (basic, Optuna) and
launchers (basic, submitit_slurm) work; every trial is one full ringleader run.

Each trial's run directory is its Hydra job folder (<sweep dir>/<job number>) unless the sweep sets
train.output_dir itself. A trial never raises: a failure is recorded in trial.json with its
reason and returned as NaN (Optuna counts it as a failed trial), so the other trials go on. At the
end the summary (summary.csv, summary.json, eval_loss.png) is written to the sweep folder;
`python -m launcher summary SWEEP_DIR` rebuilds it later, e.g. after SLURM trials finish.

On SLURM, two ways. `cluster=slurm`: each trial is submitted as its own job (its own run
directory, sbatch script and slurm.json, so status/logs/cancel/requeue work on a trial exactly as
on a single run, and trials may ask for different nodes or hardware), not waited for unless
`cluster.wait=true`; trial.json keeps the job id and the summary asks SLURM how far each job got.
Not one array job: an array gives every task the same resources and one script, and Hydra's
basic launcher hands us one trial at a time. Users who want arrays have
`hydra/launcher=submitit_slurm` (submitit's map_array), which also works: there every task of the
trial's allocation runs trial(), each starts its node's torchrun, and task 0 alone speaks for it.
"""

from __future__ import annotations

import copy
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, read_write

from cluster.backend import recorded_job
from launcher.files import atomic_write, read_json

TRIAL_FILE = "trial.json"


def run_sweep(args: list[str]) -> int:
    import hydra

    from launcher.compose import register_schema
    from launcher.paths import config_dir

    if (code := validate_trials(args)) is not None:
        return code
    register_schema()
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(trial)
    argv = sys.argv
    sys.argv = [argv[0], *args]
    try:
        app()
    finally:
        sys.argv = argv
    if finished and all(r["status"] == "failed" for r in finished[-1]):
        print("ringleader: error: every trial of the sweep failed; see the summary above", file=sys.stderr)
        return 1
    return 0


finished: list[list[dict[str, Any]]] = []  # each sweep's summary rows, from SummaryCallback


def validate_trials(args: list[str]) -> int | None:
    """Compose, validate and plan every trial before any starts (or any folder exists): one bad
    trial stops the sweep with one line naming the trial, its key and the fix, exit 2. Sweeps that
    Hydra's basic sweeper cannot list in advance (interval ranges, Optuna's own parameters) are
    checked with those overrides left out: the rest of the config still is."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from launcher.cli import error, parse_args
    from launcher.compose import compose
    from launcher.errors import ConfigError
    from launcher.prepare import prepare

    try:
        overrides, config_dirs, config_name, _ = parse_args([a for a in args if a not in ("-m", "--multirun")])
    except SystemExit as exc:  # parse_args has printed the one-line error
        return int(exc.code or 2)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar: the single-run path words these errors
        return error(str(compose_error_for(overrides, exc)))
    from cluster.environment import detect_environment

    try:
        detect_environment()  # garbage in SLURM's variables: one line now, not a traceback per trial
    except ConfigError as exc:
        return error(str(exc))
    listable = [o for o in parsed if not o.is_sweep_override() or o.is_choice_sweep() or o.is_range_sweep()]
    trials = [t for batch in BasicSweeper.split_arguments(listable, None) for t in batch] or [[]]
    placeholder = not any(o.split("=", 1)[0].lstrip("+") == "train.output_dir" for o in overrides)
    for n, trial_overrides in enumerate(trials):
        # Each trial runs in its own folder of the sweep directory; a name that does not exist yet
        # stands in for it (checked for being creatable, never created).
        extra = ["train.output_dir=sweeps/.ringleader-trial-check"] if placeholder else []
        try:
            prepare(compose([o for o in trial_overrides if not o.startswith("hydra")] + extra, config_dirs=config_dirs, config_name=config_name))
        except ConfigError as exc:
            return error(f"{exc} (trial {n}: {' '.join(trial_overrides)}); no trial was started")
    return None


def compose_error_for(overrides: list[str], exc: Exception) -> Exception:
    from launcher.compose import ConfigError, compose

    try:
        compose(overrides)
    except ConfigError as composed:
        return composed
    return exc


def trial(cfg: DictConfig) -> float:
    """One trial: the same path as a single run; returns the objective (NaN when it failed, or when
    it was submitted to SLURM and not waited for: trial.json then holds the job id).

    Under hydra-submitit-launcher the trial runs inside its own allocation, once on every task of
    it (one task per node): each task starts its node's torchrun, and task 0 alone records the
    trial and returns the objective (submitit hands Hydra task 0's return value)."""
    from hydra.core.hydra_config import HydraConfig

    from launcher.start import start
    from launcher.compose import ConfigError, typed

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    task = trial_allocation(str(hc.launcher.get("_target_", "")))
    lead = task is None or task.rank == 0
    record: dict[str, Any] = {"job": hc.job.num, "overrides": overrides, "run_dir": None, "exit_code": None, "error": None}
    objective = math.nan
    try:
        cfg = copy.deepcopy(cfg)
        with read_write(cfg):
            if not any(o.split("=", 1)[0].lstrip("+") == "train.output_dir" for o in overrides):
                cfg.train.output_dir = str(job_dir)
            if task is not None:
                place_in_allocation(cfg, task)
        composed = typed(cfg, tuple(overrides))
        run_dir = Path(composed.config.train.output_dir).expanduser().resolve()
        record["run_dir"] = str(run_dir)
        if task is not None and lead:
            (run_dir / "result.json").unlink(missing_ok=True)  # the result read below must be this run's
        code = start(composed, trial=True)
        record["exit_code"] = code
        if task is not None:
            record["job_id"] = task.job_id  # the allocation hydra-submitit-launcher made for this trial
        elif (job := recorded_job(run_dir)) is not None:
            record["job_id"] = job[1]  # a submitted job (cluster=slurm): the summary asks its scheduler
        result = read_json(run_dir / "result.json")
        if task is not None and lead and code == 0 and result is None:
            result = wait_for_result(run_dir)  # training's rank 0 may sit on another node, a moment behind
        metric, record["greater_is_better"] = objective_of(composed.config.train)
        record["metric"] = metric
        if code == 0 and result:
            value = result.get("metrics", {}).get(metric)
            value = result.get("best_metric") if value is None else value  # 0.0 is a value, not a gap
            objective = math.nan if value is None else float(value)
        elif record.get("job_id") and task is None and code == 0:
            record["status"] = "submitted"  # cluster.wait=false: `python -m launcher summary` reads it later
        elif code == 0:
            record["error"] = "the run ended without writing result.json"
        else:
            record["error"] = (result or {}).get("error") or f"exited with code {code}"
    except ConfigError as exc:
        record["error"] = str(exc)
        record["exit_code"] = 2
    except Exception as exc:  # a trial must not stop the sweep
        record["error"] = f"{type(exc).__name__}: {exc}"
    if not lead:
        return math.nan  # task 0 of the allocation speaks for the trial
    record["objective"] = None if math.isnan(objective) else objective
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(job_dir / TRIAL_FILE, json.dumps(record, indent=2) + "\n")
    if record["error"]:
        print(f"ringleader: trial {hc.job.num} ({' '.join(overrides)}) failed: {record['error']}", file=sys.stderr)
    return objective


def objective_of(train) -> tuple[str, bool]:
    """The trial's objective: metric_for_best_model as evaluation names it (eval_ prefix), and
    whether greater is better (default: not for losses), as transformers decides it."""
    metric = train.metric_for_best_model if train.metric_for_best_model.startswith("eval_") else f"eval_{train.metric_for_best_model}"
    greater = train.greater_is_better if train.greater_is_better is not None else not metric.endswith("loss")
    return metric, greater


def trial_allocation(launcher_target: str):
    """The SLURM task this trial runs as when hydra-submitit-launcher started it in an allocation of
    its own (`srun` of `python -m submitit.core._submit`, one task per node), else None. Both
    conditions: a sweep driver that itself runs in a SLURM task, with Hydra's basic launcher and
    cluster=slurm, must still submit its trials as jobs."""
    from cluster.environment import SlurmEnvironment, detect_environment

    if "hydra_submitit_launcher" not in launcher_target:
        return None
    env = detect_environment()
    return env if isinstance(env, SlurmEnvironment) and env.step_tasks >= 1 else None


def place_in_allocation(cfg: DictConfig, task) -> None:
    """The trial already has its nodes: run on them (one node: torchrun here; several: one torchrun
    per node, as `srun python -m launcher` does by hand), never ask SLURM for more."""
    from launcher.errors import ConfigError

    if task.step_tasks != task.nnodes:
        raise ConfigError("hydra.launcher.tasks_per_node", f"{task.step_tasks} tasks on {task.nnodes} node(s); ringleader starts one torchrun per node, which starts cluster.nproc_per_node ranks: set hydra.launcher.tasks_per_node=1")
    if cfg.cluster.nodes not in (1, task.nnodes):
        raise ConfigError("cluster.nodes", f"is {cfg.cluster.nodes} but the trial's allocation has {task.nnodes} node(s); set hydra.launcher.nodes={cfg.cluster.nodes} (hydra-submitit-launcher allocates the nodes)")
    cfg.cluster.name = "slurm" if task.nnodes > 1 else "local"
    cfg.cluster.nodes = task.nnodes


def wait_for_result(run_dir: Path, timeout_s: float = 60.0) -> dict | None:
    """result.json of a multi-node run whose torchrun on this node has ended: rank 0 writes it,
    wherever c10d's rendezvous put rank 0, and no barrier follows that write."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (result := read_json(run_dir / "result.json")) is not None:
            return result
        time.sleep(0.5)
    return None


def summarize(sweep_dir: Path, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Collect every trial of a sweep folder into summary.csv / summary.json and a PNG of eval loss."""
    rows = []
    for trial_file in sorted(sweep_dir.glob(f"*/{TRIAL_FILE}"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else p.parent.name):
        info = json.loads(trial_file.read_text())
        run_dir = Path(info["run_dir"]) if info.get("run_dir") else trial_file.parent
        result = read_json(run_dir / "result.json")
        error = info.get("error") or (result or {}).get("error")
        if result:
            status = result.get("status", "unknown")
        elif info.get("error"):
            status = "failed"
        elif recorded_job(run_dir) is not None or info.get("status") == "submitted":
            status, error = job_status(run_dir)
        else:
            status = "running"
        metrics = (result or {}).get("metrics", {})
        metric = info.get("metric", "eval_loss")
        objective = metrics.get(metric)
        if objective is None and result:
            objective = result.get("best_metric")
        rows.append({
            "trial": info["job"],
            "overrides": " ".join(info["overrides"]),
            "status": status,
            "steps": (result or {}).get("global_step"),
            "eval_loss": metrics.get("eval_loss"),
            "train_loss": metrics.get("train_loss"),
            "metric": metric,
            "greater_is_better": bool(info.get("greater_is_better", False)),
            "objective": objective,
            "error": error,
            "job_id": info.get("job_id"),
            "run_dir": str(run_dir),
            "best": False,
        })
    mark_best(rows)
    write_summary(sweep_dir, rows)
    if not quiet:
        print(render_summary(rows))
        if waiting := [r for r in rows if r["status"] in ("submitted", "running")]:
            print(f"{len(waiting)} trial(s) still queued or running on SLURM; once they have finished: python -m launcher summary {shlex.quote(str(sweep_dir))}")
    return rows


def mark_best(rows: list[dict[str, Any]]) -> None:
    """The best finished trial by the sweep's metric_for_best_model and greater_is_better. Trials
    that disagree on the metric or its direction cannot be ranked: then none is marked."""
    done = [r for r in rows if r["status"] in ("completed", "early_stopped") and isinstance(r["objective"], (int, float)) and math.isfinite(r["objective"])]
    if not done or len({(r["metric"], r["greater_is_better"]) for r in done}) > 1:
        return
    pick = max if done[0]["greater_is_better"] else min
    pick(done, key=lambda r: r["objective"])["best"] = True


def job_status(run_dir: Path) -> tuple[str, str | None]:
    """A submitted trial with no result.json yet, as its scheduler sees its job: submitted (queued),
    running, or failed when the job is over without a result (its batch log says why)."""
    job = recorded_job(run_dir)
    if job is None:
        return "submitted", None
    backend, job_id = job
    status = backend.status(job_id)
    if status.state in ("RUNNING", "COMPLETING"):
        return "running", None
    if status.finished:
        return "failed", f"job {job_id} ended {status.state} without writing result.json; its batch log, if it started: {backend.job_log(run_dir, job_id)}"
    if not status.state:
        return "unknown", f"SLURM no longer knows job {job_id} and the run left no result.json; see {run_dir}/logs"
    return "submitted", None


def swept(rows: list[dict[str, Any]]) -> list[str]:
    """Each trial's overrides less those every trial shares: what the sweep varied."""
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    return [" ".join(o for o in r["overrides"].split() if o not in common) for r in rows]


def render_summary(rows: list[dict[str, Any]]) -> str:
    """The table printed at the end."""
    metric = rows[0]["metric"] if rows else "eval_loss"
    direction = "highest" if rows and rows[0]["greater_is_better"] else "lowest"
    header = ["trial", "status", "steps", metric, "overrides"]
    lines = [
        [str(r["trial"]) + (" *" if r["best"] else ""), r["status"], str(r["steps"] or "-"), f"{r['objective']:.4f}" if r["objective"] is not None else "-", label]
        for r, label in zip(rows, swept(rows))
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [f"sweep summary (* best: {direction} final {metric})", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out += [f"trial {r['trial']} failed: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n".join(out)


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    atomic_write(sweep_dir / "summary.json", json.dumps(rows, indent=2) + "\n")
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    plot_eval_loss(sweep_dir, rows)


def plot_eval_loss(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """eval_loss.png: every trial's eval-loss curve on one plot (training loss where it has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for r, label in zip(rows, swept(rows)):
        path = Path(r["run_dir"]) / "metrics.jsonl"
        if not path.exists():
            continue
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        curve = sorted({e["step"]: e["eval_loss"] for e in events if "eval_loss" in e}.items())
        if curve:
            steps, losses = zip(*curve)
            ax.plot(steps, losses, marker="o", linewidth=2.5 if r["best"] else 1.2, label=f"{r['trial']}{' (best)' if r['best'] else ''}: {label[:70]}")
            drawn += 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (nats per token)")
    ax.set_title(f"sweep {sweep_dir.name}: {len(rows)} trials")
    if drawn:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(sweep_dir / "eval_loss.png", dpi=100)
    plt.close(fig)


from hydra.experimental.callback import Callback  # noqa: E402  (sweeps only: launcher.sweep is imported lazily)


class SummaryCallback(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks): the summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finished.append(summarize(Path(config.hydra.sweep.dir)))
