"""Shared helpers: run the launcher as a user does, read the run directory it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# A model and dataset small enough that a 2-rank job takes a few seconds on 2 CPU cores.
TINY = [
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "data.seq_len=32",
    "data.max_bytes=400000",
    "train.per_device_train_batch_size=4",
    "train.per_device_eval_batch_size=8",
    "train.max_steps=8",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "train.save_strategy=no",
    "train.eval_max_batches=4",
]


# A slower variant of a behaviour another test already runs for real: CI keeps one real run per
# behaviour (the suite stays under 20 minutes on 2 cores); RINGLEADER_SLOW=1 runs the variants too.
SLOW_VARIANT = pytest.mark.skipif(not os.environ.get("RINGLEADER_SLOW"), reason="a slower variant of a behaviour tested beside it; set RINGLEADER_SLOW=1")


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def code(self) -> int:
        return self.proc.returncode

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def result(self) -> dict:
        return json.loads((self.run_dir / "result.json").read_text())

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def plan(self) -> dict:
        return json.loads((self.run_dir / "plan.json").read_text())

    def weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.run_dir / "final" / "model.safetensors"))


def launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_launcher(run_dir: Path | None, *overrides: str, timeout: float = 300, check: bool = True, env: dict | None = None, cwd: Path | None = None) -> Run:
    """`python -m launcher` with overrides (and train.output_dir=run_dir when given)."""
    args = [sys.executable, "-m", "launcher", *overrides]
    if run_dir is not None:
        args.append(f"train.output_dir={run_dir}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or launcher_env(), cwd=cwd or ROOT)
    run = Run(proc=proc, run_dir=Path(run_dir) if run_dir else Path())
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return run


def interrupt_after(run_dir: Path, *overrides: str, lines: int = 3, timeout: float = 120) -> tuple[int, str]:
    """Start `python -m launcher` into run_dir, press Ctrl-C (SIGINT) once metrics.jsonl has
    `lines` lines; its exit code and output."""
    import signal
    import time

    args = [sys.executable, "-m", "launcher", *overrides, f"train.output_dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= lines):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


# -- runs side by side, and runs several test files read ---------------------------------------------
# One launcher run keeps this machine's 2 cores busy only part of the time (the launcher, torchrun
# and the ranks' imports take turns), so independent runs started side by side end sooner than one
# after another. Only for runs whose tests read outcomes (losses, weights, files); a test that
# times something (a stall, a delay, a signal) runs alone.
SIDE_BY_SIDE = 2


class Results(dict):
    """Results by name; a call that raised raises again when its result is read, so a failed run
    fails the tests that read it, not the others."""

    def __getitem__(self, name: str):
        value = super().__getitem__(name)
        if isinstance(value, BaseException):
            raise AssertionError(f"{name}: {value}") from value
        return value


def side_by_side(**calls: Callable[[], T]) -> dict[str, T]:
    """Each call (typically functools.partial(run_launcher, ...)), SIDE_BY_SIDE at a time, in threads;
    their results by name, once every call has ended (no run is left behind)."""
    with ThreadPoolExecutor(max_workers=SIDE_BY_SIDE) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
    return Results({name: future.exception() or future.result() for name, future in futures.items()})


# Runs made once per test session, side by side, in one group: the first test to read any of them
# (through the `shared_runs` fixture) makes them all. Registered by the files whose tests read them,
# when pytest imports those files (`share`, `share_call`), so a file run alone makes only its own.
_shared: dict[str, tuple[Callable[[Path], object], float]] = {}


def share_call(name: str, call: Callable[[Path], T], *, seconds: float = 300) -> str:
    """Register `call(folder)` (a fresh folder of its own) in the session's group; returns `name`,
    the key of its result in shared_runs. The longest (`seconds`, an estimate) start first."""
    assert name not in _shared, f"{name} is registered twice"
    _shared[name] = (call, seconds)
    return name


def share(name: str, *overrides: str, **options) -> str:
    """Register run_launcher(folder / "run", *overrides, **options) in the session's group."""
    return share_call(name, lambda folder: run_launcher(folder / "run", *overrides, **options), seconds=options.get("timeout", 300))


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> dict[str, object]:
    """Every registered run, made once per test session, side by side; tests only read them (one
    that changes a run works on a copy)."""
    root = tmp_path_factory.mktemp("shared")
    longest_first = sorted(_shared.items(), key=lambda item: -item[1][1])
    return side_by_side(**{name: partial(call, root / name) for name, (call, _) in longest_first})


# tests/test_training.py's first job (2 ranks, 30 steps, evaluations, TensorBoard), trained with
# adamw_torch_fused and a peak FLOP/s set: test_optimizers reads it as fused AdamW's real run,
# test_mfu as the run whose log events carry MFU.
TRAINS = [
    *TINY, "train.max_steps=30", "train.logging_steps=5", "train.eval_strategy=steps", "train.eval_steps=15", "optimizer.learning_rate=3e-3", "scheduler=constant_with_warmup",
    "optimizer=adamw_torch_fused", "hw.peak_tflops_bf16=0.002",
]
# One rank, 3 steps, no peak: test_training_args's data_seed baseline, test_training's run without
# gradient checkpointing, test_mfu's run without a peak.
ONE_RANK = [*TINY, "cluster.nproc_per_node=1", "train.max_steps=3", "train.report_to=[]", "train.seed=42"]
share("trains", *TRAINS)
share("one_rank", *ONE_RANK)


# -- set-up several test files share (tests/test_slurm*.py, test_backends.py, the Hugging Face files,
# test_strategies.py and test_security_export.py, test_trainer_parity.py): made once per session,
# when a test first asks for it; the tests only read it (one that changes a run works on a copy).


@pytest.fixture(scope="session")
def slurm_cluster():
    """The loopback SLURM cluster (tests/slurm_cluster.py), started once: each start and stop costs
    seconds. Every test waits for its jobs to end, so the next one finds both nodes idle."""
    from tests.slurm_cluster import LocalSlurmCluster, missing_packages

    assert not missing_packages(), f"SLURM's packages are missing: {missing_packages()}; run bash tests/run.sh (as root it installs them)"
    cluster = LocalSlurmCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """One data.cache_dir for every test's tokenized Hugging Face data: the same files, tokenizer and
    settings are tokenized once a session (the pre-step's child takes seconds), and the shipped
    instruction set is written there once. Not XDG_CACHE_HOME: DeepSpeed's JIT-built ops live in
    the user's cache, and a fresh one rebuilds them (minutes)."""
    return tmp_path_factory.mktemp("hf-cache")


class LazyRuns(dict):
    """Runs by name, each made when a test first asks for it (a -k selection makes only those)."""

    def __init__(self, make: Callable[[str], Run]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> Run:
        self[name] = self.make(name)
        return self[name]


# tests/test_strategies.py's run per strategy: 20 steps, accumulation 2, checkpoints at 10 and 20.
STRATEGY_JOB = [*TINY, "train.max_steps=20", "train.gradient_accumulation_steps=2", "train.save_strategy=steps", "train.save_steps=10", "train.save_total_limit=2"]


@pytest.fixture(scope="session")
def strategy_runs(tmp_path_factory) -> dict[str, Run]:
    """STRATEGY_JOB per strategy: test_strategies compares them; test_security_export exports zero2's."""
    root = tmp_path_factory.mktemp("strategies")
    return LazyRuns(lambda strategy: run_launcher(root / strategy, *STRATEGY_JOB, f"strategy={strategy}"))


# One DDP rank, 4 steps, checkpoints step-2 and step-4 kept, final/ (the weights of step 4).
ONE_RANK_JOB = [*TINY, "cluster.nproc_per_node=1", "train.max_steps=4", "train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=0", "train.report_to=[]"]


@pytest.fixture(scope="session")
def one_rank_run(tmp_path_factory) -> Run:
    """ONE_RANK_JOB: test_security_export crafts its checkpoints, test_trainer_parity resumes it (copies)."""
    run = run_launcher(tmp_path_factory.mktemp("one-rank") / "run", *ONE_RANK_JOB)
    assert (run.run_dir / "checkpoints" / "step-4" / "COMPLETE").is_file()
    return run
