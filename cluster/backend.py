"""The interface every backend implements, and the table from `cluster.name` to backend.

A backend turns a plan into a job and runs it: `render` is pure (plan in, job out: the command and,
where the backend submits one, the script), `start` is the only place that starts processes or
writes job files; `status`, `cancel` and `job_log` act on the job a run directory records. The
CLI, the planner and the verbs hold a `Backend` and never ask which one. A new backend (Kubernetes,
say) is one new module and one line in BACKENDS.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import ConfigError
from launcher.registry import CLUSTERS

if TYPE_CHECKING:
    from cluster.environment import Host, SlurmEnvironment
    from launcher.plan import Plan
    from launcher.schema import RunConfig


@dataclass(frozen=True, kw_only=True)
class Job:
    """What `render` returns: exactly what `start` runs, so a dry run can print it."""

    command: list[str]  # the process the launcher starts (torchrun, or `sbatch --parsable SCRIPT`)
    env: dict[str, str] = field(default_factory=dict)  # added to the launcher's environment
    script: str = ""  # the job script, where the backend submits one (written by start)


@dataclass(frozen=True, kw_only=True)
class JobStatus:
    """A recorded job as its scheduler sees it now."""

    job_id: str
    state: str  # the scheduler's word (RUNNING, PENDING, COMPLETED, ...); "" when it no longer knows the job
    active: bool  # queued or running: the run directory is in use
    finished: bool  # over, and will not run again (a requeued job is not finished)
    detail: str  # one line for `python -m launcher status`


class BackendError(Exception):
    """A backend could not do what a verb asked (no scheduler command here, a refusal): one line."""


class Backend(ABC):
    name: str

    @abstractmethod
    def render(self, cfg: RunConfig, plan: Plan, *, python: str) -> Job:
        """Pure: no file, no process, no scheduler call."""

    def check_host(self, cfg: RunConfig, host: Host, environ: Mapping[str, str] | None = None) -> None:
        """What this machine (`host`, `environ`) must offer to start the job: its GPUs, a scheduler
        command; raises ConfigError before anything is written. Default: nothing."""

    @abstractmethod
    def start(self, cfg: RunConfig, plan: Plan, *, lock: int | None) -> int:
        """Start the job the plan describes; `lock` is the run directory's lock (launcher/rundir.py),
        to pass on or release. Returns the exit code for the launcher."""

    def job_of(self, run_dir: Path) -> str | None:
        """The id of the job this backend recorded for `run_dir`; None when it recorded none (a
        local run is the launcher's own child and has no record). ConfigError for a damaged record."""
        return None

    def status(self, job_id: str) -> JobStatus:
        raise BackendError(f"the {self.name} backend keeps no jobs")

    def cancel(self, job_id: str) -> None:
        raise BackendError(f"the {self.name} backend keeps no jobs")

    def job_log(self, run_dir: Path, job_id: str) -> Path:
        """The job's own log (the batch script's), beside the ranks' logs."""
        raise BackendError(f"the {self.name} backend keeps no jobs")

    def allocation_overrides(self, overrides: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
        """Overrides that the place this process runs in implies (a task of an allocation: this
        backend, the allocation's nodes, one run directory for all its tasks). Default: none."""
        return []

    def allocation_task(self, environ: Mapping[str, str] | None = None) -> SlurmEnvironment | None:
        """This process, when it is one task of a step that already holds the job's nodes (by hand:
        `srun python -m launcher ...`); then `run_task` starts this node's share. Default: never."""
        return None

    def run_task(self, cfg: RunConfig, plan: Plan, task: SlurmEnvironment, *, child: bool) -> int:
        raise NotImplementedError


# cluster.name -> the module:class that implements it. Imported on use: a local run's dry run does
# not load the SLURM modules.
BACKENDS: dict[str, str] = {
    "local": "cluster.local:LocalBackend",
    "slurm": "cluster.slurm:SlurmBackend",
}
assert tuple(BACKENDS) == CLUSTERS, "launcher/registry.py CLUSTERS and BACKENDS name the same backends"


def backend_for(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError("cluster.name", f"unknown cluster '{name}'; choose one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    backend: Backend = getattr(importlib.import_module(module), cls)()
    return backend


def allocation_overrides(overrides: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """What the first backend that finds this process inside one of its allocations adds to the
    user's overrides (`srun python -m launcher ...`), else nothing."""
    for name in BACKENDS:
        if extra := backend_for(name).allocation_overrides(overrides, environ):
            return extra
    return []


def recorded_job(run_dir: Path) -> tuple[Backend, str] | None:
    """The backend and job id a run directory records, if any (status, logs, cancel, sweeps)."""
    for name in BACKENDS:
        backend = backend_for(name)
        if (job_id := backend.job_of(run_dir)) is not None:
            return backend, job_id
    return None
