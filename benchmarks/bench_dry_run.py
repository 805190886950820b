"""Dry run of the launcher: wall time of `python -m launcher dry_run=true` (goal: under 0.5 s),
and proof that it imports no torch, deepspeed or accelerate.

Two installs, timed in the same interleaved rounds:
- `user_*`: what `pip install ringleader` gives. The wheel goes into a fresh venv, with hydra-core
  and omegaconf at the versions the development install has, and no torch at all, so a dry run
  that imports torch fails there. No test-only Hydra plugins are installed, and none of this
  workplace's site hooks run.
- `dev_*`: this checkout, in the interpreter the tests use. That interpreter also has the test
  extras' Hydra plugins, which Hydra imports on every compose. It also has a `.pth` file, added by
  this workplace, that imports certifi at every interpreter start.

Beside each install, its floor: the bare interpreter (`python -c pass`), `import hydra`, and Hydra's
compose API on a one-key config. What ringleader itself adds is the dry run minus that last one.

Wall time on this shared VM moves by ±25% between runs minutes apart, more than ringleader's whole
share. So where valgrind is installed, the user install's dry run and floors are also counted in CPU
instructions (callgrind), which do not move between runs.

Every case runs with bytecode caching on, as on a user's machine: pip compiles a wheel at install,
and a clone writes __pycache__ on its first run. This workplace sets PYTHONDONTWRITEBYTECODE. That
would recompile ringleader's ~17 modules on every run (~30 ms) and none of Hydra's.

    python -m benchmarks.bench_dry_run [--repeat 15]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.common import ROOT, env, median, record, run

CHECK = (
    "import sys; from launcher.__main__ import main; rc = main(sys.argv[1:]);"
    "print('HEAVY', [m for m in ('torch', 'deepspeed', 'accelerate') if m in sys.modules]); sys.exit(rc)"
)
HYDRA_COMPOSE = (
    "import sys; from hydra import compose, initialize_config_dir\n"
    "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"
    "    compose(config_name='config')"
)
RUNS = {
    "default": ["dry_run=true"],
    "8xH100_zero3_4_nodes_slurm": ["dry_run=true", "+hw=8xH100", "strategy=zero3", "model=gpt2_small", "cluster=slurm", "cluster.nodes=4"],
}


def user_install(tmp: Path) -> str:
    """A fresh venv with the wheel and only what a dry run needs; returns its python."""
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "wheels"), str(ROOT)], timeout=600)
    run([sys.executable, "-m", "venv", str(tmp / "venv")])
    py = str(tmp / "venv" / "bin" / "python")
    wheel = next((tmp / "wheels").glob("ringleader-*.whl"))
    run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], timeout=600)
    run([py, "-m", "pip", "install", "-q", f"hydra-core=={version('hydra-core')}", f"omegaconf=={version('omegaconf')}"], timeout=600)
    return py


def instructions(args: list[str], environ: dict[str, str], cwd: Path) -> int:
    """Instructions the command executes (valgrind's callgrind, no cache simulation)."""
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *args],
                          capture_output=True, text=True, env=environ, cwd=cwd, check=True)
    return int(re.search(r"Collected : (\d+)", proc.stderr).group(1))


def timed(args: list[str], environ: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    run(args, env=environ, cwd=cwd)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dry-run-"))
    conf = tmp / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text("a: 1\n")
    dev_env = env()
    dev_env.pop("PYTHONDONTWRITEBYTECODE", None)
    user_env = {k: v for k, v in dev_env.items() if k != "PYTHONPATH"}
    installs = {"user": (user_install(tmp), user_env, tmp), "dev": (sys.executable, dev_env, ROOT)}  # user: cwd outside the checkout

    cases: dict[str, tuple[list[str], dict[str, str], Path]] = {}
    for install, (py, environ, cwd) in installs.items():
        for name, overrides in RUNS.items():
            cases[f"{install}_{name}"] = ([py, "-m", "launcher", *overrides], environ, cwd)
        cases[f"{install}_floor_python"] = ([py, "-c", "pass"], environ, cwd)
        cases[f"{install}_floor_import_hydra"] = ([py, "-c", "import hydra"], environ, cwd)
        cases[f"{install}_floor_hydra_compose"] = ([py, "-c", HYDRA_COMPOSE, str(conf)], environ, cwd)

    heavy = {}
    for name, (argv, environ, cwd) in cases.items():
        if argv[1] == "-m":
            heavy[name] = run([argv[0], "-c", CHECK, *argv[3:]], env=environ, cwd=cwd).stdout.strip().splitlines()[-1]
    for argv, environ, cwd in cases.values():
        timed(argv, environ, cwd)  # warm the page cache and __pycache__
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):  # interleaved: drift of a shared machine hits every case alike
        for name, (argv, environ, cwd) in cases.items():
            times[name].append(timed(argv, environ, cwd))

    out = {name: {"median_s": round(median(ts), 3), "min_s": round(min(ts), 3)} for name, ts in times.items()}
    for name, text in heavy.items():
        out[name].update(heavy_imports=text, goal_s=0.5, met=median(times[name]) < 0.5)
    own = {name: round(median(times[name]) - median(times[f"{name.split('_')[0]}_floor_hydra_compose"]), 3) for name in heavy}
    counted = {}
    if shutil.which("valgrind"):
        for name in ("user_default", "user_8xH100_zero3_4_nodes_slurm", "user_floor_python", "user_floor_import_hydra", "user_floor_hydra_compose"):
            counted[name] = round(instructions(*cases[name]) / 1e6)
        counted["ringleader_share_of_default"] = round(1 - counted["user_floor_hydra_compose"] / counted["user_default"], 3)
    record("dry_run", {
        "cases": out,
        "ringleader_over_hydra_floor_s": own,
        "instructions_millions": counted or "valgrind not installed",
        "user_install": f"wheel + hydra-core {version('hydra-core')} + omegaconf {version('omegaconf')} in a fresh venv; torch not installed",
        "bytecode_cache": True,
        "command": "python -m benchmarks.bench_dry_run",
    })


if __name__ == "__main__":
    main()
