"""Launcher start to the end of the first optimizer step, over bare torchrun of a minimal script
(benchmarks/plain_loop.py --first-step-only: same model and data, one step). 2 ranks, interleaved.
Goal: at most 1.2.

    python benchmarks/bench_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, median, record, run


def ours(out: Path) -> float:
    start = time.time()
    run([sys.executable, "-m", "launcher", "train.max_steps=1", "train.eval_strategy=no", "train.save_strategy=no", "train.export_final=false", f"train.output_dir={out}"])
    first = next(e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e.get("step") == 1 and "loss" in e)
    return first["time"] - start


def bare() -> float:
    start = time.time()
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "benchmarks" / "plain_loop.py"), "--first-step-only"])
    marks = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PLAIN "))[6:])
    return marks["1"] - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    a, b = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            a.append(ours(Path(tmp) / f"r{i}"))
            b.append(bare())
    record("startup", {
        "ringleader_s": round(median(a), 3), "bare_torchrun_s": round(median(b), 3), "ratio": round(median(a) / median(b), 3), "goal": 1.2,
        "samples_ours": [round(x, 3) for x in a], "samples_bare": [round(x, 3) for x in b], "command": "python benchmarks/bench_startup.py",
    })


if __name__ == "__main__":
    main()
