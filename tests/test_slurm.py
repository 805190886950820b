"""cluster=slurm against a real two-node SLURM cluster on loopback (tests/slurm_cluster.py).

The cluster starts once per session (tests/conftest.py slurm_cluster). The tests skip only when
SLURM's packages are missing and they cannot be installed (not root); `bash tests/run.sh` installs
them as root, so CI runs these.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, launcher_env, run_launcher
from tests.slurm_cluster import LocalSlurmCluster, missing_packages
from tests.test_slurm_render import CASES, SENTINEL, rendered

pytestmark = pytest.mark.slurm

if missing_packages() and os.geteuid() != 0:
    pytest.skip(f"SLURM is not installed ({', '.join(missing_packages())}) and installing it needs root: bash tests/run.sh as root", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(slurm_cluster: LocalSlurmCluster) -> LocalSlurmCluster:
    """The session's cluster (tests/conftest.py), shared with test_sweep_slurm and test_backends."""
    return slurm_cluster


class Background:
    """A local launcher run started in the background: weights() waits for it and reads final/."""

    def __init__(self, run_dir: Path, *overrides: str) -> None:
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / "launcher.log", "w") as out:  # a file, not a pipe nobody reads
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher", *overrides, f"train.output_dir={run_dir}"], env=launcher_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def weights(self) -> dict:
        code = self.proc.wait(timeout=300)
        assert code == 0, (self.run_dir.parent / "launcher.log").read_text()[-3000:]
        return weights(self.run_dir)


@pytest.fixture(scope="module")
def four_local_ranks(tmp_path_factory):
    """The reference for the 2-node x 2-rank runs: TINY on 4 local ranks (1 thread each, as there).
    It starts when a test first asks for it and runs beside that test's SLURM job (the same thread
    count per rank, so the same sums, whatever else runs)."""
    reference = Background(tmp_path_factory.mktemp("local4") / "run", *TINY, "cluster.nproc_per_node=4")
    yield reference
    reference.proc.wait(timeout=300)  # never left running past the module


def slurm_env(cluster: LocalSlurmCluster) -> dict[str, str]:
    return launcher_env(SLURM_CONF=str(cluster.conf))


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm.json").read_text())["job_id"]


def wait_for(what: str, check, timeout: float = 90, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip()]
    return max(steps, default=0)


def state(cluster: LocalSlurmCluster, job: str) -> str:
    return cluster.job(job).get("JobState", "")


def verb(cluster: LocalSlurmCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=slurm_env(cluster), cwd=ROOT, timeout=60)


def signal_and_requeue(cluster: LocalSlurmCluster, run_dir: Path, job: str, at_step: int) -> int:
    """Send USR2 as SLURM does before a time limit, once training passed at_step; the job must
    stop at a step boundary with a complete checkpoint and come back PENDING, requeued."""
    restarts = int(cluster.job(job).get("Restarts", "0"))
    wait_for(f"step {at_step}", lambda: last_step(run_dir) >= at_step)
    cluster.run("scancel", "--signal=USR2", job)
    wait_for("the requeue", lambda: int(cluster.job(job).get("Restarts", "0")) == restarts + 1 and state(cluster, job) == "PENDING", timeout=60)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped" and result["signal"] == "SIGUSR2" and result["requeue"] is True, result
    stopped_at = result["global_step"]
    assert (run_dir / "checkpoints" / f"step-{stopped_at}" / "COMPLETE").exists(), list((run_dir / "checkpoints").iterdir())
    # A requeued job waits for its BeginTime; start it now. Not within the second of the requeue:
    # slurmd refuses a job credential made in the second its previous one was revoked
    # ("Job credential revoked"), which is what BeginTime's delay protects against.
    time.sleep(2)
    cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")
    return stopped_at


def test_two_nodes_match_four_local_ranks_and_values_stay_literal(cluster: LocalSlurmCluster, four_local_ranks: Background, tmp_path: Path) -> None:
    """2 nodes x 2 ranks through `python -m launcher ... cluster=slurm cluster.wait=true` end with
    the weights of a local 4-rank run. The same job carries injection attempts in a setup line,
    the job comment and the run directory's name: they reach SLURM and bash as literal text."""
    sentinel = Path(SENTINEL)
    sentinel.unlink(missing_ok=True)
    run_dir = tmp_path / "slurm $(touch x)"
    slurm = run_launcher(
        None, *TINY, "+hw=cpu", "cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=2", "cluster.wait=true", "cluster.rdzv_port=29611",
        f"train.output_dir='{run_dir}'",
        f"cluster.setup=[\"echo '$(touch {SENTINEL}) `touch {SENTINEL}` ; touch {SENTINEL}'\"]",
        f"+cluster.sbatch_extra.comment='$(touch {SENTINEL}) `touch {SENTINEL}`'",
        env=slurm_env(cluster), timeout=240,
    )
    slurm.run_dir = run_dir
    assert "submitted job" in slurm.output and "ended COMPLETED; result completed" in slurm.output, slurm.output[-3000:]
    assert slurm.result()["status"] == "completed"
    assert slurm.plan()["world_size"] == 4 and slurm.plan()["nodes"] == 2
    ours, theirs = slurm.weights(), four_local_ranks.weights()
    assert ours.keys() == theirs.keys()
    # Both have 1 thread per rank and the same 4 ranks: the sums run in the same order, so exactly equal.
    assert all(ours[name].equal(theirs[name]) for name in ours)
    # Both nodes took part, one torchrun each, 4 ranks.
    job = job_id(run_dir)
    assert cluster.job(job)["NodeList"] == "n[1-2]"
    assert sorted(p.name for p in (run_dir / "logs").glob("rank-*.log")) == [f"rank-{r}.log" for r in range(4)]
    batch_log = (run_dir / "logs" / f"slurm-{job}.log").read_text()
    assert f"$(touch {SENTINEL}) `touch {SENTINEL}` ; touch {SENTINEL}" in batch_log  # the setup line echoed its words
    assert "rendezvous" in batch_log
    comment = cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%k").stdout.strip()
    assert comment == f"$(touch {SENTINEL}) `touch {SENTINEL}`"
    assert not sentinel.exists()
    assert not (tmp_path / "x").exists() and not (ROOT / "x").exists()


def test_recorded_script_and_injection_with_sbatch_test_only(cluster: LocalSlurmCluster) -> None:
    """sbatch itself accepts the recorded CPU script, and reads a hostile partition as one literal name."""
    proc = subprocess.run(["sbatch", "--test-only"], input=rendered("cpu_2nodes"), capture_output=True, text=True, env=slurm_env(cluster))
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    Path(SENTINEL).unlink(missing_ok=True)
    proc = subprocess.run(["sbatch", "--test-only"], input=rendered("injection"), capture_output=True, text=True, env=slurm_env(cluster))
    assert proc.returncode != 0 and "partition" in proc.stderr.lower(), proc.stderr
    assert not Path(SENTINEL).exists()
    assert CASES["cpu_2nodes"]  # the same case test_slurm_render compares with tests/recorded/


def test_preemption_checkpoints_requeues_and_resumes_identically(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """USR2 mid-run: every rank stops at one step boundary, saves, the job requeues itself and
    resumes in the same run directory (metrics and logs appended), ending bit-identical to an
    uninterrupted run."""
    steps = ["train.max_steps=60", "train.logging_steps=1", "+hw=cpu"]
    # The uninterrupted reference runs meanwhile, on this machine: 2 ranks, 1 thread each. The SLURM
    # job has 1 rank on each node and hw.cpus_per_node=1, so 1 thread too: another thread count
    # would sum in another order and differ in the last bit, interrupted or not.
    reference_dir = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, "-m", "launcher", *TINY, *steps, f"train.output_dir={reference_dir}"], env=launcher_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "preempted"
    run_launcher(run_dir, *TINY, *steps, "hw.cpus_per_node=1", "cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1", "cluster.rdzv_port=29612", env=slurm_env(cluster))
    job = job_id(run_dir)
    stopped_at = signal_and_requeue(cluster, run_dir, job, at_step=3)
    assert stopped_at < 60, "the job ended before the signal; give it more steps"
    wait_for("the resumed job to complete", lambda: state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
    assert state(cluster, job) == "COMPLETED"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 60, result
    assert cluster.job(job)["Restarts"] == "1"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [stopped_at]
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 61))  # appended, none twice
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert log.count("rank 0/2 on") == 2  # both starts appended to one file
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    ours, theirs = weights(run_dir), weights(reference_dir)
    assert all(ours[k].equal(theirs[k]) for k in theirs), "the resumed run differs from the uninterrupted one"


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_requeue_cap_status_logs_and_cancel(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """A time-limit signal that keeps coming ends at cluster.max_requeues with status requeue_limit;
    status, logs and cancel work on the run directory; cancel (SIGTERM) checkpoints and never requeues."""
    run_dir = tmp_path / "capped"
    args = [*TINY, "train.max_steps=5000", "+hw=cpu", "cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1", "cluster.max_requeues=1", "cluster.rdzv_port=29613"]
    run_launcher(run_dir, *args, env=slurm_env(cluster))
    job = job_id(run_dir)
    wait_for("the job to run", lambda: last_step(run_dir) >= 1)

    shown = verb(cluster, "status", str(run_dir))
    assert shown.returncode == 0 and f"{job} RUNNING" in shown.stdout and "of 5000" in shown.stdout, shown.stdout + shown.stderr
    logs = verb(cluster, "logs", str(run_dir))
    assert logs.returncode == 0 and "rank 0/2 on" in logs.stdout and "step 1 " in logs.stdout, logs.stdout + logs.stderr
    assert "ringleader: job" in verb(cluster, "logs", str(run_dir), "--slurm").stdout

    first = signal_and_requeue(cluster, run_dir, job, at_step=2)
    wait_for("the second start to train", lambda: last_step(run_dir) > first + 1, timeout=90)
    cluster.run("scancel", "--signal=USR2", job)
    wait_for("the job to end", lambda: state(cluster, job) == "COMPLETED", timeout=60)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "requeue_limit" and result["requeue"] is False and result["restarts"] == 1, result
    assert cluster.job(job)["Restarts"] == "1"
    assert (run_dir / "checkpoints" / f"step-{result['global_step']}" / "COMPLETE").exists()
    shown = verb(cluster, "status", str(run_dir))
    assert "requeue_limit" in shown.stdout and f"{job} COMPLETED, restarts 1" in shown.stdout, shown.stdout

    # The same command again continues the run (a new job), and cancel stops it for good.
    run_launcher(run_dir, *args, env=slurm_env(cluster))
    second_job = job_id(run_dir)
    assert second_job != job
    wait_for("the new job to resume and train", lambda: last_step(run_dir) > result["global_step"] + 1, timeout=90)
    cancelled = verb(cluster, "cancel", str(run_dir))
    assert cancelled.returncode == 0 and f"cancelled job {second_job}" in cancelled.stdout, cancelled.stderr
    wait_for("the cancel", lambda: state(cluster, second_job) == "CANCELLED", timeout=60)
    wait_for("rank 0's result", lambda: (run_dir / "result.json").exists(), timeout=30)
    final = json.loads((run_dir / "result.json").read_text())
    assert final["status"] == "stopped" and final["signal"] == "SIGTERM" and "requeue" not in final, final
    assert (run_dir / "checkpoints" / f"step-{final['global_step']}" / "COMPLETE").exists()
    time.sleep(2)
    assert state(cluster, second_job) == "CANCELLED" and cluster.job(second_job).get("Restarts") == "0"
    assert "CANCELLED" in verb(cluster, "status", str(run_dir)).stdout


def test_srun_by_hand_inside_an_allocation(cluster: LocalSlurmCluster, four_local_ranks: Background, tmp_path: Path) -> None:
    """`srun -N2 python -m launcher ...`: each task detects SLURM, task 0 writes the run directory,
    every task runs torchrun for its node, and the run is the same 4-rank run."""
    run_dir = tmp_path / "by-hand"
    proc = subprocess.run(
        ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "launcher", *TINY, "cluster.nproc_per_node=2", "cluster.rdzv_port=29614", f"train.output_dir={run_dir}"],
        capture_output=True, text=True, env=slurm_env(cluster), cwd=ROOT, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ringleader plan") == 1 and "task 1 of 2 (node 1)" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 4
    ours, theirs = weights(run_dir), four_local_ranks.weights()
    assert all(ours[k].equal(theirs[k]) for k in theirs)
