"""The local backend: one torchrun on this machine. `torchrun_command` is pure; `spawn` starts it."""

from __future__ import annotations

import os
import signal
import sys

from launcher.schema import RunConfig


def torchrun_command(cfg: RunConfig, plan, *, python: str) -> list[str]:
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={plan.nproc_per_node}",
        "--standalone",
        f"--max_restarts={cfg.cluster.max_restarts}",
        # torchrun's default of 5 s adds ~15 s to every restart (pytorch #124692)
        f"--monitor_interval={cfg.cluster.monitor_interval:g}",
        "--module", "trainer",
        plan.run_dir,
    ]


def spawn(plan, *, keep_fds: tuple[int | None, ...] = ()) -> int:
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
