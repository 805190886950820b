"""`srun python -m launcher ...` typed inside an allocation: each task of the step is one node of
the run, and starts that node's torchrun (no sbatch, no script)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cluster.environment import SlurmEnvironment, detect_environment
from cluster.torchrun import HEAD_ADDRESS_SH, USR2_GUARD, c10d, torchrun_argv

if TYPE_CHECKING:
    from launcher.plan import Plan
    from launcher.schema import RunConfig


def allocation_task(environ: Mapping[str, str] | None = None) -> SlurmEnvironment | None:
    """The SlurmEnvironment of this process when it is one of several tasks of an srun step (a user
    typed `srun python -m launcher ...` inside an allocation), else None. The batch script itself
    is no such task: it has no SLURM_STEP_NUM_TASKS."""
    env = detect_environment(environ)
    if isinstance(env, SlurmEnvironment) and env.step_tasks > 1:
        return env
    return None


def allocation_overrides(overrides: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Inside an srun step, each task is one node of one run: the run is a SLURM run of the step's
    nodes, and every task must agree on its directory, so the default (a timestamp) becomes the
    job and step id."""
    task = allocation_task(environ)
    if task is None:
        return []
    extra = ["cluster.name=slurm", f"cluster.nodes={task.nnodes}"]
    if not any(o.lstrip("+").startswith("train.output_dir=") for o in overrides):
        extra.append(f"train.output_dir=runs/slurm-{task.job_id}.{task.step_id or '0'}")  # both digits (SlurmEnvironment)
    return extra


def head_address(nodelist: str) -> str:
    """The rendezvous host of the step's nodes: the same rule as the batch script (HEAD_ADDRESS_SH)."""
    import subprocess  # here, not at the top: every launch imports this module, few run a task

    proc = subprocess.run(["bash", "-c", HEAD_ADDRESS_SH, "ringleader-head", nodelist], capture_output=True, text=True)
    return proc.stdout.strip()


def run_task(cfg: RunConfig, plan: Plan, task: SlurmEnvironment, *, child: bool = False) -> int:
    """This task's node of the run: torchrun with the step's nodes, c10d on the step's first node,
    the job and step id as the rendezvous id. Task 0 has written the run directory; the others
    need not wait for it, since no worker starts before node 0's torchrun joins the rendezvous.
    By hand (`srun python -m launcher`) the task becomes torchrun (exec); a sweep's trial run by
    hydra-submitit-launcher (child=True) must outlive it to read result.json and return the
    objective to submitit, so torchrun runs as its child and its exit code is returned. Either way
    under the USR2 guard, as in the batch job."""
    c = cfg.cluster
    endpoint = f"{head_address(task.step_nodelist or task.nodelist)}:{c.rdzv_port}"
    command = torchrun_argv(python=sys.executable, nnodes=plan.nodes, nproc_per_node=plan.nproc_per_node,
                            rendezvous=c10d(endpoint, f"{task.job_id}.{task.step_id or '0'}"),
                            max_restarts=c.max_restarts, monitor_interval=c.monitor_interval, run_dir=plan.run_dir)
    print(f"ringleader: task {task.rank} of {task.step_tasks} (node {task.node_rank}): {shlex.join(command)}", flush=True)
    env = {**os.environ, **plan.env}
    if child:  # this process keeps submitit's handler; torchrun ignores USR2
        import subprocess

        return subprocess.run([*USR2_GUARD, *command], env=env).returncode
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # ignored from here to the guard's trap, across exec
    sys.stdout.flush()
    os.execvpe(USR2_GUARD[0], [*USR2_GUARD, *command], env)
