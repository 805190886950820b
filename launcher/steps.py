"""How an epoch's samples fall into optimizer steps and micro-batches: the one rule the planner
counts steps with and the ranks' sampler and loop follow (no torch: the launcher uses it).

As Hugging Face Trainer (transformers 5) runs an epoch: micro-batches of `per_device x world`
samples, `accumulation` of them an optimizer step; the last micro-batch of an epoch may be smaller
and the last step may have fewer micro-batches (Trainer's partial accumulation step), unless
`dataloader_drop_last` drops the last incomplete micro-batch (the step count is then Trainer's
with its drop_last, and the last step may still be a partial accumulation step). So an epoch of N
samples has ceil(N / effective batch) steps, or ceil((N // micro) * micro / effective) with
drop_last: tests/test_trainer_parity.py checks them against Trainer itself.

Unlike Trainer under several processes (accelerate's even_batches repeats samples from the start
of the epoch to give every rank a full last batch), the samples of a step never depend on the
world size: one global order per epoch, cut into steps of `effective` samples from the epoch's
start (or the resumed position); a step's micro-batch k holds the next `micro` of them, and rank r
takes every world-th one from r. In a last, smaller micro-batch a rank may get fewer samples than
the others, or none (trainer/data.py gives it a filler row that carries no label, so it still
joins every collective and adds nothing to the loss).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class StepLayout:
    samples: int  # an epoch's training samples
    micro_batch: int  # samples of one micro-batch over all ranks: per-device batch x world size
    accumulation: int  # micro-batches of a whole optimizer step
    drop_last: bool = False  # drop the last incomplete micro-batch (Trainer's dataloader_drop_last)

    @property
    def effective(self) -> int:
        """Samples of a whole optimizer step, over all ranks."""
        return self.micro_batch * self.accumulation

    @property
    def smallest(self) -> int:
        """The fewest samples a step may train on: one, or one whole micro-batch with drop_last.
        The effective batch is a multiple of it, so the steps of an epoch end where it says."""
        return self.micro_batch if self.drop_last else 1

    @property
    def kept(self) -> int:
        """Samples an epoch trains on from its start."""
        return self.samples // self.smallest * self.smallest

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.kept // self.effective)

    def step_samples(self, consumed: int) -> int:
        """Samples of the step that starts at position `consumed` of the epoch; 0: the epoch is over.
        A resume with another effective batch can start anywhere: the steps are cut from there."""
        left = max(0, self.samples - consumed) // self.smallest * self.smallest
        return min(self.effective, left)

    def micro_batches(self, consumed: int) -> int:
        """Micro-batches of the step at `consumed`, the same number on every rank."""
        return -(-self.step_samples(consumed) // self.micro_batch)

    def epoch_ends(self, consumed: int) -> bool:
        return self.step_samples(consumed) == 0
