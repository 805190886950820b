"""train.auto_find_batch_size (issue 15 item 5): after an out-of-memory error every rank retries the
step with half the per-device batch and twice the accumulation, so the effective batch, the samples
of each step and the schedule stay the plan's, and the run ends as one started with the smaller
batch would (trainer/autobatch.py).

On CPU an out-of-memory error can only be injected: RINGLEADER_FAULT=oom:1:2 raises
torch.OutOfMemoryError on rank 1 only, in step 2 (trainer/faults.py); rank 0 learns of it through
the all-reduced flag."""

from __future__ import annotations

import pytest

from tests.conftest import SLOW_VARIANT, launcher_env, run_launcher, share
from tests.test_train_fields import BASE, eval_losses, losses, rank_log


def job(strategy: str) -> list[str]:
    """BASE started with per-device batch 4 x accumulation 2, the batch found automatically."""
    return [*BASE, f"strategy={strategy}", "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2", "train.auto_find_batch_size=true"]


OOM = launcher_env(RINGLEADER_FAULT="oom:1:2")
DDP = share("autobatch_ddp", *job("ddp"), env=OOM)  # made once, beside BASE's run (tests/conftest.py)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=SLOW_VARIANT)])
def test_an_out_of_memory_step_is_retried_with_half_the_batch_and_the_same_samples(strategy, shared_runs, tmp_path):
    base = shared_runs["base"]  # ddp, per-device batch 2 x accumulation 4 from the start (the loss is token-exact across strategies)
    run = shared_runs[DDP] if strategy == "ddp" else run_launcher(tmp_path / "run", *job(strategy), env=OOM)
    assert run.result()["status"] == "completed" and run.result()["global_step"] == 4
    # The same samples in every step, token-exact loss: the same losses within float rounding
    # (step 1 ran with 4 x 2, the rest with 2 x 4), and the same evaluation at the end.
    assert losses(run) == pytest.approx(losses(base), rel=1e-5)
    assert eval_losses(run) == pytest.approx(eval_losses(base), rel=1e-5)
    events = [m for m in run.metrics() if m.get("event") == "auto_find_batch_size"]
    assert events == [{**events[0], "step": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "effective_batch_size": 16}]
    for rank in (0, 1):  # both ranks retried, and say so
        assert "step 2: out of memory with per-device batch 4 x accumulation 2; retrying it with 2 x 4 (effective batch 16 unchanged)" in rank_log(run, rank)
    assert "out of memory in a micro-batch" in rank_log(run, 1) and "out of memory in a micro-batch" not in rank_log(run, 0)


def test_the_batch_divides_by_its_smallest_factor_down_to_one():
    import torch

    from trainer.autobatch import BatchFinder

    finder = BatchFinder(batch_size=6, accumulation=1, rank=0, world_size=1, device=torch.device("cpu"))
    assert [finder.reduce(), finder.accumulation] == [3, 2]
    assert [finder.reduce(), finder.accumulation] == [1, 6]
    with pytest.raises(RuntimeError, match="per-device batch 1"):
        finder.reduce()
