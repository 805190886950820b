"""Gradient checkpointing on gpt_small (goals: activation memory at most half, step time at most
1.4x), and the step time of each sharded strategy over DDP at world size 2 on CPU (reported).

Activation memory: bytes glibc's malloc holds after the forward (the loss computed, backward not
yet run) minus before it: what the autograd graph keeps for backward. The peak during backward
(one block recomputed at a time, plus gradients) is reported too. Step times: medians over
interleaved repeats; the machine may be shared, so they are noisy (the load average is recorded).

    python -m benchmarks.bench_grad_ckpt [--repeat 5] [--skip-strategies]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_memory import malloc_in_use
from benchmarks.common import record, run


def checkpointing(repeat: int) -> dict:
    import threading

    import torch

    from launcher.compose import compose
    from trainer.build import build_model

    torch.set_num_threads(1)
    cfg = compose(["model=gpt_small", "train.output_dir=/unused"]).config
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.block_size))
    out: dict[str, dict] = {}
    times: dict[bool, list[float]] = {False: [], True: []}

    def one_step(ckpt: bool, measure: bool) -> dict:
        model.gradient_checkpointing = ckpt
        before = malloc_in_use()
        peak = [0]
        stop = threading.Event()

        def sample() -> None:  # the peak during backward, sampled every millisecond
            while not stop.is_set():
                peak[0] = max(peak[0], malloc_in_use() - before)
                time.sleep(0.001)

        t0 = time.perf_counter()
        loss = model(x, x)
        saved = malloc_in_use() - before
        sampler = threading.Thread(target=sample) if measure else None
        if sampler:
            sampler.start()
        loss.backward()
        stop.set()
        if sampler:
            sampler.join()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"time": time.perf_counter() - t0, "saved": saved, "peak": peak[0]}

    for ckpt in (False, True):  # warm-up, and optimizer states allocated
        one_step(ckpt, False)
    for _ in range(repeat):
        for ckpt in (False, True):
            r = one_step(ckpt, False)
            times[ckpt].append(r["time"])
    for ckpt in (False, True):
        r = one_step(ckpt, True)
        out["checkpointed" if ckpt else "plain"] = {"activation_bytes": r["saved"], "peak_during_backward_bytes": r["peak"], "step_time_s": statistics.median(times[ckpt])}
    plain, ckpt = out["plain"], out["checkpointed"]
    return {
        "model": "gpt_small", "batch": list(x.shape), "precision": "fp32", "threads": 1,
        **out,
        "activation_ratio": round(ckpt["activation_bytes"] / plain["activation_bytes"], 3),
        "step_time_ratio": round(ckpt["step_time_s"] / plain["step_time_s"], 3),
        "goals": {"activation_ratio_at_most": 0.5, "step_time_ratio_at_most": 1.4},
    }


def strategy_step_time(strategy: str, out: Path) -> float:
    run([
        sys.executable, "-m", "launcher", f"strategy={strategy}", "train.max_steps=40", "train.logging_steps=10", "train.logging_first_step=false",
        "train.eval_strategy=no", "train.save_strategy=no", "train.export_final=false", "train.report_to=[]", f"train.output_dir={out}",
    ], timeout=900)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [e["step_time_s"] for e in events if "step_time_s" in e and e["step"] > 10]  # the first window holds warm-up
    return statistics.median(windows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-strategies", action="store_true")
    args = p.parse_args()
    result: dict = {"gradient_checkpointing": checkpointing(args.repeat)}
    if not args.skip_strategies:
        times = {}
        with tempfile.TemporaryDirectory() as tmp:
            for s in ("ddp", "fsdp", "zero1", "zero2", "zero3"):
                times[s] = strategy_step_time(s, Path(tmp) / s)
        result["strategies_world_size_2"] = {
            "model": "gpt_tiny", "data": "pystdlib", "batch": "16 per rank", "precision": "fp32", "device": "cpu, gloo",
            "step_time_s": times,
            "over_ddp": {s: round(t / times["ddp"], 3) for s, t in times.items()},
        }
    result["note"] = "the machine is shared with other jobs: step times are noisy (see load_average_at_end)"
    record("grad_ckpt", result)


if __name__ == "__main__":
    main()
