"""What the plan and the log lines say about steps, on a user's own dataset (`data._target_`,
without data.num_samples): the plan says its counts are known on the ranks (not 0), its validation
split is evaluated, and each log line's tokens_per_s counts the tokens its step had, the last,
smaller step of an epoch included. One real run, 1 rank (so step_time_s is that rank's own time).
"""

from __future__ import annotations

from tests.conftest import TINY, run_launcher

SEQ = 16
# tests/user_code.py masked_prompts: 64 training samples, 16 validation. 12 a step: 6 steps an
# epoch, the last of 4 samples (64 = 5 x 12 + 4).
JOB = [
    *TINY, "data._target_=tests.user_code.masked_prompts", f"data.seq_len={SEQ}", "cluster.nproc_per_node=1", "train.per_device_train_batch_size=12",
    "train.max_steps=6", "train.eval_strategy=steps", "train.eval_steps=6", "train.eval_max_batches=0", "train.report_to=[]",
]


def test_a_custom_datasets_counts_come_from_the_ranks_and_each_step_logs_its_own_tokens(tmp_path):
    run = run_launcher(tmp_path / "run", *JOB)
    samples = next(line for line in run.proc.stdout.splitlines() if line.strip().startswith("samples"))
    assert "known on the ranks" in samples and "0 train" not in samples, samples
    steps = next(line for line in run.proc.stdout.splitlines() if line.strip().startswith("steps"))
    assert "per epoch known on the ranks, 6 total" in steps, steps
    evals = [m for m in run.metrics() if "eval_loss" in m]
    assert [(e["step"], e["eval_samples"]) for e in evals] == [(0, 16), (6, 16)]  # the whole validation split (eval_on_start too)
    logged = [m for m in run.metrics() if "loss" in m]
    # tokens_per_s x the step's time: the input tokens of the step (SEQ per sample), not the plan's 12 x SEQ.
    assert [round(m["tokens_per_s"] * m["step_time_s"] / SEQ) for m in logged] == [12, 12, 12, 12, 12, 4], logged
