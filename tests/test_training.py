"""Real torchrun jobs on gloo through `python -m launcher`, read back from the run directory."""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.checkpoint_tools import log_of
from tests.conftest import ONE_RANK, SLOW_VARIANT, TINY, Run, interrupt_after, launcher_env, run_launcher, side_by_side


def rel_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        scale = max(a[k].double().abs().max().item(), 1e-12)
        assert diff / scale <= tol, f"{k}: relative difference {diff / scale:.3g} > {tol}"


# The jobs of this file's tests, each under its test below; `runs` starts them side by side.
SCHEDULE = ["train.max_steps=12", "scheduler.warmup_steps=0", "scheduler.warmup_ratio=0.25", "optimizer.learning_rate=0.01", "cluster.nproc_per_node=1", "train.report_to=[]"]
EPOCHS = [
    *TINY, "train.max_steps=-1", "train.num_train_epochs=2", "data.max_bytes=60000", "cluster.nproc_per_node=1", "train.report_to=[]",
    "train.eval_strategy=steps", "train.eval_steps=2", "train.early_stopping_patience=2", "train.early_stopping_threshold=100",
]
BF16 = [*TINY, "train.bf16=true", "train.max_steps=12", "optimizer.learning_rate=3e-3", "cluster.nproc_per_node=1", "train.report_to=[]"]
BOOM = [*TINY, "optimizer=sgd", "optimizer.learning_rate=1e12", "optimizer.momentum=0", "train.max_grad_norm=0", "train.max_steps=6", "train.report_to=[]"]
OVERFLOW = [*TINY, "train.max_steps=5", "train.nonfinite=skip", "scheduler=linear", "train.report_to=[]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The runs this file's tests only read, made once, side by side (tests/conftest.py). The
    default schedule's run is here; the slower variants and test_ctrl_c (a signal) run their own."""
    root = tmp_path_factory.mktemp("training")
    return side_by_side(
        cosine=partial(run_launcher, root / "cosine", *TINY, "scheduler=cosine", *SCHEDULE),
        epochs=partial(run_launcher, root / "epochs", *EPOCHS),
        checkpointing=partial(run_launcher, root / "checkpointing", *ONE_RANK, "train.gradient_checkpointing=true"),
        bf16=partial(run_launcher, root / "bf16", *BF16),
        nonfinite_error=partial(run_launcher, root / "error", *BOOM, check=False),
        nonfinite_skip=partial(run_launcher, root / "skip", *BOOM, "train.nonfinite=skip", "scheduler=linear"),
        overflow=partial(run_launcher, root / "overflow", *OVERFLOW, env=launcher_env(RINGLEADER_FAULT="overflow:1:3")),
        user_code=partial(
            run_launcher, root / "user_code", "--config-dir", str(user_config_dir(root / "conf")), "model=bigram", "data=counting", *TINY[5:],
            "train.max_steps=20", "optimizer.learning_rate=0.05", "train.report_to=[]",
        ),
        text_files=partial(
            run_launcher, root / "text_files", *TINY, "data=text_files", f"data.paths=[{text_corpus(root / 'corpus')}/*.txt]", "data.seq_len=32", "data.max_bytes=0",
            "train.max_steps=10", "cluster.nproc_per_node=1", "train.report_to=[]",
        ),
    )


def test_job_trains_and_fills_the_run_directory(shared_runs):
    run = shared_runs["trains"]  # tests/conftest.py TRAINS: 30 steps, evaluations at 15 and 30
    d = run.run_dir
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "result.json", "logs/rank-0.log", "logs/rank-1.log", "final/model.safetensors", "final/config.yaml"):
        assert (d / name).is_file(), name
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    result = run.result()
    assert result["status"] == "completed" and result["global_step"] == 30
    train = [m for m in run.metrics() if "loss" in m]
    evals = [m for m in run.metrics() if "eval_loss" in m]
    assert [m["step"] for m in train] == [1, 5, 10, 15, 20, 25, 30]
    assert [m["step"] for m in evals] == [0, 15, 30]  # the default config evaluates on start: a baseline
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # from ~ln(256)=5.5 nats per byte, down
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert result["metrics"]["eval_loss"] == evals[-1]["eval_loss"]
    for key in ("learning_rate", "grad_norm", "tokens_per_s", "epoch", "step_time_s", "slowest_rank"):
        assert key in train[-1]
    assert "[rank 1]" in (d / "logs" / "rank-1.log").read_text()
    assert "[rank 1]" not in run.proc.stdout and "rank 1/2" not in run.proc.stdout  # only rank 0 on the console
    assert "ringleader plan" in run.proc.stdout and "completed after 30 steps" in run.proc.stdout


# SGD: 1e-6. AdamW divides by sqrt(v): on parameters whose gradients are near zero (biases) it
# turns the last-bit differences of another summation order into ~1e-5 relative ones.
# SGD is linear in the gradient, so it checks the equivalence to 1e-6; AdamW is the variant.
OPTIMIZERS = [
    pytest.param(["optimizer=sgd", "optimizer.learning_rate=0.5"], 1e-6, id="sgd"),
    pytest.param(["optimizer=adamw"], 1e-4, id="adamw", marks=SLOW_VARIANT),
]


# Slow variant: tests/test_loss.py runs 2 ranks x accumulation against one process on the whole batch
# on every strategy (token-exact), and tests/test_trainer_parity.py a 2-rank run against one process.
@SLOW_VARIANT
@pytest.mark.parametrize(("optimizer", "tol"), OPTIMIZERS)
def test_two_ranks_equal_one_rank_with_double_batch(optimizer, tol, tmp_path):
    """DDP: 2 ranks with batch B end with the weights of 1 rank with batch 2B (fp32, CPU)."""
    two = run_launcher(tmp_path / "two", *TINY, *optimizer, "train.per_device_train_batch_size=4", "cluster.nproc_per_node=2")
    one = run_launcher(tmp_path / "one", *TINY, *optimizer, "train.per_device_train_batch_size=8", "cluster.nproc_per_node=1")
    assert two.plan()["effective_batch_size"] == one.plan()["effective_batch_size"] == 8
    rel_close(two.weights(), one.weights(), tol)
    if tol > 1e-6:
        return
    untrained = run_launcher(tmp_path / "short", *TINY, *optimizer, "train.max_steps=1", "cluster.nproc_per_node=1", "train.per_device_train_batch_size=8")
    with pytest.raises(AssertionError):  # the comparison can fail: weights do move
        rel_close(untrained.weights(), one.weights(), 1e-6)


@SLOW_VARIANT  # as above: tests/test_loss.py checks accumulation against one larger batch on every strategy
@pytest.mark.parametrize(("optimizer", "tol"), OPTIMIZERS)
def test_accumulation_equals_one_larger_batch(optimizer, tol, tmp_path):
    acc = run_launcher(tmp_path / "acc", *TINY, *optimizer, "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2")
    big = run_launcher(tmp_path / "big", *TINY, *optimizer, "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1")
    rel_close(acc.weights(), big.weights(), tol)
    a = [m["loss"] for m in acc.metrics() if "loss" in m]
    b = [m["loss"] for m in big.metrics() if "loss" in m]
    assert a == pytest.approx(b, rel=1e-6)


# One real run per behaviour: every schedule is checked against transformers step by step in
# process (tests/test_schedulers.py); cosine runs for real here, the others as slow variants.
@pytest.mark.parametrize("schedule", [pytest.param("linear", marks=SLOW_VARIANT), "cosine", pytest.param("constant_with_warmup", marks=SLOW_VARIANT)])
def test_learning_rate_schedule_matches_transformers(schedule, runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = runs[schedule] if schedule in runs else run_launcher(tmp_path / "run", *TINY, f"scheduler={schedule}", *SCHEDULE)
    plan = run.plan()
    assert plan["warmup_steps"] == 3
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01)
    sched = transformers.get_scheduler(schedule, opt, num_warmup_steps=plan["warmup_steps"], num_training_steps=plan["total_steps"])
    expected = []
    for _ in range(plan["total_steps"]):
        expected.append(opt.param_groups[0]["lr"])  # the rate the step uses
        opt.step()
        sched.step()
    logged = {m["step"]: m["learning_rate"] for m in run.metrics() if "learning_rate" in m}
    # metrics log the rate the step used (before its schedule update), as Trainer 5 logs it
    for step, lr in logged.items():
        assert lr == pytest.approx(expected[step - 1], rel=1e-9, abs=1e-12), step


def test_epochs_plan_and_early_stopping(runs):
    run = runs["epochs"]
    result = run.result()
    assert result["status"] == "early_stopped"
    evals = [m for m in run.metrics() if "eval_loss" in m]
    # step 0 is the baseline (eval_on_start), not tracked; step 2 sets the best; two more without a 100-nat gain
    assert [e["step"] for e in evals] == [0, 2, 4, 6] and result["global_step"] == 6


def test_gradient_checkpointing_gives_the_same_weights(shared_runs, runs):
    plain, ckpt = shared_runs["one_rank"], runs["checkpointing"]  # 1 rank, 3 steps; the same job but for checkpointing
    assert "gradient checkpointing on" in (ckpt.run_dir / "logs" / "rank-0.log").read_text()
    assert "gradient checkpointing on" not in (plain.run_dir / "logs" / "rank-0.log").read_text()
    rel_close(plain.weights(), ckpt.weights(), 1e-6)


def test_bf16_autocast_on_cpu_trains(runs):
    run = runs["bf16"]
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    assert run.plan()["precision"] == "bf16" and losses[-1] < losses[0]


def test_nonfinite_loss_stops_naming_step_and_rank_or_is_skipped(runs):
    run = runs["nonfinite_error"]  # BOOM: a learning rate of 1e12
    assert run.code != 0
    result = run.result()
    assert result["status"] == "failed" and "non-finite" in result["error"]
    assert "at step" in result["error"] and "rank" in result["error"]
    assert "train.nonfinite=skip" in result["error"]
    skipped = runs["nonfinite_skip"]  # the same with train.nonfinite=skip scheduler=linear
    assert skipped.result()["skipped_steps"] >= 1 and skipped.result()["status"] == "completed"
    # As transformers' Trainer: the schedule advances only with an applied update, and each step
    # logs the rate it used: the step after a skipped one logs the same rate, any other a new one.
    lrs = [m["learning_rate"] for m in skipped.metrics() if "learning_rate" in m]
    skips = {s for s in range(1, 7) if f"step {s} skipped" in log_of(skipped.run_dir)}
    assert len(lrs) == 6 and len(skips) == skipped.result()["skipped_steps"], lrs
    assert all((lrs[s] == lrs[s - 1]) == (s in skips) for s in range(1, 6)), (lrs, skips)


def test_a_forced_overflow_is_skipped_and_the_schedule_waits(runs):
    """RINGLEADER_FAULT=overflow makes step 3's gradients inf on rank 1 (how the GPU check forces an
    fp16 overflow; on the CPU, in fp32, it is a non-finite step): the update is skipped on every
    rank, counted, and the schedule waits: step 4 uses (and logs) step 3's learning rate."""
    run = runs["overflow"]  # OVERFLOW with RINGLEADER_FAULT=overflow:1:3
    assert run.result()["skipped_steps"] == 1 and run.result()["status"] == "completed"
    lrs = {m["step"]: m["learning_rate"] for m in run.metrics() if "learning_rate" in m}
    assert lrs[4] == lrs[3] and len(set(lrs.values())) == 4, lrs
    assert "step 3 skipped: non-finite gradient norm" in log_of(run.run_dir)


def user_config_dir(conf: Path) -> Path:
    """A user's --config-dir: tests/user_code.py's Bigram and counting dataset as config groups."""
    (conf / "model").mkdir(parents=True)
    (conf / "data").mkdir()
    (conf / "model" / "bigram.yaml").write_text("name: bigram\n_target_: tests.user_code.Bigram\nkwargs:\n  vocab: 256\n")
    (conf / "data" / "counting.yaml").write_text("name: counting\n_target_: tests.user_code.counting_dataset\nnum_samples: 256\nkwargs:\n  period: 7\n")
    return conf


def test_user_model_and_dataset_through_config_dir(runs):
    run = runs["user_code"]  # --config-dir user_config_dir model=bigram data=counting, 20 steps
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    assert losses[-1] < losses[0] - 0.5
    assert set(run.weights()) == {"table.weight"}


def text_corpus(corpus: Path) -> Path:
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(("the quick brown fox jumps over the lazy dog. " * 40) + f"{i}\n")
    return corpus


def test_text_files_dataset(runs):
    run = runs["text_files"]  # data=text_files over text_corpus's 20 files
    assert run.plan()["train_samples"] > 0 and run.result()["status"] == "completed"


def test_ctrl_c_stops_every_rank_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    code, out = interrupt_after(run_dir, *TINY, "train.max_steps=100000", "train.logging_steps=1", "train.report_to=[]")
    assert code == 128 + signal.SIGINT, out
    result = __import__("json").loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped", out
    assert list((run_dir / "checkpoints").glob("step-*/COMPLETE")), "a stop saves a checkpoint to resume from"
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
