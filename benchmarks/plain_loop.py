"""The hand-written baseline: the same GPT, data and optimizer as ringleader's default job, in the
plainest DDP loop. `PlainLoop.step()` runs one optimizer step (benchmarks/bench_step_time.py
interleaves it with ringleader's loop in one process); as a torchrun script it prints the wall
time at step 1 and every `--every` steps (benchmarks/bench_startup.py uses --first-step-only).

    torchrun --nproc_per_node=2 benchmarks/plain_loop.py --steps 110 --every 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from launcher.schema import DataConfig
from launcher import corpus
from trainer.data import TokenWindows
from trainer.model import GPT

GPT_TINY = {"vocab_size": 256, "block_size": 128, "n_layer": 6, "n_head": 4, "n_embd": 128}


def pystdlib_windows(seq_len: int = 128) -> TokenWindows:
    data = DataConfig(max_bytes=8_000_000)
    return TokenWindows(np.frombuffer(corpus.read_split(corpus.split_of(data, "train")), dtype=np.uint8), seq_len)


class PlainLoop:
    """AdamW (decay on matrices only), clipping at 1.0, a cosine schedule, DDP when world > 1."""

    def __init__(self, *, batch: int, total_steps: int, world: int, rank: int) -> None:
        torch.manual_seed(42)
        self.model = GPT(**GPT_TINY)
        self.ddp = DDP(self.model) if world > 1 else self.model
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), foreach=True)
        dataset = pystdlib_windows()
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=42, drop_last=True)
        self.loader = DataLoader(dataset, batch_size=batch, sampler=self.sampler, drop_last=True)
        self.batches = iter(self.loader)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    def step(self) -> torch.Tensor:
        x, y = next(self.batches)
        loss = self.ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--first-step-only", action="store_true")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    loop = PlainLoop(batch=args.batch, total_steps=args.steps, world=world, rank=rank)
    marks = {}
    for step in range(1, args.steps + 1):
        loss = loop.step()
        if step == 1 or step % args.every == 0:
            loss.item()
            marks[step] = time.time()
        if args.first_step_only:
            break
    if rank == 0:
        print("PLAIN " + json.dumps({str(k): v for k, v in marks.items()}), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
