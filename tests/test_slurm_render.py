"""The sbatch script, rendered without a cluster: recorded files, quoting, refusals, a dry run that
calls nothing. (tests/test_slurm.py runs the same scripts on the real local cluster.)

Re-record after an intended change:  RINGLEADER_RECORD=1 python -m pytest tests/test_slurm_render.py
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from cluster.slurm_render import q, render_job
from trainer.requeue import stop_status
from launcher.compose import compose
from launcher.prepare import prepare
from tests.conftest import ROOT, launcher_env, run_launcher

RECORDED = ROOT / "tests" / "recorded"
SENTINEL = "/tmp/ringleader-injected-SENTINEL"

# name -> overrides. Every case has an absolute output_dir and hw values that do not depend on
# the machine running the test, so the script is the same everywhere.
CASES: dict[str, list[str]] = {
    # The one the real cluster also accepts (tests/test_slurm.py checks it with sbatch --test-only).
    "cpu_2nodes": ["+hw=cpu", "hw.cpus_per_node=2", "cluster=slurm", "cluster.nodes=2", "cluster.partition=debug", "train.output_dir=/scratch/runs/cpu-2nodes"],
    "a100_4nodes": [
        "+hw=8xA100", "cluster=slurm", "cluster.nodes=4", "cluster.partition=gpu", "cluster.account=proj42", "cluster.qos=high",
        "cluster.time_min=240", "cluster.constraint='a100&ib'", "cluster.exclusive=true", "cluster.mem_gb=480", "cluster.max_requeues=5",
        "cluster.signal_delay_s=300", "cluster.setup=['module load cuda/12.4','source /shared/venv/bin/activate','export HF_HOME=/scratch/hf']",
        "+cluster.sbatch_extra.mail-type=END", "train.output_dir='/scratch/runs/gpt a100'",
    ],
    "h100_pyxis": ["+hw=8xH100", "cluster=slurm", "cluster.nodes=2", "cluster.container='nvcr.io#myorg/ringleader:latest'", "train.output_dir=/scratch/runs/pyxis"],
    "h100_apptainer": ["+hw=8xH100", "cluster=slurm", "cluster.nodes=2", "cluster.container=/images/ringleader.sif", "cluster.container_runtime=apptainer", "train.output_dir=/scratch/runs/apptainer"],
    "injection": [
        "+hw=cpu", "hw.cpus_per_node=2", "cluster=slurm",
        f"cluster.partition='x; touch {SENTINEL}'",
        f"cluster.account='$(touch {SENTINEL})'",
        # A setup line may not use the shell's own syntax (tests/test_slurm_holes.py); inside single quotes it is text.
        f'cluster.setup=["echo \'$(touch {SENTINEL}) `touch {SENTINEL}` ; touch {SENTINEL}\'", "echo \'it\'\\"\'\\"\'s\'"]',
        f"+cluster.sbatch_extra.comment='`touch {SENTINEL}` $(touch {SENTINEL})'",
        "train.output_dir='/scratch/runs/inject $HOME'",
    ],
}


def rendered(name: str) -> str:
    prepared = prepare(compose(CASES[name]))
    _command, script = render_job(prepared.config, prepared.plan, python="python3")
    return script


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_matches_recorded(name: str) -> None:
    script = rendered(name)
    path = RECORDED / f"{name}.sbatch"
    if os.environ.get("RINGLEADER_RECORD") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
    assert path.exists(), f"no recorded script {path}; record it: RINGLEADER_RECORD=1 python -m pytest {__file__}"
    assert script == path.read_text(), f"the script for {name} changed; if intended, re-record: RINGLEADER_RECORD=1 python -m pytest tests/test_slurm_render.py"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_script_shape() -> None:
    script = rendered("a100_4nodes")
    for line in [
        "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=96",
        "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --qos=high", "#SBATCH --time=240",
        "#SBATCH --constraint='a100&ib'", "#SBATCH --exclusive", "#SBATCH --mem=480G", "#SBATCH --signal=USR2@300",
        "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --mail-type=END",
        "#SBATCH --output='/scratch/runs/gpt a100/logs/slurm-%j.log'",
        "module load cuda/12.4", "source /shared/venv/bin/activate", "export HF_HOME=/scratch/hf",
    ]:
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    for word in ["--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", '--rdzv_endpoint="${head_host}:29400"', '--rdzv_id="${SLURM_JOB_ID}"', "--module trainer '/scratch/runs/gpt a100' &"]:
        assert word in srun, word


def test_injection_stays_literal_in_the_script() -> None:
    script = rendered("injection")
    # Every attempt is inside single quotes; bash runs the script's commands without touching them.
    assert f"#SBATCH --partition='x; touch {SENTINEL}'" in script
    assert f"#SBATCH --account='$(touch {SENTINEL})'" in script
    assert f"echo '$(touch {SENTINEL}) `touch {SENTINEL}` ; touch {SENTINEL}'" in script
    assert "run_dir='/scratch/runs/inject $HOME'" in script
    # Run the script's non-SLURM part (up to srun) in bash: nothing is created.
    prefix = script.split("# sbatch runs this script")[0]
    proc = subprocess.run(["bash", "-c", prefix], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"$(touch {SENTINEL}) `touch {SENTINEL}` ; touch {SENTINEL}" in proc.stdout
    assert "it's" in proc.stdout
    assert not Path(SENTINEL).exists()


def test_quote_refuses_newlines_even_past_validation() -> None:
    with pytest.raises(AssertionError):
        q("gpu\n#SBATCH --wrap=evil")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["cluster.partition=gpu\n#SBATCH --account=other"], "cluster.partition"),
        (['cluster.setup=["module load x\nrm -rf /"]'], "cluster.setup"),
        (["+cluster.sbatch_extra.a b=1"], "cluster.sbatch_extra"),
        (["cluster.setup=[\"echo 'unbalanced\"]"], "cluster.setup.0"),
        (["cluster.container_runtime=docker"], "cluster.container_runtime"),
    ],
)
def test_bad_slurm_values_are_refused(tmp_path: Path, overrides: list[str], key: str) -> None:
    run = run_launcher(tmp_path / "run", "+hw=cpu", "cluster=slurm", *overrides, "dry_run=true", check=False)
    assert run.code == 2, run.output
    assert key in run.proc.stderr and len(run.proc.stderr.strip().splitlines()) == 1, run.proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_script_and_calls_no_slurm_command(tmp_path: Path) -> None:
    """Fake sbatch/sinfo/squeue/scontrol/srun first on PATH: each records that it was called."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("sbatch", "sinfo", "squeue", "scontrol", "srun", "scancel"):
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\necho {tool} >> {calls}\nexit 1\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = launcher_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = run_launcher(tmp_path / "run", "+hw=8xA100", "cluster=slurm", "cluster.nodes=4", "cluster.container='nvcr.io#org/img:1'", "dry_run=true", env=env)
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "run").exists()
    assert "sbatch --parsable" in run.proc.stdout and "#SBATCH --nodes=4" in run.proc.stdout
    assert "--container-image=nvcr.io#org/img:1" in run.proc.stdout
    # The dry run prints the very script a submission writes: the same text, indented.
    prepared = prepare(compose(["+hw=8xA100", "cluster=slurm", "cluster.nodes=4", "cluster.container='nvcr.io#org/img:1'", f"train.output_dir={tmp_path / 'run'}"]))
    assert "\n".join("    " + line for line in prepared.plan.script.splitlines()) in run.proc.stdout


def test_stop_status_asks_for_a_requeue_until_the_cap() -> None:
    stopped = {"status": "stopped", "global_step": 7}
    assert stop_status(stopped, signal_name="SIGUSR2", job_id="12", restarts=0, max_requeues=2)["requeue"] is True
    assert stop_status(stopped, signal_name="SIGUSR2", job_id="12", restarts=1, max_requeues=2)["requeue"] is True
    capped = stop_status(stopped, signal_name="SIGUSR2", job_id="12", restarts=2, max_requeues=2)
    assert capped["status"] == "requeue_limit" and capped["requeue"] is False
    # SIGTERM (scancel, preemption) and runs outside SLURM are never requeued by ringleader.
    assert "requeue" not in stop_status(stopped, signal_name="SIGTERM", job_id="12", restarts=0, max_requeues=2)
    assert "requeue" not in stop_status(stopped, signal_name="SIGUSR2", job_id="", restarts=0, max_requeues=2)
    assert stop_status({"status": "completed"}, signal_name="SIGUSR2", job_id="12", restarts=0, max_requeues=2) == {"status": "completed"}
