"""The backend contract (cluster/backend.py), the same tests for every backend: local torchrun and
SLURM, the latter on the real two-node loopback cluster (tests/slurm_cluster.py, marked `slurm`).

- render is pure and deterministic: the same job twice, the plan's command and script, no file
  written, and the torchrun command made by cluster/torchrun.py (built once for every backend);
- start runs the plan to its result; the job the backend records (SLURM: an id; local: none, the
  run is the launcher's own child) has a status and a log;
- cancel stops a running job, whose ranks save a checkpoint; a backend that records no job says so
  in one line instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from cluster.backend import BACKENDS, Backend, BackendError, backend_for, recorded_job
from cluster.torchrun import torchrun_argv
from launcher.compose import compose
from launcher.prepare import prepare
from tests.conftest import TINY, launcher_env, run_launcher

SLURM = pytest.param("slurm", marks=pytest.mark.slurm)
NAMES = ["local", SLURM]
# Overrides that make each backend's plan independent of this machine.
PLACE = {
    "local": ["+hw=cpu", "hw.cpus_per_node=2", "cluster.nproc_per_node=2"],
    "slurm": ["+hw=cpu", "hw.cpus_per_node=2", "cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1", "cluster.partition=debug"],
}


def test_every_cluster_name_has_a_backend() -> None:
    for name in BACKENDS:
        backend = backend_for(name)
        assert isinstance(backend, Backend) and backend.name == name


@pytest.mark.parametrize("name", ["local", "slurm"])  # rendering needs no cluster
def test_render_is_pure_and_deterministic(name: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    prepared = prepare(compose([*TINY, *PLACE[name], f"train.output_dir={run_dir}", "dry_run=true"]))
    cfg, plan = prepared.config, prepared.plan
    backend = backend_for(name)
    first, second = backend.render(cfg, plan, python="python3"), backend.render(cfg, plan, python="python3")
    assert first == second
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the run directory
    planned = backend.render(cfg, plan, python=sys.executable)  # what the planner put in the plan
    assert (planned.command, planned.script) == (plan.command, plan.script)
    assert first.env == plan.env
    # The torchrun words are cluster/torchrun.py's, in its order, whatever wraps them.
    text = " ".join(first.command) + "\n" + first.script
    expected = torchrun_argv(python="python3", nnodes=plan.nodes, nproc_per_node=plan.nproc_per_node, rendezvous=[],
                             max_restarts=cfg.cluster.max_restarts, monitor_interval=cfg.cluster.monitor_interval, run_dir=plan.run_dir)
    position = 0
    for word in expected[:5]:
        position = text.index(word, position)
    assert text.index("--module trainer", position) > position


@pytest.fixture
def cluster_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment a launch of this backend needs: for SLURM, the loopback cluster's."""
    if request.node.callspec.params["name"] != "slurm":
        return launcher_env()
    from tests.test_slurm import slurm_env

    return slurm_env(request.getfixturevalue("cluster"))


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest):
    """The session's cluster (tests/conftest.py slurm_cluster), started here only when a SLURM test runs."""
    from tests.slurm_cluster import missing_packages

    if missing_packages() and os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root: bash tests/run.sh as root")
    return request.getfixturevalue("slurm_cluster")


def wait_for(what: str, check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("name", NAMES)
def test_start_status_logs_and_cancel(name: str, cluster_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if "SLURM_CONF" in cluster_env:
        monkeypatch.setenv("SLURM_CONF", cluster_env["SLURM_CONF"])
    backend = backend_for(name)

    # start: the plan runs to its result (SLURM: followed to the end with cluster.wait=true; local:
    # the session's 1-rank run, tests/conftest.py, started by the same launcher through this backend).
    if name == "local":
        done = request.getfixturevalue("one_rank_run")
        assert done.plan()["cluster"] == "local"
    else:
        done = run_launcher(tmp_path / "done", *TINY, *PLACE[name], "train.max_steps=3", "cluster.wait=true", "cluster.rdzv_port=29631", env=cluster_env, timeout=240)
    assert done.result()["status"] == "completed"
    job = recorded_job(done.run_dir)
    if job is None:  # the local backend: the run was the launcher's child, nothing to query
        assert backend.job_of(done.run_dir) is None
        with pytest.raises(BackendError, match="keeps no jobs"):
            backend.status("1")
        with pytest.raises(BackendError, match="keeps no jobs"):
            backend.cancel("1")
        return
    found, job_id = job
    assert found.name == name and backend.job_of(done.run_dir) == job_id
    status = backend.status(job_id)
    assert status.finished and not status.active and status.state == "COMPLETED" and job_id in status.detail
    assert "ringleader: job" in backend.job_log(done.run_dir, job_id).read_text()

    # cancel: a running job stops, its ranks save a checkpoint, and it is not requeued.
    running = run_launcher(tmp_path / "running", *TINY, *PLACE[name], "train.max_steps=5000", "cluster.rdzv_port=29632", env=cluster_env)
    _, job_id = recorded_job(running.run_dir)
    wait_for("the job to train", lambda: (running.run_dir / "metrics.jsonl").exists())
    assert backend.status(job_id).active
    backend.cancel(job_id)
    wait_for("the cancel", lambda: backend.status(job_id).finished)
    assert backend.status(job_id).state == "CANCELLED"
    wait_for("rank 0's result", lambda: (running.run_dir / "result.json").exists(), timeout=30)
    result = json.loads((running.run_dir / "result.json").read_text())
    assert result["status"] == "stopped" and "requeue" not in result, result
    assert (running.run_dir / "checkpoints" / f"step-{result['global_step']}" / "COMPLETE").exists()


def test_the_plan_round_trips_through_plan_json_and_another_version_is_refused(tmp_path: Path) -> None:
    """What a backend renders and every rank reads: launcher.plan.Plan, written as plan.json and read
    back typed by read_plan; a plan.json of another version is refused in one line naming the file."""
    from launcher.errors import ConfigError
    from launcher.plan import PLAN_VERSION, read_plan

    plan = prepare(compose([*TINY, *PLACE["local"], f"train.output_dir={tmp_path / 'run'}", "dry_run=true"])).plan
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    assert read_plan(tmp_path) == plan and read_plan(tmp_path).version == PLAN_VERSION
    (tmp_path / "plan.json").write_text(json.dumps({**plan.to_dict(), "version": PLAN_VERSION + 1}))
    with pytest.raises(ConfigError) as refused:
        read_plan(tmp_path)
    assert str(tmp_path / "plan.json") in str(refused.value) and "\n" not in str(refused.value)
