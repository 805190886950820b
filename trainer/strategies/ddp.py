"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from trainer.strategies.native import NativeStrategy


class DDPStrategy(NativeStrategy):
    def wrap(self, model: nn.Module) -> nn.Module:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self.ddp = None
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradient_as_bucket_view: .grad are views into the all-reduce buckets instead of a second
        # copy of every gradient (4 bytes/parameter less; benchmarks/bench_memory.py).
        self.ddp = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.cfg.strategy.find_unused_parameters, gradient_as_bucket_view=True)
        return self.ddp

    def set_gradient_sync(self, sync: bool) -> None:
        # As nanoGPT: flipping require_backward_grad_sync before the forward skips the all-reduce
        # of non-final micro-batches, where no_sync() would need forward and backward inside it.
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = sync
