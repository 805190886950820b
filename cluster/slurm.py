"""The SLURM backend: render (cluster/slurm_render.py, pure), submit and query (cluster/slurm_jobs.py),
and the nodes of an allocation a user already holds (cluster/slurm_allocation.py).

Why the script is ours and not submitit's: submitit's executor writes its own sbatch script around
a pickled function (`python -m submitit.core._submit FOLDER`), so a dry run could not print what
really runs, and its checkpoint/requeue hook runs in that one Python task per node, not in
torchrun's workers, which are the processes that must stop at a step boundary. So the script is
rendered here, printed by the dry run, saved in the run directory, and that exact file is what
`sbatch --parsable` receives. Nothing in ringleader imports submitit; Hydra's submitit launcher
(sweeps with hydra/launcher=submitit_slurm) does, and it is in the `test` extra.

Stopping: SLURM sends USR2 (`--signal=USR2@signal_delay_s`) before the time limit to every process
of the job step; torchrun runs under the USR2 guard (cluster/torchrun.py), the workers stop together
at the next step boundary, save a checkpoint, and rank 0 writes result.json with `"requeue": true`
while fewer than `cluster.max_requeues` restarts happened (trainer/requeue.py); the batch script then
runs `scontrol requeue`. SIGTERM (scancel, or preemption) also stops the ranks at a step boundary
with a checkpoint, but is not requeued by ringleader: `scancel` means stop, and a cluster that
preempts with PreemptMode=REQUEUE requeues the job itself (`--requeue` allows it).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cluster import slurm_allocation, slurm_jobs
from cluster.backend import Backend, BackendError, Job, JobStatus
from cluster.environment import Host, SlurmEnvironment, detect_environment
from cluster.slurm_render import render_job
from launcher.errors import ConfigError

if TYPE_CHECKING:
    from launcher.plan import Plan
    from launcher.schema import RunConfig


class SlurmBackend(Backend):
    name = "slurm"

    def render(self, cfg: RunConfig, plan: Plan, *, python: str) -> Job:
        command, script = render_job(cfg, plan, python=python)
        return Job(command=command, env=dict(plan.env), script=script)

    def check_host(self, cfg: RunConfig, host: Host, environ: Mapping[str, str] | None = None) -> None:
        """The compute nodes' hardware cannot be this machine's (unless this is one of them); the
        run directory's path must survive sbatch's --output and the container's mount list; and a
        run that submits needs sbatch here (not a dry run: it must work on a laptop)."""
        c = cfg.cluster
        if cfg.hw.name.startswith("auto") and not isinstance(detect_environment(environ), SlurmEnvironment):
            raise ConfigError("hw", "cluster=slurm needs the compute nodes' hardware profile, not this machine's; add +hw=PROFILE (e.g. +hw=8xH100, +hw=cpu; profiles in conf/hw/)")
        run_dir = cfg.train.output_dir
        for char, why in (("%", "sbatch expands % in the job's --output file name"), ("\\", "a \\ in --output turns off sbatch's %j")):
            if char in run_dir:
                raise ConfigError("train.output_dir", f"{run_dir} contains '{char}' ({why}); choose a folder without it for cluster=slurm")
        if c.container:
            for char in ",:":
                if char in run_dir:
                    raise ConfigError("train.output_dir", f"{run_dir} contains '{char}', which splits the container's mount list ({c.container_runtime}); choose a folder without , or : for cluster.container")
        if not cfg.dry_run and self.allocation_task(environ) is None:
            slurm_jobs.check_sbatch(environ)

    def start(self, cfg: RunConfig, plan: Plan, *, lock: int | None) -> int:
        import os

        if lock is not None:
            os.close(lock)  # the batch script takes the lock when the job starts (it waits for this release)
        return slurm_jobs.submit(plan, wait=cfg.cluster.wait)

    def job_of(self, run_dir: Path) -> str | None:
        return slurm_jobs.read_job(run_dir)

    def status(self, job_id: str) -> JobStatus:
        info = slurm_jobs.job_info(job_id)
        state = info.get("JobState", "")
        if info:
            reason = info.get("Reason", "None")
            shown = state + (f" ({reason})" if reason not in ("None", "") else "")
            detail = f"{job_id} {shown}, restarts {info.get('Restarts', '0')}, run time {info.get('RunTime', '?')} of {info.get('TimeLimit', '?')}, nodes {info.get('NodeList', '?')}"
        elif shutil.which("scontrol") is None:
            detail = f"{job_id} (scontrol is not on PATH here: run status on a login node of the cluster)"
        else:
            detail = f"{job_id} (no longer known to slurmctld)"
        return JobStatus(job_id=job_id, state=state, active=bool(state) and state not in slurm_jobs.FINAL_STATES,
                         finished=state in slurm_jobs.FINAL_STATES, detail=detail)

    def cancel(self, job_id: str) -> None:
        """scancel sends SIGTERM: the ranks stop at a step boundary and save a checkpoint."""
        if shutil.which("scancel") is None:
            raise BackendError(f"scancel is not on PATH here, so job {job_id} cannot be cancelled from this machine; run cancel on a login node of the cluster")
        import subprocess

        proc = subprocess.run(["scancel", job_id], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendError(f"scancel {job_id} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def job_log(self, run_dir: Path, job_id: str) -> Path:
        return run_dir / "logs" / f"slurm-{job_id}.log"

    def allocation_overrides(self, overrides: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
        return slurm_allocation.allocation_overrides(overrides, environ)

    def allocation_task(self, environ: Mapping[str, str] | None = None) -> SlurmEnvironment | None:
        return slurm_allocation.allocation_task(environ)

    def run_task(self, cfg: RunConfig, plan: Plan, task: SlurmEnvironment, *, child: bool) -> int:
        return slurm_allocation.run_task(cfg, plan, task, child=child)
