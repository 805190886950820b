"""What an existing run directory means: one job at a time (a lock naming its holder), unique
default names, no fresh start over an earlier run's checkpoints unless overwrite_output_dir, no
resume with a config that changes the trajectory unless resume_with_changed_config, and then the
new values really apply.

Refusals go through the real `python -m launcher` and must leave the directory exactly as it was;
the runs are real 2-rank torchrun jobs on gloo (tests/conftest.py TINY).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from launcher.rundir import DEFAULT_NAME, is_default_name, make_unique, running_job
from launcher.trajectory import EFFECTIVE_BATCH, changed_keys
from tests.checkpoint_tools import checkpoint_steps, job
from tests.conftest import ROOT, Run, launcher_env, run_launcher, side_by_side

# 4 steps, a checkpoint at step 4, a constant learning rate: what the resumes below continue. One
# rank: what a run directory means does not depend on how many ranks wrote it.
FIRST = {"train.max_steps": 4, "scheduler": "constant", "optimizer.learning_rate": 0.001, "model.dropout": 0.0, "cluster.nproc_per_node": 1}


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: a refused launch must change none."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(run: Run, *names: str) -> str:
    assert run.code == 2, run.output[-2000:]
    lines = run.proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringleader: error: "), run.proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("first") / "run"
    run_launcher(run_dir, *job(**FIRST))
    assert checkpoint_steps(run_dir) == [4]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# -- pure ----------------------------------------------------------------------------------------


def test_changed_keys_name_what_changes_the_trajectory_only():
    old = {"optimizer": {"learning_rate": 0.001}, "train": {"seed": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
           "save_steps": 4, "logging_steps": 1, "output_dir": "/a", "resume": "auto", "per_device_eval_batch_size": 8}, "cluster": {"partition": "a", "nproc_per_node": 2}}
    same_batch = {**old, "train": {**old["train"], "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "save_steps": 2,
                  "logging_steps": 5, "output_dir": "/b", "resume": "none", "per_device_eval_batch_size": 2}, "cluster": {"partition": "b", "nproc_per_node": 1}}
    assert changed_keys(old, 2, same_batch, 2) == {}  # 4 x 2 x 2 = 8 x 2 x 1
    new = {**old, "optimizer": {"learning_rate": 0.002}, "train": {**old["train"], "seed": 2}}
    assert changed_keys(old, 2, new, 4) == {"optimizer.learning_rate": (0.001, 0.002), "train.seed": (1, 2), EFFECTIVE_BATCH: (16, 32)}


def test_default_names_are_unique_and_created_exclusively(tmp_path):
    from launcher.compose import compose

    names = {Path(compose([]).config.train.output_dir).name for _ in range(3)}
    assert len(names) == 3 and all(DEFAULT_NAME.match(n) for n in names), names  # to the microsecond
    base = tmp_path / "runs" / "2026-12-03_06-41-45-123456"
    assert is_default_name(base, ()) and not is_default_name(base, ("train.output_dir=x",))
    assert make_unique(base) == base and make_unique(base) == base.with_name(base.name + "-1")
    assert make_unique(base) == base.with_name(base.name + "-2")


# -- refusals, through the real command ---------------------------------------------------------


def test_a_fresh_start_over_checkpoints_is_refused_and_writes_nothing(first):
    before = tree(first)
    run = run_launcher(first, *job(**FIRST, **{"train.resume": "none"}), check=False)
    assert_refused(run, "train.resume", "step-4", "train.overwrite_output_dir=true")
    assert tree(first) == before


def test_a_resume_with_a_changed_config_is_refused_naming_the_keys(first):
    before = tree(first)
    changed = {**FIRST, "optimizer.learning_rate": 0.002, "train.seed": 7, "train.logging_steps": 3, "train.save_total_limit": 1}
    line = assert_refused(run_launcher(first, *job(**changed), check=False), "train.resume", "optimizer.learning_rate 0.001 -> 0.002", "train.seed 42 -> 7", "train.resume_with_changed_config=true")
    assert "logging_steps" not in line and "save_total_limit" not in line  # they do not change the trajectory
    assert tree(first) == before


@pytest.fixture(scope="module")
def continued(first, tmp_path_factory) -> dict[str, Run]:
    """Two copies of `first` run again, side by side (tests/conftest.py), named after their tests:
    one started over with overwrite_output_dir (a user's files planted in it first), one resumed
    with a new learning rate and resume_with_changed_config."""
    root = tmp_path_factory.mktemp("continued")
    overwrite = copy_of(first, root / "overwrite")
    (overwrite / "notes.txt").write_text("mine")
    (overwrite / "checkpoints" / "mine").mkdir()
    return side_by_side(
        overwrite=partial(run_launcher, overwrite, *job(**{**FIRST, "train.max_steps": 2, "train.save_steps": 2}), "train.resume=none", "train.overwrite_output_dir=true"),
        changed=partial(run_launcher, copy_of(first, root / "changed"), *job(**{**FIRST, "optimizer.learning_rate": 0.002, "train.max_steps": 6}), "train.resume_with_changed_config=true"),
    )


def test_overwrite_output_dir_starts_over_keeping_the_users_files(continued):
    run = continued["overwrite"]  # first's copy with notes.txt and checkpoints/mine, 2 steps, train.resume=none train.overwrite_output_dir=true
    run_dir = run.run_dir
    assert "train.overwrite_output_dir: removed" in run.output
    assert checkpoint_steps(run_dir) == [2], "the earlier run's step-4 is gone: resume=auto cannot continue the other run"
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "checkpoints" / "mine").is_dir()
    assert [e["step"] for e in run.metrics() if "loss" in e] == [1, 2]  # one run's metrics only
    assert_refused(run_launcher(run_dir, *job(**FIRST), "train.overwrite_output_dir=true", check=False), "train.overwrite_output_dir", "train.resume=none")


def test_resume_with_changed_config_applies_the_new_learning_rate(continued):
    """Opt-in: the schedule is rebuilt from the new config at the restored step, so the steps after
    the resume log the new learning rate (the restored scheduler would keep 0.001)."""
    run = continued["changed"]  # first's copy resumed to step 6 with optimizer.learning_rate=0.002
    run_dir = run.run_dir
    rates = {e["step"]: e["learning_rate"] for e in run.metrics() if "learning_rate" in e}
    assert [rates[s] for s in (1, 2, 3, 4)] == [0.001] * 4
    assert [rates[s] for s in (5, 6)] == [0.002] * 2, rates
    assert "with a changed config" in (run_dir / "logs" / "rank-0.log").read_text()


# -- one job at a time ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_launch_into_a_running_run_directory_is_refused_naming_the_holder(tmp_path):
    """A real run, slowed by 2 s at each of its first steps (RINGLEADER_FAULT delay), holds the
    lock; a second launch into the same directory is refused naming its pid; the first completes."""
    run_dir = tmp_path / "run"
    slow = launcher_env(RINGLEADER_FAULT=",".join(f"step:0:{s}:delay" for s in (1, 2, 3)))
    holder_job = job(**{"train.max_steps": 4, "cluster.nproc_per_node": 1})  # the lock is the launcher's: one rank will do
    args = [sys.executable, "-m", "launcher", *holder_job, f"train.output_dir={run_dir}"]
    holder = subprocess.Popen(args, cwd=ROOT, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "logs" / "rank-0.log").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run_dir / ".lock").read_text().startswith(f"pid {holder.pid} on ")
        config = (run_dir / "config.yaml").read_bytes()
        second = run_launcher(run_dir, *holder_job, check=False)
        assert_refused(second, "train.output_dir", f"in use by pid {holder.pid} on ")
        assert (run_dir / "config.yaml").read_bytes() == config
        assert holder.poll() is None, "the refusal must not have waited for the first run"
        out, err = holder.communicate(timeout=240)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == 0, err[-2000:]
    assert '"status": "completed"' in (run_dir / "result.json").read_text()
    # Once it has ended, the directory is free again: a rerun resumes (and finds nothing to do).
    assert run_launcher(run_dir, *holder_job).code == 0


@pytest.mark.slow
@pytest.mark.slurm
def test_a_rerun_while_its_slurm_job_runs_is_refused_naming_the_job(tmp_path):
    """A real job on the loopback SLURM cluster: the batch script holds the lock (flock) while it
    runs; the same command again is refused naming the job (slurm.json), a local launch into the
    directory names the lock's holder, the job itself goes on."""
    from tests.slurm_cluster import LocalSlurmCluster, missing_packages

    if missing_packages():
        pytest.skip(f"SLURM is not installed ({', '.join(missing_packages())}): bash tests/run.sh as root")
    cluster = LocalSlurmCluster().start()
    try:
        env = launcher_env(SLURM_CONF=str(cluster.conf))
        run_dir = tmp_path / "run"
        args = [*job(**{"train.max_steps": 5000, "train.save_strategy": "no"}), "+hw=cpu", "cluster=slurm", "cluster.nodes=1", "cluster.nproc_per_node=1", "cluster.rdzv_port=29614"]
        run_launcher(run_dir, *args, env=env)
        job_id = (run_dir / "slurm.json").read_text().split('"job_id": "')[1].split('"')[0]
        deadline = time.monotonic() + 120
        while "SLURM job" not in ((run_dir / ".lock").read_text() if (run_dir / ".lock").exists() else "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run_dir / ".lock").read_text().startswith(f"SLURM job {job_id} on ")
        before = tree(run_dir / "logs"), (run_dir / "config.yaml").read_bytes()
        assert_refused(run_launcher(run_dir, *args, env=env, check=False), "train.output_dir", f"in use by SLURM job {job_id}")
        local = run_launcher(run_dir, *job(**{"train.max_steps": 5000, "train.save_strategy": "no"}), "cluster.nproc_per_node=1", env=env, check=False)
        assert_refused(local, "train.output_dir", f"in use by SLURM job {job_id}")
        assert (run_dir / "config.yaml").read_bytes() == before[1]
        assert cluster.job(job_id).get("JobState") == "RUNNING"
        os.environ["SLURM_CONF"] = str(cluster.conf)  # slurm.json's job, as the controller sees it (a queued job holds no lock yet)
        try:
            assert running_job(run_dir) == f"SLURM job {job_id} (RUNNING)"
        finally:
            del os.environ["SLURM_CONF"]
        cluster.run("scancel", job_id)
        # Wait for the job to end before the cluster stops: slurmd gone, its ranks would go on
        # training (5000 steps) under an orphaned slurmstepd, stealing the cores from later tests.
        deadline = time.monotonic() + 90
        while cluster.job(job_id).get("JobState", "") not in ("", "CANCELLED", "COMPLETED", "FAILED") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster.job(job_id).get("JobState", "") in ("", "CANCELLED", "COMPLETED", "FAILED")
    finally:
        cluster.stop()


# -- durability ----------------------------------------------------------------------------------

FSYNCED = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
from launcher.rundir import write_run_dir
from trainer.main import write_result
run_dir = Path(sys.argv[1])
write_run_dir(run_dir, OmegaConf.create({"a": 1}), {"world_size": 2})
write_result(run_dir, {"status": "completed"}, "")
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the system calls")
def test_config_plan_and_result_are_fsynced_with_their_folder(tmp_path):
    """Seen in the real system calls (strace): each file is fsynced before its rename, and the
    run directory after it, so a power loss leaves the old file or the new one."""
    run_dir = tmp_path / "run"
    trace = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "--seccomp-bpf", "-y", "-e", "trace=fsync,rename,renameat,renameat2", "-o", str(trace), sys.executable, "-c", FSYNCED, str(run_dir)],
                          cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [line for line in trace.read_text().splitlines() if "fsync(" in line or "rename" in line]
    for name in ("config.yaml", "plan.json", "result.json"):
        synced = next(i for i, line in enumerate(calls) if "fsync(" in line and f".{name}.tmp>" in line)
        renamed = next(i for i, line in enumerate(calls) if "rename" in line and f".{name}.tmp" in line)
        folder = next(i for i, line in enumerate(calls) if i > renamed and "fsync(" in line and f"<{run_dir}>" in line)
        assert synced < renamed < folder, calls
