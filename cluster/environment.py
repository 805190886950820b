"""Where this process runs: torchrun, a SLURM task, or a plain local process; and what this host has.

One small read-only class per environment, each a table from field to environment variable, as in
submitit's job_environment. Nothing here writes os.environ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Environment:
    """The process's place in the job. Subclasses say how to read it from the environment."""

    name: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    restart_count: int = 0
    job_id: str = ""  # SLURM's job id, when the process runs in a SLURM job
    requeue_count: int = 0  # SLURM_RESTART_COUNT: how many times SLURM requeued the job

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> "Environment | None":
        raise NotImplementedError


def _ints(environ: Mapping[str, str], table: dict[str, str]) -> dict[str, int]:
    return {field: int(environ[var]) for field, var in table.items() if var in environ}


@dataclass(frozen=True, kw_only=True)
class TorchrunEnvironment(Environment):
    """A worker started by torchrun's elastic agent."""

    FIELDS = {
        "rank": "RANK",
        "world_size": "WORLD_SIZE",
        "local_rank": "LOCAL_RANK",
        "local_world_size": "LOCAL_WORLD_SIZE",
        "node_rank": "GROUP_RANK",
        "restart_count": "TORCHELASTIC_RESTART_COUNT",
        "requeue_count": "SLURM_RESTART_COUNT",  # a torchrun inside a SLURM job
    }

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> "TorchrunEnvironment | None":
        if "TORCHELASTIC_RUN_ID" not in environ or "RANK" not in environ:
            return None
        values = _ints(environ, cls.FIELDS)
        nnodes = values.get("world_size", 1) // max(1, values.get("local_world_size", 1))
        return cls(name="torchrun", nnodes=max(1, nnodes), job_id=environ.get("SLURM_JOB_ID", ""), **values)


@dataclass(frozen=True, kw_only=True)
class SlurmEnvironment(Environment):
    """A task started by srun or sbatch, before any torchrun: one task per node in ringleader's jobs."""

    FIELDS = {
        "rank": "SLURM_PROCID",
        "world_size": "SLURM_NTASKS",
        "local_rank": "SLURM_LOCALID",
        "node_rank": "SLURM_NODEID",
        "nnodes": "SLURM_NNODES",
        "restart_count": "SLURM_RESTART_COUNT",
        "requeue_count": "SLURM_RESTART_COUNT",
        "step_tasks": "SLURM_STEP_NUM_TASKS",  # set for srun's tasks, not for the batch script
    }
    nodelist: str = ""
    step_nodelist: str = ""  # the nodes of this srun step (a subset of the job's, or all of them)
    step_tasks: int = 0

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> "SlurmEnvironment | None":
        # A login shell inside `salloc` has SLURM_JOB_ID but no SLURM_PROCID: that is no task yet.
        if "SLURM_JOB_ID" not in environ or "SLURM_PROCID" not in environ:
            return None
        values = _ints(environ, cls.FIELDS)
        return cls(
            name="slurm",
            job_id=environ["SLURM_JOB_ID"],
            nodelist=environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "")),
            step_nodelist=environ.get("SLURM_STEP_NODELIST", ""),
            **values,
        )

    @property
    def first_host(self) -> str:
        hosts = expand_hostlist(self.nodelist)
        return hosts[0] if hosts else os.uname().nodename


@dataclass(frozen=True, kw_only=True)
class LocalEnvironment(Environment):
    """A plain process: one rank, nothing around it."""

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> "LocalEnvironment":
        return cls(name="local")


# torchrun first: its workers inside a SLURM allocation carry SLURM_* variables too, but RANK and
# WORLD_SIZE from torchrun are the truth for the process. SLURM next (an srun task that will start
# torchrun), and a plain local process last.
DETECTION_ORDER: tuple[type[Environment], ...] = (TorchrunEnvironment, SlurmEnvironment, LocalEnvironment)


def detect_environment(environ: Mapping[str, str] | None = None) -> Environment:
    environ = os.environ if environ is None else environ
    for kind in DETECTION_ORDER:
        found = kind.detect(environ)
        if found is not None:
            return found
    raise AssertionError("LocalEnvironment always detects")


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as names, as `scontrol show hostnames`."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


@dataclass(frozen=True, kw_only=True)
class Host:
    """What the machine the launcher runs on has, read without torch or a subprocess."""

    hostname: str
    cpus: int
    gpus: int


def describe_host(environ: Mapping[str, str] | None = None) -> Host:
    environ = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    else:
        try:  # the NVIDIA driver lists one folder per GPU; no nvidia-smi call on the launcher's path
            gpus = len(os.listdir("/proc/driver/nvidia/gpus"))
        except OSError:
            gpus = 0
    return Host(hostname=os.uname().nodename, cpus=cpus, gpus=gpus)
