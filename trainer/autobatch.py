"""train.auto_find_batch_size: on an out-of-memory error, retry the step with a smaller per-device
batch and proportionally more accumulation, through accelerate's find_executable_batch_size.

Unlike Hugging Face Trainer (which halves the batch and so changes the effective batch and the
schedule), the effective batch stays what the plan says: the per-device batch B is divided by its
smallest prime factor p (halved when even) and gradient_accumulation_steps multiplied by p. The
sampler's order does not depend on B (trainer/data.py), so the retried step and every later one
train on exactly the samples the plan gave them, and the token-exact loss makes the result equal,
within float rounding, to a run started with the smaller batch.

All ranks agree: each micro-batch's forward and backward run under `catch`, which keeps a
recognised out-of-memory error (accelerate's should_reduce_batch_size) instead of raising it, and
`agree` then all-reduces the flag (one small collective per micro-batch, only with this setting).
Where any rank ran out, every rank drops the step's gradients and raises the same error, which
find_executable_batch_size catches around the loop (Trainer's structure), so all ranks retry the
step from its start with the same new size. A real out-of-memory error inside a collective on one
rank only (FSDP's all-gather, DDP's bucket all-reduce) leaves the other ranks waiting in that
collective: the job then ends at train.ddp_timeout naming the rank, as for any stalled rank.

On CPU an out-of-memory error can only be injected: RINGLEADER_FAULT=oom:RANK:STEP raises
torch.OutOfMemoryError after the first micro-batch's backward of that step, once, at the configured
batch (trainer/faults.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.faults import planned

log = logging.getLogger("ringleader")


def smallest_factor(n: int) -> int:
    """The smallest prime factor of n >= 2."""
    return next(p for p in range(2, n + 1) if n % p == 0)


class BatchFinder:
    """The per-device batch and accumulation a run trains with now, and the out-of-memory protocol."""

    def __init__(self, *, batch_size: int, accumulation: int, rank: int, world_size: int, device: torch.device) -> None:
        self.start = batch_size
        self.batch_size, self.accumulation = batch_size, accumulation
        self.rank, self.world_size, self.device = rank, world_size, device  # the flag's collective runs on the default group's device
        self.out_of_memory = False  # this rank, in the current micro-batch

    def wrap(self, loop: Callable[[int], Any]) -> Callable[[], Any]:
        """`loop(batch_size)` run by accelerate's find_executable_batch_size from this size on."""
        from accelerate.utils import find_executable_batch_size

        return find_executable_batch_size(loop, starting_batch_size=self.batch_size, reduce_batch_size_fn=self.reduce)

    def reduce(self) -> int:
        """The next per-device batch (find_executable_batch_size's reduce_batch_size_fn); the
        accumulation grows by the same factor so that the effective batch does not change."""
        if self.batch_size == 1:
            raise RuntimeError(
                f"train.auto_find_batch_size: a rank ran out of memory with per-device batch 1 (gradient_accumulation_steps {self.accumulation}); "
                "nothing smaller keeps the effective batch: lower data.seq_len, turn on train.gradient_checkpointing, or use strategy=fsdp"
            )
        factor = smallest_factor(self.batch_size)
        self.batch_size, self.accumulation = self.batch_size // factor, self.accumulation * factor
        return self.batch_size

    @contextlib.contextmanager
    def catch(self) -> Iterator[None]:
        """Run one micro-batch; keep an out-of-memory error for `agree` instead of raising it."""
        from accelerate.utils.memory import should_reduce_batch_size

        try:
            yield
        except Exception as exc:  # noqa: BLE001  # only out-of-memory errors are kept, the rest re-raised
            if not should_reduce_batch_size(exc):
                raise
            log.warning("out of memory in a micro-batch of per-device batch %d: %s", self.batch_size, str(exc).splitlines()[0])
            self.out_of_memory = True

    def inject(self, step: int, micro_batch: int) -> None:
        """Tests only (RINGLEADER_FAULT=oom:RANK:STEP): an out-of-memory error after the step's first
        micro-batch, at the configured batch size (so the retry with a smaller one runs clean)."""
        if micro_batch == 0 and self.batch_size == self.start and planned("oom", step, self.rank):
            raise torch.OutOfMemoryError(f"fault injection: CPU out of memory. (RINGLEADER_FAULT oom at step {step})")

    def agree(self, step: int, discard: Callable[[], None]) -> None:
        """After each micro-batch: whether any rank ran out of memory (one all-reduce). If one did,
        every rank drops the step's gradients (`discard`) and raises the same error."""
        flags = torch.zeros(self.world_size, dtype=torch.float32, device=self.device)
        flags[self.rank] = float(self.out_of_memory)
        if dist.is_initialized():
            dist.all_reduce(flags)
        self.out_of_memory = False
        ranks = [r for r, f in enumerate(flags.tolist()) if f]
        if ranks:
            discard()
            # The words accelerate's should_reduce_batch_size looks for (" out of memory."), on every rank.
            raise torch.OutOfMemoryError(f"step {step}: rank(s) {', '.join(map(str, ranks))} ran out of memory.")
