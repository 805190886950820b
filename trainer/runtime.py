"""A rank's runtime: read the run directory, join the process group, set up logs, seeds and signals."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from cluster.environment import Environment, detect_environment
from launcher.plan import Plan, read_plan
from launcher.schema import RunConfig

log = logging.getLogger("ringleader")


def load_run(run_dir: Path) -> tuple[RunConfig, Plan]:
    """The config every rank reads: config.yaml typed against the schema, and plan.json."""
    schema = OmegaConf.structured(RunConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(run_dir / "config.yaml")))
    assert isinstance(cfg, RunConfig)
    return cfg, read_plan(run_dir)


@dataclass
class StopRequest:
    """Set by SIGTERM, SIGINT or SIGUSR2; the loop stops all ranks together at a step boundary.
    SLURM sends USR2 (submitit's choice: NCCL may catch USR1) before a time limit or preemption,
    and SIGTERM when it stops a job; torchrun turns Ctrl-C into SIGTERM for every worker."""

    signum: int = 0
    received: list[int] = field(default_factory=list)

    def __call__(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if not self.signum:
            self.signum = signum
            log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@dataclass(kw_only=True)
class Runtime:
    run_dir: Path
    env: Environment
    device: torch.device
    rank: int
    world_size: int
    stop: StopRequest
    checkpoint_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_logging(run_dir: Path, rank: int) -> None:
    """Every rank appends to logs/rank-<N>.log (restarts included); rank 0 also prints. Other ranks'
    stdout and stderr go to their file at the descriptor level, native messages and tracebacks too."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"rank-{rank}.log"
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("ringleader")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    if rank != 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    else:
        file_handler = logging.FileHandler(path, mode="a")
        file_handler.setFormatter(fmt)
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(file_handler)
        root.addHandler(console)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers = root.handlers


def attempt_store(env: Environment, timeout: datetime.timedelta) -> dict:
    """The rendezvous store for this restart only. torchrun's agent keeps one store (and port) over
    its restarts, and the processes of restart N read rank addresses left there by restart N-1:
    a rank slower to start than its peers gets "Connection refused" from a dead process (seen with
    torch 2.13, gloo). A prefix per restart keeps each attempt's keys apart. Outside torchrun's
    agent store: {} (env:// as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"ringleader/restart-{env.restart_count}", store), "rank": env.rank, "world_size": env.world_size}


def init_runtime(run_dir: Path, cfg: RunConfig, plan: Plan) -> Runtime:
    env = detect_environment()
    setup_logging(run_dir, env.rank)
    if cfg.hw.accelerator == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(plan.threads_per_rank)
    stop = StopRequest()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(s, stop)
    group = None
    # One rank needs a process group too where something expects one: DeepSpeed's engine always
    # does (it fails at world size 1 without it), and on GPUs NCCL is then set up as for N ranks.
    if env.world_size > 1 or cfg.hw.accelerator == "cuda" or cfg.strategy.is_deepspeed:
        timeout = datetime.timedelta(seconds=cfg.train.ddp_timeout)
        dist.init_process_group(backend=plan.backend, timeout=timeout, device_id=device if device.type == "cuda" else None, **attempt_store(env, timeout))
        # Checkpoint collectives (and an asynchronous save's thread) use a gloo group of their own;
        # after a collective timed out on the default group, it still works to name the stalled rank.
        group = dist.new_group(backend="gloo", timeout=timeout)
    log.info(
        "rank %d/%d on %s (%s, restart %d), device %s",
        env.rank, env.world_size, os.uname().nodename, env.name, env.restart_count, device,
    )
    return Runtime(run_dir=run_dir, env=env, device=device, rank=env.rank, world_size=env.world_size, stop=stop, checkpoint_group=group)


def close_runtime(runtime: Runtime) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
