"""Sweeps: `python -m launcher -m ...` runs Hydra's app, so its sweepers (basic, Optuna) and
launchers (basic, submitit_slurm) work; every trial is one full ringleader run.

Each trial's run directory is its Hydra job folder (<sweep dir>/<job number>) unless the sweep sets
train.output_dir itself. A trial never raises: a failure is recorded in trial.json with its
reason and returned as NaN (Optuna counts it as a failed trial), so the other trials go on. At the
end the summary (summary.csv, summary.json, eval_loss.png) is written to the sweep folder;
`python -m launcher summary SWEEP_DIR` rebuilds it later, e.g. after SLURM trials finish.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, read_write

TRIAL_FILE = "trial.json"


def run_sweep(args: list[str]) -> int:
    import hydra

    from launcher.compose import register_schema
    from launcher.paths import config_dir

    register_schema()
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(trial)
    argv = sys.argv
    sys.argv = [argv[0], *args]
    try:
        app()
    finally:
        sys.argv = argv
    return 0


def trial(cfg: DictConfig) -> float:
    """One trial: the same path as a single run; returns the objective (NaN when it failed)."""
    from hydra.core.hydra_config import HydraConfig

    from launcher.__main__ import start
    from launcher.compose import ConfigError, typed

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    record: dict[str, Any] = {"job": hc.job.num, "overrides": overrides, "run_dir": None, "exit_code": None, "error": None}
    objective = math.nan
    try:
        cfg = copy.deepcopy(cfg)
        if not any(o.split("=", 1)[0].lstrip("+") == "train.output_dir" for o in overrides):
            with read_write(cfg):
                cfg.train.output_dir = str(job_dir)
        composed = typed(cfg, tuple(overrides))
        record["run_dir"] = composed.config.train.output_dir
        code = start(composed)
        record["exit_code"] = code
        result = read_json(Path(record["run_dir"]) / "result.json")
        metric = composed.config.train.metric_for_best_model
        if code == 0 and result:
            objective = float(result.get("metrics", {}).get(metric, result.get("best_metric") or math.nan))
        elif composed.config.cluster.name != "local" and code == 0:
            record["status"] = "submitted"
        else:
            record["error"] = (result or {}).get("error") or f"exited with code {code}"
    except ConfigError as exc:
        record["error"] = str(exc)
        record["exit_code"] = 2
    except Exception as exc:  # a trial must not stop the sweep
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["objective"] = None if math.isnan(objective) else objective
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / TRIAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if record["error"]:
        print(f"ringleader: trial {hc.job.num} ({' '.join(overrides)}) failed: {record['error']}", file=sys.stderr)
    return objective


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(sweep_dir: Path, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Collect every trial of a sweep folder into summary.csv / summary.json and a PNG of eval loss."""
    rows = []
    for trial_file in sorted(sweep_dir.glob(f"*/{TRIAL_FILE}"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else p.parent.name):
        info = json.loads(trial_file.read_text())
        run_dir = Path(info["run_dir"]) if info.get("run_dir") else trial_file.parent
        result = read_json(run_dir / "result.json")
        if result:
            status = result.get("status", "unknown")
        elif info.get("error"):
            status = "failed"
        elif (run_dir / "slurm.json").exists() or info.get("status") == "submitted":
            status = "submitted"
        else:
            status = "running"
        metrics = (result or {}).get("metrics", {})
        rows.append({
            "trial": info["job"],
            "overrides": " ".join(info["overrides"]),
            "status": status,
            "steps": (result or {}).get("global_step"),
            "eval_loss": metrics.get("eval_loss"),
            "train_loss": metrics.get("train_loss"),
            "error": info.get("error") or (result or {}).get("error"),
            "run_dir": str(run_dir),
            "best": False,
        })
    done = [r for r in rows if r["status"] in ("completed", "early_stopped") and r["eval_loss"] is not None]
    if done:
        min(done, key=lambda r: r["eval_loss"])["best"] = True
    write_summary(sweep_dir, rows)
    if not quiet:
        print(render_summary(rows))
    return rows


def swept(rows: list[dict[str, Any]]) -> list[str]:
    """Each trial's overrides less those every trial shares: what the sweep varied."""
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    return [" ".join(o for o in r["overrides"].split() if o not in common) for r in rows]


def render_summary(rows: list[dict[str, Any]]) -> str:
    """The table printed at the end."""
    header = ["trial", "status", "steps", "eval_loss", "overrides"]
    lines = [
        [str(r["trial"]) + (" *" if r["best"] else ""), r["status"], str(r["steps"] or "-"), f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-", label]
        for r, label in zip(rows, swept(rows))
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["sweep summary (* best: lowest final eval_loss)", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out += [f"trial {r['trial']} failed: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n".join(out)


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
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
        summarize(Path(config.hydra.sweep.dir))
