"""Hydra multirun sweeps of real 2-rank jobs, and their summary."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, launcher_env

EVAL = ["train.eval_strategy=steps", "train.eval_steps=4", "train.max_steps=8"]


def sweep(sweep_dir: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "launcher", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=timeout)


def test_local_grid_sweep_runs_every_trial_and_marks_the_best(tmp_path):
    """Two trials (two learning rates) show it: each ran, the best is marked, the summary rebuilds."""
    proc = sweep(tmp_path / "sweep", "optimizer.learning_rate=1e-3,3e-3", *TINY, *EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert len(rows) == 2
    assert {r["status"] for r in rows} == {"completed"}
    finals = {}
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert Path(r["run_dir"]).parent == tmp_path / "sweep"
        finals[r["trial"]] = result["metrics"]["eval_loss"]
        assert r["eval_loss"] == result["metrics"]["eval_loss"]
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["trial"] == min(finals, key=finals.get)
    assert len(set(finals.values())) == 2  # the trials really differ
    with open(tmp_path / "sweep" / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    png = (tmp_path / "sweep" / "eval_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "sweep summary" in proc.stdout and " *" in proc.stdout
    # the documented command rebuilds the same summary later
    (tmp_path / "sweep" / "summary.json").unlink()
    again = subprocess.run([sys.executable, "-m", "launcher", "summary", str(tmp_path / "sweep")], capture_output=True, text=True, cwd=ROOT, env=launcher_env())
    assert again.returncode == 0 and json.loads((tmp_path / "sweep" / "summary.json").read_text()) == rows


def test_a_failed_trial_does_not_stop_the_sweep(tmp_path):
    proc = sweep(tmp_path / "sweep", "optimizer=sgd", "train.max_grad_norm=0", "optimizer.learning_rate=0.5,1e12", *TINY, *EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {float(r["overrides"].split()[2].split("=")[1]): r for r in json.loads((tmp_path / "sweep" / "summary.json").read_text())}
    ok, diverged = rows[0.5], rows[1e12]
    assert ok["status"] == "completed" and ok["best"]
    assert diverged["status"] == "failed" and "non-finite" in diverged["error"]
    assert "trial 1 failed: " in proc.stdout and "non-finite" in proc.stdout


def test_an_invalid_trial_stops_the_sweep_before_any_starts(tmp_path):
    """Every trial is validated first: one bad value is one line naming the key and the trial,
    exit 2, and no trial ran (no sweep folder, no run directory)."""
    proc = sweep(tmp_path / "sweep", "optimizer.learning_rate=1e-3,-1,3e-3", "scheduler=cosine,constant", *TINY, *EVAL, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringleader: error: optimizer.learning_rate: must be > 0"), proc.stderr
    assert "trial 2: optimizer.learning_rate=-1 scheduler=cosine" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_summary_ranks_by_metric_for_best_model(tmp_path):
    """greater_is_better=true makes the highest eval_loss the best (a stand-in for a metric where
    higher is better); a best value of exactly 0.0 stays 0.0, not NaN."""
    from launcher.sweep import mark_best, render_summary

    rows = [
        {"trial": i, "status": "completed", "objective": v, "metric": "eval_loss", "greater_is_better": True, "best": False, "overrides": f"x={i}", "steps": 1}
        for i, v in enumerate([0.5, 0.0, 2.0])
    ]
    mark_best(rows)
    assert [r["best"] for r in rows] == [False, False, True]
    for r in rows:
        r.update(greater_is_better=False, best=False)
    mark_best(rows)
    assert [r["best"] for r in rows] == [False, True, False]
    assert "lowest final eval_loss" in render_summary(rows) and "0.0000" in render_summary(rows)
    rows[0]["metric"] = "eval_other"  # trials that disagree on the metric cannot be ranked
    for r in rows:
        r["best"] = False
    mark_best(rows)
    assert not any(r["best"] for r in rows)


def test_optuna_sweep_over_the_learning_rate(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = sweep(
        tmp_path / "sweep", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.direction=minimize",
        "optimizer.learning_rate=tag(log,interval(1e-4,3e-2))", "cluster.nproc_per_node=1", *TINY, *EVAL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    optuna = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    best = next(r for r in rows if r["best"])
    assert f"best_value: {best['eval_loss']}" in optuna
    assert len({r["overrides"].split()[0] for r in rows}) == 2  # two different learning rates
