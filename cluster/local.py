"""The local backend: one torchrun on this machine. `render` is pure; `start` runs torchrun, waits,
and says where things are (or which rank failed and why)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.backend import Backend, Job
from cluster.environment import Host
from launcher.errors import ConfigError
from cluster.torchrun import standalone, torchrun_argv

if TYPE_CHECKING:
    from launcher.plan import Plan
    from launcher.schema import RunConfig


class LocalBackend(Backend):
    name = "local"

    def render(self, cfg: RunConfig, plan: Plan, *, python: str) -> Job:
        c = cfg.cluster
        command = torchrun_argv(python=python, nnodes=1, nproc_per_node=plan.nproc_per_node, rendezvous=standalone(),
                                max_restarts=c.max_restarts, monitor_interval=c.monitor_interval, run_dir=plan.run_dir)
        return Job(command=command, env=dict(plan.env))

    def check_host(self, cfg: RunConfig, host: Host, environ: Mapping[str, str] | None = None) -> None:
        """A local run on GPUs needs them on this machine (a dry run may plan for another)."""
        hw, c = cfg.hw, cfg.cluster
        wanted = c.nproc_per_node or hw.gpus_per_node
        if hw.accelerator == "cuda" and not cfg.dry_run and host.gpus < wanted:
            raise ConfigError("hw", f"profile {hw.name} wants {wanted} GPUs but this machine has {host.gpus}; use +hw=cpu, a smaller profile, or cluster=slurm")

    def start(self, cfg: RunConfig, plan: Plan, *, lock: int | None) -> int:
        code = spawn(plan, keep_fds=(lock,))
        report(Path(plan.run_dir), code)
        return code



def spawn(plan: Plan, *, keep_fds: tuple[int | None, ...] = ()) -> int:
    """Run torchrun and wait. Ctrl-C or SIGTERM is passed to torchrun once, which asks every rank to
    stop (SIGTERM); ranks stop at a step boundary. A second Ctrl-C kills the whole job at once.
    `keep_fds`: descriptors torchrun inherits: the run directory's lock (launcher/rundir.py), so it
    stays held while torchrun and its elastic restarts run, even if this process is killed."""
    env = {**os.environ, **plan.env}
    import subprocess  # here, not at the top: the dry run plans with this module, and never spawns

    # torchrun gets its own process group so a terminal's Ctrl-C reaches it once, through us.
    child = subprocess.Popen(plan.command, env=env, start_new_session=True, pass_fds=tuple(fd for fd in keep_fds if fd is not None))
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            child.send_signal(signum)
        else:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        print(f"ringleader: stopped by {signal.Signals(received[0]).name}; run directory: {plan.run_dir}", file=sys.stderr)
        return 128 + received[0]
    return code


def report(run_dir: Path, code: int) -> None:
    """After a local run: where things are, and which rank failed and why."""
    result = run_dir / "result.json"
    if code == 0 and result.exists():
        summary = json.loads(result.read_text())
        metrics = {k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"ringleader: {summary.get('status')} after {summary.get('global_step')} steps; {shown}\nringleader: run directory {run_dir}")
        return
    print(f"ringleader: the job exited with code {code}; run directory {run_dir}", file=sys.stderr)
    for log in sorted((run_dir / "logs").glob("rank-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        errors = [line for line in lines[-40:] if "Error" in line or "error" in line]
        if errors:
            print(f"ringleader: {log.relative_to(run_dir)}: {errors[-1].strip()}", file=sys.stderr)
