"""benchmarks/gpu_check on a machine without a GPU: it refuses in one line and writes nothing, and
its dry run puts every check's launcher command through the real launcher (dry_run=true), so a
typo in a key is caught here and not on the GPU's clock. The checks themselves need CUDA.

CUDA_VISIBLE_DEVICES="" hides any GPU, so these tests mean the same on a machine that has one.
"""

from __future__ import annotations

import subprocess
import sys

from benchmarks.gpu_check.__main__ import RESULT
from benchmarks.gpu_check.checks import CHECKS
from tests.conftest import ROOT, launcher_env


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], capture_output=True, text=True, cwd=ROOT, env=launcher_env(CUDA_VISIBLE_DEVICES=""), timeout=300)


def snapshot() -> bytes | None:
    return RESULT.read_bytes() if RESULT.exists() else None


def test_refuses_without_cuda_in_one_line_and_writes_nothing():
    before = snapshot()
    proc = gpu_check("--budget-s", "5")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check: error: no CUDA GPU here (") and lines[0].endswith("); run it on a machine with one CUDA GPU")
    assert snapshot() == before, "gpu.json was written without a GPU"


def test_unknown_check_is_refused_in_one_line():
    proc = gpu_check("--only", "zero4")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"gpu_check: error: --only: no check named 'zero4'; choose one of {', '.join(c.name for c in CHECKS)}"]


def test_dry_run_validates_every_check_with_the_real_launcher():
    before = snapshot()
    proc = gpu_check("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = {launch.name for check in CHECKS for launch in check.launches}
    assert proc.stdout.count("\n  ok  ") == len(launches) >= 12
    assert f"gpu_check: dry run: {len(launches)} launcher command(s) valid, 0 refused" in proc.stdout
    assert all(f"{check.name}: " in proc.stdout for check in CHECKS)
    assert all("+hw=1xH100 cluster.nproc_per_node=1 " in line for line in proc.stdout.splitlines() if line.startswith("  ok  "))  # one rank, one GPU
    assert snapshot() == before


def test_dry_run_reports_what_the_launcher_refuses():
    proc = gpu_check("--dry-run", "--only", "fp16_scaler", "--hw", "cpu")  # fp16 needs CUDA: refused
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and "ringleader: error: train.fp16: fp16 needs CUDA GPUs" in proc.stdout
    assert "0 launcher command(s) valid, 1 refused" in proc.stdout
