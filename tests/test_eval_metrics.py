"""Evaluation metrics beyond the loss (issue 15 item 8) and the flow fields around them, in real
2-rank runs: eval_perplexity, eval_accuracy and a user's train.compute_metrics summed over ranks;
metric_for_best_model=accuracy with save_strategy=best; eval_delay and ratio intervals as the plan
resolved them; label smoothing in the training loss; num_input_tokens_seen across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import SLOW_VARIANT, TINY, Run, launcher_env, run_launcher, share_call

EVAL = [
    "train.max_steps=8", "train.logging_steps=0.25", "train.logging_first_step=false",
    "train.eval_strategy=steps", "train.eval_steps=0.25", "train.eval_delay=3", "train.eval_max_batches=2", "train.eval_on_start=false",
    "train.save_strategy=best", "train.metric_for_best_model=accuracy", "train.compute_metrics=tests.metric_code.token_accuracy",
    "train.label_smoothing_factor=0.1", "train.include_num_input_tokens_seen=non_padding", "train.report_to=[]",
]


def last_per_step(records: list[dict], key: str) -> dict[int, dict]:
    """The last record with `key` of each step (a resumed run repeats the steps after its checkpoint)."""
    return {m["step"]: m for m in records if key in m}


def killed_then_rerun(run_dir: Path, strategy: str) -> tuple[Run, Run]:
    """Rank 0 dies after step 7 (as a lost node); the rerun resumes from the last checkpoint best saved."""
    job = [*TINY, f"strategy={strategy}", *EVAL]
    killed = run_launcher(run_dir, *job, env=launcher_env(RINGLEADER_FAULT="step:0:7"), check=False)
    return killed, run_launcher(run_dir, *job)


DDP = share_call("eval_metrics_ddp", lambda folder: killed_then_rerun(folder / "run", "ddp"))  # made once, beside the session's other shared runs (tests/conftest.py)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=SLOW_VARIANT)])
def test_metrics_best_saves_delay_and_tokens_seen_across_a_resume(strategy, shared_runs, tmp_path):
    killed, run = shared_runs[DDP] if strategy == "ddp" else killed_then_rerun(tmp_path / "run", strategy)
    assert killed.proc.returncode != 0
    run_dir = run.run_dir
    assert run.result()["status"] == "completed" and run.result()["global_step"] == 8
    plan = run.plan()
    assert (plan["logging_steps"], plan["eval_steps"]) == (2, 2)  # ratios of 8 steps, resolved once

    records = run.metrics()
    evals = last_per_step(records, "eval_loss")
    assert sorted(evals) == [4, 6, 8]  # every 2 steps, none before eval_delay=3
    best, improved = -math.inf, []
    for step, m in sorted(evals.items()):
        assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
        assert 0 < m["eval_accuracy"] < 1
        # The user's metric, summed as (numerator, denominator) over batches and ranks, is the same ratio.
        assert m["eval_token_acc"] == pytest.approx(m["eval_accuracy"], rel=1e-12)
        assert m["eval_labelled_tokens"] == 2 * 2 * 8 * 32  # ranks x eval_max_batches x eval batch x seq_len
        if m["eval_accuracy"] > best:
            best, improved = m["eval_accuracy"], [*improved, step]
    # save_strategy=best: a checkpoint exactly where accuracy (greater is better) improved.
    assert sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")) == improved

    train = last_per_step(records, "loss")
    assert sorted(train) == [2, 4, 6, 8]  # logging_steps 0.25 of 8; logging_first_step off
    # Non-padding input tokens over both ranks, cumulative across the kill and the resume.
    assert [train[s]["num_input_tokens_seen"] for s in (2, 4, 6, 8)] == [s * 2 * 4 * 32 for s in (2, 4, 6, 8)]
    assert any(m.get("event") == "resume" for m in records)


def test_label_smoothing_reaches_the_training_loss_not_the_evaluation():
    """Through the strategy, as the loop calls it: training's summed loss is smoothed (Trainer's
    LabelSmoother); evaluation reports plain cross-entropy (so eval_perplexity stays exp of it)."""
    from launcher.schema import RunConfig
    from trainer.build import build_model
    from trainer.model_io import EvalStatistics, summed_cross_entropy
    from trainer.strategies import build_strategy

    cfg = RunConfig()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size = 1, 16, 2, 8
    cfg.train.label_smoothing_factor = 0.2
    torch.manual_seed(0)
    strategy = build_strategy("ddp", cfg=cfg, device=torch.device("cpu"))
    strategy.setup(build_model(cfg.model), total_steps=10, warmup_steps=0)
    ids = torch.randint(0, 256, (2, 8))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
    strategy.train()
    loss, count = strategy.loss(batch)
    with torch.no_grad():
        logits = strategy.model(ids)
    assert torch.allclose(loss, summed_cross_entropy(logits, batch["labels"], label_smoothing=0.2))
    strategy.eval()
    stats = EvalStatistics(with_logits=True)
    with torch.no_grad():
        strategy.evaluate_batch(stats, batch)
    plain = float(summed_cross_entropy(logits, batch["labels"])) / int(count)
    assert stats.metrics(lambda names, values: values)["eval_loss"] == pytest.approx(plain, rel=1e-6)
    assert abs(plain - float(loss.detach()) / int(count)) > 1e-3
