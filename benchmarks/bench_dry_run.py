"""Dry run of the launcher: wall time of `python -m launcher dry_run=true` (goal: under 0.5 s),
and proof that it imports no torch, deepspeed or accelerate.

    python benchmarks/bench_dry_run.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import median, record, run

CHECK = (
    "import sys; from launcher.__main__ import main; rc = main(sys.argv[1:]);"
    "print('HEAVY', [m for m in ('torch', 'deepspeed', 'accelerate') if m in sys.modules]); sys.exit(rc)"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    cases = {
        "default": ["dry_run=true"],
        "8xH100_zero3_4_nodes_slurm": ["dry_run=true", "+hw=8xH100", "strategy=zero3", "model=gpt2_small", "cluster=slurm", "cluster.nodes=4"],
    }
    out = {}
    for name, overrides in cases.items():
        heavy = run([sys.executable, "-c", CHECK, *overrides]).stdout.strip().splitlines()[-1]
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            run([sys.executable, "-m", "launcher", *overrides])
            times.append(time.perf_counter() - t)
        out[name] = {"median_s": round(median(times), 3), "min_s": round(min(times), 3), "heavy_imports": heavy, "goal_s": 0.5}
    record("dry_run", {"cases": out, "command": "python benchmarks/bench_dry_run.py"})


if __name__ == "__main__":
    main()
