"""Starting the checks' launcher runs on the GPU: one at a time, each cut at the global deadline,
its device memory sampled with nvidia-smi and its rank's max_memory_allocated read from the probe."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, env
from benchmarks.gpu_check.checks import CheckFailed, Launch

PROBE = Path(__file__).resolve().parent / "probe"  # its sitecustomize.py records each rank's peak
TAIL_LINES = 25


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-4000:]


def detect_cuda() -> tuple[dict[str, Any] | None, str]:
    """({gpus, name, torch, cuda}, "") on a CUDA machine, else (None, why not). In a child
    process, so this one never creates a CUDA context (its memory would count in nvidia-smi's)."""
    code = (
        "import json, torch\n"
        "ok = torch.cuda.is_available()\n"
        "print(json.dumps({'ok': ok, 'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpus': torch.cuda.device_count() if ok else 0,"
        " 'name': torch.cuda.get_device_name(0) if ok else None}))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env())
    except subprocess.TimeoutExpired:
        return None, "importing torch took over 120 s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"torch does not import: {last}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not info["ok"]:
        return None, f"torch {info['torch']}, CUDA {info['cuda']}: torch.cuda.is_available() is False"
    return info, ""


def command_line(launch: Launch, hw: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launcher", f"+hw={hw}", *launch.argv(), f"train.output_dir={run_dir}", *extra]


def show(argv: list[str], extra_env: dict[str, str]) -> str:
    """The command as a user would type it: environment first, `python` for the interpreter."""
    words = ["python", *argv[1:]]
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in extra_env.items()), shlex.join(words)])


@dataclass(kw_only=True)
class Outcome:
    """One finished launcher run, and readers for what it left in its run directory."""

    name: str
    command: str
    run_dir: Path
    probe_dir: Path
    code: int
    output: str
    wall_s: float
    smi_peak_gb: float | None = None

    def _json(self, name: str) -> dict:
        path = self.run_dir / name
        if not path.exists():
            raise CheckFailed(f"{self.name}: no {name} in the run directory (exit code {self.code})\n{tail(self.output)}")
        return json.loads(path.read_text())

    def result(self) -> dict:
        return self._json("result.json")

    def plan(self) -> dict:
        return self._json("plan.json")

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def config(self) -> dict:
        import yaml

        return yaml.safe_load((self.run_dir / "config.yaml").read_text())

    def rank_log(self, rank: int) -> str:
        path = self.run_dir / "logs" / f"rank-{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def max_memory_allocated_gb(self) -> float | None:
        """The largest torch.cuda.max_memory_allocated of the run's rank processes (every restart)."""
        peaks = [json.loads(p.read_text())["max_memory_allocated"] for p in self.probe_dir.glob("peak-*.json")]
        return round(max(peaks) / 1e9, 3) if peaks else None

    def summary(self) -> dict[str, Any]:
        return {"command": self.command, "exit_code": self.code, "wall_s": round(self.wall_s, 1)}


class MemorySampler(threading.Thread):
    """Device memory in use (nvidia-smi, every 0.2 s): the CUDA context and the caching allocator's
    reserve included, so above max_memory_allocated. None where nvidia-smi is missing."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib: float | None = None
        self.stop = threading.Event()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        self.index = visible if visible.isdigit() else "0"

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", self.index], capture_output=True, text=True, timeout=5)
                used = float(out.stdout.strip().splitlines()[0])
                self.peak_mib = max(self.peak_mib or 0.0, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self.stop.wait(0.2)


def descendants(pid: int) -> list[int]:
    """Every process below pid, read from /proc (torchrun runs in a session of its own, so killing
    the launcher's process group would leave it and its ranks behind)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_tree(proc: subprocess.Popen) -> None:
    """SIGTERM (the launcher forwards it to torchrun, ranks stop at a step boundary), then SIGKILL."""
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


@dataclass(kw_only=True)
class Runner:
    """Starts launches in workdir/<name>, each at most once, none past the deadline."""

    hw: str
    workdir: Path
    deadline: float  # time.monotonic() at which every run is cut
    done: dict[str, Outcome] = field(default_factory=dict)

    def start(self, launch: Launch) -> Outcome:
        if launch.name in self.done:  # a run shared with an earlier check
            outcome = self.done[launch.name]
            if outcome.code != 0:
                raise CheckFailed(f"{launch.name} (run for an earlier check) exited {outcome.code}\n{tail(outcome.output)}")
            return outcome
        left = self.deadline - time.monotonic()
        if left < 10:
            raise CheckFailed(f"{launch.name}: not started, {max(0.0, left):.0f} s of the budget left")
        run_dir, probe_dir = self.workdir / launch.name, self.workdir / "probes" / launch.name
        argv = command_line(launch, self.hw, run_dir)
        extra = {**launch.env, "RINGLEADER_GPU_PROBE_DIR": str(probe_dir)}
        run_env = env(**extra)
        run_env["PYTHONPATH"] = str(PROBE) + os.pathsep + run_env["PYTHONPATH"]
        log_path = self.workdir / f"{launch.name}.out"
        sampler = MemorySampler()
        started = time.monotonic()
        print(f"gpu_check:   run {launch.name}: {show(argv, launch.env)}", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=run_env, start_new_session=True)
            sampler.start()
            try:
                code = proc.wait(timeout=left)
                timed_out = False
            except subprocess.TimeoutExpired:
                end_tree(proc)
                code, timed_out = 124, True
            sampler.stop.set()
        sampler.join(timeout=10)
        output = log_path.read_text(errors="replace")
        if timed_out:
            output += f"\ngpu_check: {launch.name} cut after {left:.0f} s: the budget ran out (--budget-s)"
        outcome = Outcome(
            name=launch.name, command=show(argv, launch.env), run_dir=run_dir, probe_dir=probe_dir, code=code, output=output,
            wall_s=time.monotonic() - started, smi_peak_gb=round(sampler.peak_mib * 1.048576e-3, 3) if sampler.peak_mib else None,
        )
        self.done[launch.name] = outcome
        if code != 0:
            raise CheckFailed(f"{launch.name} exited {code}\n{tail(output)}")
        return outcome


def write_json_atomically(path: Path, document: dict) -> None:
    """Readers (and a run killed half-way) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)
