"""The torchrun command every backend runs, built once; the USR2 guard it runs under; and the one
rule for the rendezvous host of a multi-node job."""

from __future__ import annotations

PYTHON_MODULE = ("-m", "torch.distributed.run")

# SLURM sends USR2 (`--signal=USR2@...`; USR2 and not USR1, as submitit: NCCL may catch USR1)
# before the time limit to every process of the job step. It is for the workers, which stop at a
# step boundary and save; torchrun does not handle it, and its default action would kill the agent
# and orphan the workers. So torchrun runs under this wrapper: an ignored signal stays ignored
# across exec, and the workers install their own handler.
USR2_GUARD = ("bash", "-c", 'trap "" USR2; exec "$@"', "ringleader-node")

# The rendezvous host: the address slurmctld has for the first node of the node list (its
# NodeAddr), or that node's name when it has none. Not the batch host's `hostname`: node names need
# not resolve (on the loopback test cluster they do not). One shell function, so the batch script
# and `srun python -m launcher` (cluster/slurm_allocation.py) decide it the same way.
HEAD_ADDRESS_SH = (
    'first=$(scontrol show hostnames "$1" | head -n 1); '
    'addr=$(scontrol show node -o "$first" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2); '
    'echo "${addr:-$first}"'
)


def standalone() -> list[str]:
    """One node: torchrun hosts its own rendezvous on a free port."""
    return ["--standalone"]


def c10d(endpoint: str, rdzv_id: str) -> list[str]:
    """Several nodes: c10d's store on `endpoint` (host:port); `rdzv_id` is the job, so a requeued
    job (same id) rendezvouses again by itself."""
    return ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}"]


def torchrun_argv(*, python: str, nnodes: int, nproc_per_node: int, rendezvous: list[str], max_restarts: int, monitor_interval: float, run_dir: str) -> list[str]:
    return [
        python, *PYTHON_MODULE,
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc_per_node}",
        *rendezvous,
        f"--max_restarts={max_restarts}",
        # torchrun's default of 5 s adds ~15 s to every restart (pytorch #124692)
        f"--monitor_interval={monitor_interval:g}",
        "--module", "trainer",
        run_dir,
    ]
