"""What the loop must never do, whatever the user changes between runs or sends it: spin on an empty
epoch, repeat a micro-batch, load a best model that has no checkpoint, or lose the stop checkpoint
to a long evaluation."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import pytest

from tests.checkpoint_tools import assert_same_tensors, checkpoint_steps, log_of, read_dcp
from tests.conftest import ROOT, TINY, Run, launcher_env, run_launcher, side_by_side


def test_a_position_past_the_last_whole_step_starts_the_next_epoch():
    """A checkpoint of 1 rank x 2 x 2 accumulation (4 samples a step) at 144 of 148 samples, resumed
    on 2 ranks (8 a step, 144 usable): no whole step is left in that epoch."""
    from trainer.data import ResumableSampler, start_position

    assert start_position(0, 144, step_samples=8, usable=144) == (1, 0)
    assert start_position(0, 144, step_samples=8, usable=148) == (1, 0)  # 4 left: no whole step
    assert start_position(0, 140, step_samples=8, usable=148) == (0, 140)  # 8 left: one more step
    assert start_position(0, 132, step_samples=8, usable=148) == (0, 132)
    # From 136, one whole step of 8 is left (136..144) and a tail of 4: each rank gets exactly its
    # 4, never a short last micro-batch that would run the loader dry inside a step.
    for rank in (0, 1):
        sampler = ResumableSampler(148, usable=148, epoch=0, consumed=136, rank=rank, world_size=2, seed=0, step_samples=8)
        assert len(sampler) == len(list(sampler)) == 4


def test_an_epoch_with_nothing_left_raises_instead_of_spinning():
    from trainer.data import SyntheticTokens, train_batches

    data = SyntheticTokens(148, 8, 256, seed=0)
    state = SimpleNamespace(epoch=0, consumed=148)
    batches = train_batches(data, state, usable=148, step_samples=8, batch_size=2, rank=0, world_size=2, seed=0, num_workers=0, pin_memory=False)
    with pytest.raises(RuntimeError, match="no training samples left at epoch 0, position 148"):
        next(batches)


# 148 training samples of 32 tokens; 2 per device x 2 accumulation.
GROWS = [*TINY, "data.max_bytes=5000", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=45", "train.save_strategy=steps", "train.save_steps=12", "train.report_to=[]"]
BEST_WITHOUT_CHECKPOINT = [
    *TINY, "train.eval_strategy=steps", "train.eval_steps=2", "train.save_strategy=steps", "train.save_steps=4", "train.save_total_limit=1",
    "train.load_best_model_at_end=true", "train.greater_is_better=true", "optimizer.learning_rate=3e-3", "train.report_to=[]",
]
FRESH_START = [*TINY, "train.max_steps=12", "train.save_strategy=steps", "train.save_steps=4", "train.resume=none", "cluster.max_restarts=1", "train.report_to=[]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The runs that need no timing, side by side (tests/conftest.py), named after their tests;
    the SIGTERM test runs alone. test_resume_on_more_ranks resumes its own run afterwards."""
    root = tmp_path_factory.mktemp("loop_holes")
    return side_by_side(
        more_ranks=partial(run_launcher, root / "more_ranks", *GROWS, "cluster.nproc_per_node=1", env=launcher_env(RINGLEADER_FAULT="step:0:37"), check=False),
        best=partial(run_launcher, root / "best", *BEST_WITHOUT_CHECKPOINT),
        fresh_start=partial(run_launcher, root / "fresh_start", *FRESH_START, env=launcher_env(RINGLEADER_FAULT="step:1:10")),
    )


@pytest.mark.slow
def test_resume_on_more_ranks_past_the_epoch_end_goes_on_to_the_next_epoch(runs):
    """1 rank saves step 36 at sample 144 of 148 and dies; the rerun on 2 ranks steps 8 samples at a
    time and plans 144 usable samples an epoch. Before, the sampler yielded nothing and every rank
    spun forever; now the run goes on from epoch 1 and ends."""
    first = runs["more_ranks"]  # GROWS on 1 rank, killed at step 37
    run_dir = first.run_dir
    assert first.code != 0 and checkpoint_steps(run_dir)[-1] == 36
    saved = json.loads((run_dir / "checkpoints" / "step-36" / "trainer_state.json").read_text())["loop"]
    assert (saved["epoch"], saved["consumed"]) == (0, 144)
    resumed = run_launcher(run_dir, *GROWS, "cluster.nproc_per_node=2", "train.resume_with_changed_config=true", timeout=240)  # a larger effective batch: opted in
    assert resumed.result()["status"] == "completed" and resumed.result()["global_step"] == 45
    # The 4 samples left of epoch 0 are its last, partial step (Trainer's count, issue 15 item 1): step 37 ends the epoch.
    assert [m["epoch"] for m in resumed.metrics() if m.get("step") == 37 and "loss" in m] == [1.0]


def test_load_best_model_at_end_loads_the_best_evaluation_that_has_a_checkpoint(runs):
    """Evaluations at 2, 4, 6, 8, checkpoints at 4 and 8. greater_is_better makes the highest
    eval_loss the best: step 2's, which has no checkpoint. Before, the run failed at its very end
    looking for step-2; now the best with a checkpoint (step 4) is loaded and kept by retention."""
    run = runs["best"]  # BEST_WITHOUT_CHECKPOINT
    run_dir = run.run_dir
    evals = {e["step"]: e["eval_loss"] for e in run.metrics() if "eval_loss" in e and e["step"] > 0}  # step 0: the baseline, never tracked
    assert max(evals, key=evals.get) == 2, evals  # the best evaluation has no checkpoint
    assert "loaded the best model (step 4," in log_of(run_dir)
    assert checkpoint_steps(run_dir) == [4, 8]
    best = {k.removeprefix("/model/"): v for k, v in read_dcp(run_dir / "checkpoints" / "step-4" / "dcp").items() if k.startswith("/model/")}
    assert_same_tensors(run.weights(), best)


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_still_writes_the_stop_checkpoint(tmp_path):
    """Every evaluation batch after step 4 takes 2 s on rank 0 (20 batches: 40 s). SIGTERM comes in
    the middle: the ranks leave the evaluation together at the next batch and save step 4. Before,
    the watchdog ended the rank 5 s after the signal, with no checkpoint."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "launcher", *TINY, "train.max_steps=20", "train.eval_strategy=steps", "train.eval_steps=4", "train.eval_max_batches=20",
            "train.per_device_eval_batch_size=1", "data.validation_fraction=0.2", "train.save_strategy=no", "train.report_to=[]", f"train.output_dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=launcher_env(RINGLEADER_FAULT="eval:0:4:delay"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank0 = run_dir / "logs" / "rank-0.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (rank0.exists() and rank0.read_text().count("fault injection") >= 3):
        time.sleep(0.2)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert time.time() - signalled < 25, "the evaluation ran on"
    assert proc.returncode == 128 + signal.SIGTERM, out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped" and result["global_step"] == 4, result
    assert "evaluation at step 4 interrupted by a stop request" in log_of(run_dir)
    assert checkpoint_steps(run_dir) == [4]
    assert "stalled" not in log_of(run_dir) + log_of(run_dir, 1)


def test_an_elastic_restart_of_a_fresh_start_continues_its_own_progress(runs):
    """train.resume=none asks for a fresh start, once: when rank 1 dies at step 10 and torchrun
    restarts the workers, they resume from this run's step-8, not from scratch."""
    run = runs["fresh_start"]  # FRESH_START, rank 1 killed at step 10
    run_dir = run.run_dir
    assert run.result()["status"] == "completed" and run.result()["global_step"] == 12
    assert f"resumed from {run_dir / 'checkpoints' / 'step-8'} at step 8" in log_of(run_dir)
