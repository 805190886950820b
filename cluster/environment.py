"""Where this process runs: torchrun, a SLURM task, or a plain local process; and what this host has.

One small read-only class per environment, each a table from field to environment variable, as in
submitit's job_environment. Nothing here writes os.environ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.errors import ConfigError

class EnvironmentVariableError(ConfigError):
    """A variable that SLURM or torchrun should have set holds something else: named, one line, so
    the launcher exits 2 and a rank fails with the variable's name instead of a traceback."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        super().__init__(variable, f"is {value!r}, expected {expected}; this process's SLURM/torchrun environment is broken: unset it or run inside a real job step")


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


# The smallest value each field may hold: counts start at 1, indices at 0.
MINIMUM = {"world_size": 1, "local_world_size": 1, "nnodes": 1, "step_tasks": 1}
# SLURM's job and step ids are numbers; they become run directory names and rendezvous ids.
ID = re.compile(r"[0-9]+")


def _int(environ: Mapping[str, str], var: str, field: str) -> int:
    text = environ[var].strip()
    lowest = MINIMUM.get(field, 0)
    if not re.fullmatch(r"[0-9]+", text) or int(text) < lowest:
        raise EnvironmentVariableError(var, environ[var], f"a whole number >= {lowest}")
    return int(text)


def _ints(environ: Mapping[str, str], table: dict[str, str]) -> dict[str, int]:
    return {field: _int(environ, var, field) for field, var in table.items() if var in environ}


def _check_within(values: dict[str, int], index: str, count: str, table: dict[str, str]) -> None:
    """An index (rank) below its count (world size), when both are set."""
    if index in values and count in values and values[index] >= values[count]:
        raise EnvironmentVariableError(table[index], str(values[index]), f"a number below {table[count]}={values[count]}")


def _id(environ: Mapping[str, str], var: str) -> str:
    value = environ.get(var, "")
    if value and not ID.fullmatch(value):
        raise EnvironmentVariableError(var, value, "a SLURM id (digits only)")
    return value


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
        _check_within(values, "rank", "world_size", cls.FIELDS)
        _check_within(values, "local_rank", "local_world_size", cls.FIELDS)
        nnodes = values.get("world_size", 1) // max(1, values.get("local_world_size", 1))
        return cls(name="torchrun", nnodes=max(1, nnodes), job_id=_id(environ, "SLURM_JOB_ID"), **values)


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
    step_id: str = ""  # SLURM_STEP_ID: digits, or "" in the batch script

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> "SlurmEnvironment | None":
        # A login shell inside `salloc` has SLURM_JOB_ID but no SLURM_PROCID: that is no task yet.
        if "SLURM_JOB_ID" not in environ or "SLURM_PROCID" not in environ:
            return None
        values = _ints(environ, cls.FIELDS)
        _check_within(values, "rank", "world_size", cls.FIELDS)
        _check_within(values, "node_rank", "nnodes", cls.FIELDS)
        nodelist_var = "SLURM_JOB_NODELIST" if "SLURM_JOB_NODELIST" in environ else "SLURM_NODELIST"
        for var in (nodelist_var, "SLURM_STEP_NODELIST"):
            if environ.get(var):
                try:
                    expand_hostlist(environ[var])
                except ValueError as exc:
                    raise EnvironmentVariableError(var, environ[var], f"a SLURM host list such as n[1-4],login1 ({exc})") from exc
        return cls(
            name="slurm",
            job_id=_id(environ, "SLURM_JOB_ID") or _missing_id(environ),
            step_id=_id(environ, "SLURM_STEP_ID"),
            nodelist=environ.get(nodelist_var, ""),
            step_nodelist=environ.get("SLURM_STEP_NODELIST", ""),
            **values,
        )


def _missing_id(environ: Mapping[str, str]) -> str:
    raise EnvironmentVariableError("SLURM_JOB_ID", environ.get("SLURM_JOB_ID", ""), "a SLURM job id (digits only)")


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


# One host name of a list: letters, digits, `.`, `-`, `_` (what SLURM's NodeName allows in practice).
HOST = r"[A-Za-z0-9._-]+"
# One item of a compressed list: a name, or a prefix, one bracketed set of numbers and ranges, a suffix.
HOSTLIST_ITEM = re.compile(rf"({HOST}|(?:{HOST})?\[[0-9,-]+\](?:{HOST})?)(?:,|$)")
RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as names, as `scontrol show hostnames`.
    Anything else (an unclosed bracket, a reversed range, a stray character) is a ValueError: a
    host name made of garbage would only fail later, as a rendezvous that never connects."""
    hosts: list[str] = []
    position = 0
    while position < len(nodelist):
        match = HOSTLIST_ITEM.match(nodelist, position)
        if not match or match.end() == position:
            raise ValueError(f"cannot read {nodelist[position:]!r}")
        position = match.end()
        item = match.group(1)
        if "[" not in item:
            hosts.append(item)
            continue
        prefix, _, rest = item.partition("[")
        ranges, _, suffix = rest.partition("]")
        for part in ranges.split(","):
            found = RANGE.fullmatch(part)
            if not found:
                raise ValueError(f"{part!r} is not a number or a range in {item!r}")
            lo, hi = found.group(1), found.group(2) or found.group(1)
            if int(hi) < int(lo) or int(hi) - int(lo) > 100_000:
                raise ValueError(f"{part!r} is not a range from low to high in {item!r}")
            hosts += [f"{prefix}{str(i).zfill(len(lo))}{suffix}" for i in range(int(lo), int(hi) + 1)]
    if nodelist.endswith(","):
        raise ValueError("it ends with a comma")
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
