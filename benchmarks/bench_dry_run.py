"""Dry run of the launcher: wall time of `python -m launcher dry_run=true` (goal: under 0.5 s),
and proof that it imports no torch, deepspeed or accelerate.

Beside it, in the same interleaved rounds, the floor that any Hydra-composed CLI pays on this
machine: the bare interpreter (`python -c pass`), `import hydra` (which imports OmegaConf), and
Hydra's compose API on a one-key config. What ringleader itself adds is the dry run minus the last.

Every case runs with bytecode caching on, as on a user's machine (pip compiles a wheel's modules at
install; a clone writes __pycache__ on its first run). This workplace sets PYTHONDONTWRITEBYTECODE,
which would recompile ringleader's ~17 modules on every run (~30 ms) and none of Hydra's.

    python benchmarks/bench_dry_run.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import env, median, record, run

CHECK = (
    "import sys; from launcher.__main__ import main; rc = main(sys.argv[1:]);"
    "print('HEAVY', [m for m in ('torch', 'deepspeed', 'accelerate') if m in sys.modules]); sys.exit(rc)"
)
HYDRA_COMPOSE = (
    "import sys; from hydra import compose, initialize_config_dir\n"
    "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"
    "    compose(config_name='config')"
)


def timed(args: list[str], environ: dict[str, str]) -> float:
    start = time.perf_counter()
    run(args, env=environ)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    py = sys.executable
    environ = env()
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    conf = Path(tempfile.mkdtemp(prefix="bench-dry-run-"))
    (conf / "config.yaml").write_text("a: 1\n")
    cases = {
        "default": [py, "-m", "launcher", "dry_run=true"],
        "8xH100_zero3_4_nodes_slurm": [py, "-m", "launcher", "dry_run=true", "+hw=8xH100", "strategy=zero3", "model=gpt2_small", "cluster=slurm", "cluster.nodes=4"],
        "floor_python": [py, "-c", "pass"],
        "floor_import_hydra": [py, "-c", "import hydra"],
        "floor_hydra_compose": [py, "-c", HYDRA_COMPOSE, str(conf)],
    }
    heavy = {name: run([py, "-c", CHECK, *argv[3:]], env=environ).stdout.strip().splitlines()[-1] for name, argv in cases.items() if argv[1] == "-m"}
    for argv in cases.values():
        timed(argv, environ)  # warm the page cache and __pycache__
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):  # interleaved: drift of a shared machine hits every case alike
        for name, argv in cases.items():
            times[name].append(timed(argv, environ))
    out = {name: {"median_s": round(median(ts), 3), "min_s": round(min(ts), 3)} for name, ts in times.items()}
    for name, text in heavy.items():
        out[name].update(heavy_imports=text, goal_s=0.5)
    floor = median(times["floor_hydra_compose"])
    own = {name: round(median(times[name]) - floor, 3) for name in heavy}
    record("dry_run", {"cases": out, "ringleader_over_hydra_floor_s": own, "bytecode_cache": True, "command": "python -m benchmarks.bench_dry_run"})


if __name__ == "__main__":
    main()
