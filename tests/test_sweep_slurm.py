"""Sweeps on the real two-node SLURM cluster on loopback (tests/slurm_cluster.py): each trial a
2-node job, through `cluster=slurm` (submitted, not waited for, summarised later) and through
hydra-submitit-launcher (each trial runs inside its own allocation).

Every job here takes both nodes whole (2 CPUs per task), so the jobs run one after another: both
nodes are this host, and two jobs at once would also share the rendezvous port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SLOW_VARIANT, TINY
from tests.slurm_cluster import LocalSlurmCluster
from tests.test_slurm import cluster, slurm_env, state, wait_for  # noqa: F401  (cluster: the session's, tests/conftest.py)

pytestmark = pytest.mark.slurm

EVAL = ["train.eval_strategy=steps", "train.eval_steps=4", "train.max_steps=8"]
LEARNING_RATES = "optimizer.learning_rate=1e-3,3e-3"


def launcher(cluster: LocalSlurmCluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=ROOT, env=slurm_env(cluster), timeout=timeout)


def finals(rows: list[dict]) -> dict[int, float]:
    """Each trial's final eval loss, read from its own result.json, not from the summary."""
    return {r["trial"]: json.loads((Path(r["run_dir"]) / "result.json").read_text())["metrics"]["eval_loss"] for r in rows}


def check_completed_summary(sweep_dir: Path, rows: list[dict]) -> None:
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}, rows
    losses = finals(rows)
    assert len(set(losses.values())) == 2  # the two learning rates really differ
    assert [r["trial"] for r in rows if r["best"]] == [min(losses, key=losses.get)]
    for r in rows:
        assert r["eval_loss"] == losses[r["trial"]] and r["steps"] == 8
        assert Path(r["run_dir"]) == sweep_dir / str(r["trial"])
        plan = json.loads((Path(r["run_dir"]) / "plan.json").read_text())
        assert plan["world_size"] == 2
        assert sorted(p.name for p in (Path(r["run_dir"]) / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    assert (sweep_dir / "eval_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cluster_slurm_sweep_submits_each_trial_and_summarises_later(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """cluster=slurm: every trial is its own 2-node job, submitted and not waited for; the summary at
    the end says so, and `python -m launcher summary` gives the full table once the jobs are over.
    A third trial, cancelled while it waits in the queue, shows up as failed with SLURM's reason."""
    sweep_dir = tmp_path / "sweep"
    proc = launcher(
        cluster, "-m", LEARNING_RATES + ",1e-2", *TINY, *EVAL, "+hw=cpu", "cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1",
        "cluster.cpus_per_task=2", "cluster.rdzv_port=29631", f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = [json.loads((sweep_dir / str(n) / "trial.json").read_text()) for n in (0, 1, 2)]
    jobs = [t["job_id"] for t in trials]
    cluster.run("scancel", jobs[2])  # queued behind the other two: it never starts
    # The sweep returned at once: one job per trial, none waited for.
    for t, n in zip(trials, (0, 1, 2)):
        assert t["status"] == "submitted" and t["objective"] is None and t["error"] is None, t
        assert t["job_id"] == json.loads((sweep_dir / str(n) / "slurm.json").read_text())["job_id"]
    assert len(set(jobs)) == 3
    early = json.loads((sweep_dir / "summary.json").read_text())
    # Each job takes both nodes, so the later ones are still queued when the sweep ends.
    assert [r["status"] for r in early[1:]] == ["submitted", "submitted"] and early[0]["status"] in ("submitted", "running"), early
    assert not any(r["best"] for r in early)
    assert f"3 trial(s) still queued or running on SLURM; once they have finished: python -m launcher summary {sweep_dir}" in proc.stdout

    for job in jobs[:2]:
        wait_for(f"job {job}", lambda job=job: state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=150, every=1)
        assert state(cluster, job) == "COMPLETED", cluster.job(job)
        assert cluster.job(job)["NodeList"] == "n[1-2]"  # a 2-node job per trial
    assert state(cluster, jobs[2]) == "CANCELLED"
    summary = launcher(cluster, "summary", str(sweep_dir), timeout=60)
    assert summary.returncode == 0, summary.stderr
    rows = json.loads((sweep_dir / "summary.json").read_text())
    cancelled = rows.pop()
    assert cancelled["status"] == "failed" and f"job {jobs[2]} ended CANCELLED without writing result.json" in cancelled["error"], cancelled
    assert f"trial 2 failed: job {jobs[2]} ended CANCELLED" in summary.stdout
    check_completed_summary(sweep_dir, rows)
    assert [r["job_id"] for r in rows] == jobs[:2]
    assert " *" in summary.stdout and "still queued" not in summary.stdout


def test_submitit_slurm_launcher_runs_each_trial_as_a_two_node_run(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """hydra/launcher=submitit_slurm: every trial is a 2-node allocation whose two tasks each run
    trial(); each starts its node's torchrun (one 2-rank run across both nodes), task 0 alone
    records the trial and hands the objective back to Hydra; the sweep waits and summarises."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    proc = launcher(
        cluster, "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=2", "hydra.launcher.timeout_min=10",
        LEARNING_RATES, *TINY, *EVAL, "cluster.nproc_per_node=1", "cluster.rdzv_port=29632", f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((sweep_dir / "summary.json").read_text())
    check_completed_summary(sweep_dir, rows)
    assert "sweep summary" in proc.stdout and " *" in proc.stdout
    losses = finals(rows)
    for r in rows:
        run_dir = Path(r["run_dir"])
        record = json.loads((run_dir / "trial.json").read_text())
        assert record["objective"] == losses[r["trial"]] and record["error"] is None  # what Hydra got back
        plan = json.loads((run_dir / "plan.json").read_text())
        assert plan["nodes"] == 2 and plan["nproc_per_node"] == 1
        job = record["job_id"]
        assert cluster.job(job)["NodeList"] == "n[1-2]" and cluster.job(job)["NumNodes"] == "2"
        # Both tasks of the allocation started a torchrun of the same run, with one rendezvous.
        logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.out"))
        for task in (0, 1):
            assert f"task {task} of 2 (node {task}): " in logs
        assert logs.count(f"--rdzv_id={job}.0 ") == 2 and logs.count(f"trainer {run_dir}\n") == 2
    # The objective reached Hydra from task 0 only: submitit's per-task results, task 1's is NaN.
    import pickle

    for result in sorted((sweep_dir / ".submitit").glob("*/*_1_result.pkl")):
        outcome, value = pickle.loads(result.read_bytes())
        assert outcome == "success"
        assert value.return_value != value.return_value  # NaN


@SLOW_VARIANT  # test_submitit_slurm_launcher_runs_each_trial_as_a_two_node_run runs the same launcher path across nodes
def test_submitit_slurm_launcher_on_one_node_runs_torchrun_there(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """hydra.launcher.nodes=1: the trial's one task runs torchrun on its node with the plan's 2
    ranks (a local run inside the allocation, no second sbatch). Meanwhile, beside it, a sweep with
    2 tasks on one node is refused with the fix, since ringleader starts one torchrun per node."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    common = ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.nodes=1", "hydra.launcher.timeout_min=10"]
    args = [sys.executable, "-m", "launcher", *common]
    refused_dir = tmp_path / "refused"
    refused = subprocess.Popen(
        [*args, "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "optimizer.learning_rate=1e-3", *TINY, f"hydra.sweep.dir={refused_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=slurm_env(cluster),
    )
    sweep_dir = tmp_path / "sweep"
    proc = launcher(cluster, *common, "hydra.launcher.cpus_per_task=2", "optimizer.learning_rate=3e-3", *TINY, *EVAL, f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((sweep_dir / "summary.json").read_text())
    run_dir = Path(row["run_dir"])
    result = json.loads((run_dir / "result.json").read_text())
    assert row["status"] == "completed" and row["best"] and row["eval_loss"] == result["metrics"]["eval_loss"]
    assert json.loads((run_dir / "trial.json").read_text())["objective"] == result["metrics"]["eval_loss"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["cluster"] == "local" and plan["nodes"] == 1 and plan["nproc_per_node"] == 2 and plan["world_size"] == 2
    assert sorted(p.name for p in (run_dir / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    assert not (run_dir / "slurm.json").exists()  # ran in the allocation, submitted nothing
    assert cluster.job(row["job_id"])["NumNodes"] == "1"

    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "every trial of the sweep failed" in out, out[-3000:]  # its only trial was refused
    (row,) = json.loads((refused_dir / "summary.json").read_text())
    assert row["status"] == "failed" and "set hydra.launcher.tasks_per_node=1" in row["error"], row
    assert not (refused_dir / "0" / "config.yaml").exists()  # refused before any run directory
