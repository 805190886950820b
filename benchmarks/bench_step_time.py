"""Step time of ringleader's loop over a hand-written PyTorch loop (benchmarks/plain_loop.py) on
the same model (gpt_tiny), data (pystdlib) and optimizer (AdamW, clipping, cosine), at 1 and 2
ranks, interleaved in one run. Goal: at most 1.03.

    python benchmarks/bench_step_time.py [--steps 40] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, median, record, run


def ours(nproc: int, steps: int, first: int, out: Path) -> float:
    run([
        sys.executable, "-m", "launcher", f"cluster.nproc_per_node={nproc}", f"train.max_steps={steps}", f"train.logging_steps={first}",
        "train.logging_first_step=false", "train.eval_strategy=no", "train.save_strategy=no", "train.export_final=false",
        "train.report_to=[]", f"train.output_dir={out}",
    ])
    events = {e["step"]: e["time"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e}
    return (events[steps] - events[first]) / (steps - first)


def plain(nproc: int, steps: int, first: int) -> float:
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "benchmarks" / "plain_loop.py"), "--steps", str(steps), "--from-step", str(first)])
    marks = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PLAIN "))[6:])
    return (marks[str(steps)] - marks[str(first)]) / (steps - first)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--from-step", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            a, b = [], []
            for i in range(args.repeat):  # interleaved, so drift of the machine hits both alike
                a.append(ours(nproc, args.steps, args.from_step, Path(tmp) / f"r{nproc}-{i}"))
                b.append(plain(nproc, args.steps, args.from_step))
            results[f"{nproc}_rank"] = {
                "ringleader_step_s": round(median(a), 5), "plain_step_s": round(median(b), 5),
                "ratio": round(median(a) / median(b), 4), "goal": 1.03, "samples_ours": [round(x, 5) for x in a], "samples_plain": [round(x, 5) for x in b],
            }
    record("step_time", {"results": results, "command": "python benchmarks/bench_step_time.py"})


if __name__ == "__main__":
    main()
