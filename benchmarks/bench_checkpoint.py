"""Checkpoint save and load against the disk's own speed, interleaved in one run. Goals:
write throughput of a synchronous save over a raw sequential write of the same bytes to the same
disk with fsync: at least 0.7; the time an asynchronous save blocks training over a synchronous
save: at most 0.1; load time over save time: at most 1.5.

The real CheckpointManager and DDP strategy, in one process (world size 1: no process group is
needed; with more ranks each writes its share in parallel). The state is a GPT's parameters and
AdamW's two moments, >= 200 MB. A save counts everything up to a checkpoint that survives a crash:
DCP's shards, RNG, loop state, fsync of every file, the CRC32 manifest, the marker, the renames.
A load verifies every file against the marker, then reads the shards into model and optimizer; it
runs right after a save, from the page cache, as a resume after a crash usually does.

    python benchmarks/bench_checkpoint.py [--layers 6] [--width 512] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median, record  # noqa: E402


def build(layers: int, width: int):
    import torch

    from launcher.schema import RunConfig
    from trainer.build import build_model
    from trainer.strategies import build_strategy

    cfg = RunConfig()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size = layers, width, 8, 64
    torch.manual_seed(0)
    strategy = build_strategy("ddp", cfg=cfg, device=torch.device("cpu"))
    strategy.setup(build_model(cfg.model), total_steps=100, warmup_steps=0)
    ids = torch.randint(0, 256, (2, 64))
    strategy.backward(strategy.forward(ids, ids))
    strategy.step()  # the optimizer's moments exist from here on
    return strategy


def raw_write(path: Path, data: memoryview) -> float:
    """One sequential write of `data`, in 64 MB chunks, then fsync: the disk's own pace."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(0, len(data), 1 << 26):
            f.write(data[i : i + (1 << 26)])
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder in /tmp)")
    args = p.parse_args()

    import torch

    from trainer.checkpoint import CheckpointManager
    from trainer.loop import LoopState

    strategy = build(args.layers, args.width)
    state_bytes = sum(t.numel() * t.element_size() for t in strategy.model.parameters())
    state_bytes += sum(v.numel() * v.element_size() for s in strategy.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    tmp = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        checkpoints = CheckpointManager(tmp / "checkpoints", rank=0, world_size=1, device=torch.device("cpu"), save_total_limit=0, config_hash="bench")
        loop = dataclasses.asdict(LoopState(step=1))
        checkpoints.save(0, strategy, loop)  # warm-up: imports, first-touch allocations
        size = checkpoint_bytes(tmp / "checkpoints" / "step-0")
        shutil.rmtree(tmp / "checkpoints" / "step-0")
        data = memoryview(os.urandom(size))

        raw, sync, blocked, async_total, load = [], [], [], [], []
        for i in range(args.repeat):  # interleaved: drift of a shared machine hits all alike
            raw.append(raw_write(tmp / "raw.bin", data))

            start = time.perf_counter()
            checkpoints.save(2 * i + 1, strategy, loop)
            sync.append(time.perf_counter() - start)

            start = time.perf_counter()
            path, _ = checkpoints.restore(str(tmp / "checkpoints" / f"step-{2 * i + 1}"), strategy)
            load.append(time.perf_counter() - start)

            start = time.perf_counter()
            checkpoints.save(2 * i + 2, strategy, loop, asynchronous=True)
            blocked.append(time.perf_counter() - start)
            checkpoints.wait()
            async_total.append(time.perf_counter() - start)
            for step in (2 * i + 1, 2 * i + 2):
                shutil.rmtree(tmp / "checkpoints" / f"step-{step}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = {
        "state_mb": round(state_bytes / 1e6, 1),
        "checkpoint_mb": round(size / 1e6, 1),
        "raw_write_s": round(median(raw), 4),
        "sync_save_s": round(median(sync), 4),
        "async_save_blocking_s": round(median(blocked), 4),
        "async_save_total_s": round(median(async_total), 4),
        "load_s": round(median(load), 4),
        "raw_write_mb_per_s": round(size / median(raw) / 1e6, 1),
        "save_mb_per_s": round(size / median(sync) / 1e6, 1),
        "ratios": {
            "save_throughput_over_raw_write": {"value": round(median(raw) / median(sync), 4), "goal": ">= 0.7"},
            "async_blocking_over_sync_save": {"value": round(median(blocked) / median(sync), 4), "goal": "<= 0.1"},
            "load_over_save": {"value": round(median(load) / median(sync), 4), "goal": "<= 1.5"},
        },
        "samples": {"raw_write_s": raw, "sync_save_s": sync, "async_blocking_s": blocked, "load_s": load},
        "model": f"GPT n_layer={args.layers} n_embd={args.width}, AdamW, DDP strategy, world size 1",
        "command": "python benchmarks/bench_checkpoint.py",
    }
    record("checkpoint", results)


if __name__ == "__main__":
    main()
