"""Issue 15 item 1: steps per epoch, total steps (fractional epochs, max_steps), warmup and the
schedule equal what Hugging Face Trainer computes AND runs, the last smaller micro-batch and the
last partial accumulation step included, dataloader_drop_last as Trainer's opt-in. Checked against
Trainer itself (tests/hf_trainer_steps.py runs it on a one-parameter model and records every
optimizer step), not against a formula:

- a grid of dataset sizes x per-device batch x accumulation x epochs / max_steps x drop_last, one
  process: ringleader's plan (launcher/planner.py plan_run) gives Trainer's step count, steps per
  epoch and warmup; ringleader's sampler (trainer/data.py train_batches, the loop's real path)
  gives each step exactly the samples Trainer's step trained on, and its schedule Trainer's rate;
- 2 processes (Trainer under torchrun on gloo): the same steps and rates; the samples of each step
  are Trainer's new ones (Trainer's accelerate repeats samples from the epoch's start to fill the
  last batch of every process; ringleader does not: a rank may get fewer samples, or a filler row
  without labels), and each step's samples do not depend on the world size;
- real ringleader runs (2 ranks, a rank with an empty share of the last micro-batch; and 1
  process on the same effective batch): the steps, rates and samples per step they log are
  Trainer's, and their losses (token-exact on the partial steps too) and weights are equal.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, SLOW_VARIANT, launcher_env, run_launcher

transformers = pytest.importorskip("transformers")

LR = 0.1


# -- ringleader's side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A composed, prepared config to vary: the planner is pure, so each case plans in microseconds."""
    from cluster.environment import describe_host
    from launcher.compose import compose
    from launcher.prepare import prepare

    run_dir = tmp_path_factory.mktemp("plan") / "run"
    prepared = prepare(compose(["+hw=cpu", "data=synthetic", "scheduler=linear", "optimizer=sgd", f"optimizer.learning_rate={LR}", "train.eval_strategy=no", f"train.output_dir={run_dir}", "dry_run=true"]))
    return SimpleNamespace(cfg=prepared.config, host=describe_host(), run_dir=run_dir)


def ringleader_plan(base, case: dict[str, Any], world: int):
    from launcher.planner import plan_run

    cfg = base.cfg
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, num_samples=case["n"], validation_fraction=0.0),
        cluster=dataclasses.replace(cfg.cluster, nproc_per_node=world),
        scheduler=dataclasses.replace(cfg.scheduler, warmup_steps=case.get("warmup", 0), warmup_ratio=0.0),
        train=dataclasses.replace(
            cfg.train, per_device_train_batch_size=case["batch"], gradient_accumulation_steps=case["accumulation"],
            num_train_epochs=case.get("epochs", 1.0), max_steps=case.get("max_steps", -1), dataloader_drop_last=case.get("drop_last", False),
        ),
    )
    cfg.check()
    return cfg, plan_run(cfg, base.host, base.run_dir)


class Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([i]), torch.tensor([i])


def ringleader_steps(case: dict[str, Any], world: int, total: int) -> list[tuple[int, list[int]]]:
    """(epoch, samples over all ranks) of each optimizer step, as the loop takes them: every rank's
    train_batches (DataLoader, batch sampler, filler rows), the layout's micro-batches per step, the
    position advanced and the epoch restarted as Trainer.advance does."""
    from launcher.steps import StepLayout
    from trainer.data import FILLER, train_batches

    layout = StepLayout(samples=case["n"], micro_batch=case["batch"] * world, accumulation=case["accumulation"], drop_last=case.get("drop_last", False))
    state = SimpleNamespace(epoch=0, consumed=0)
    ranks = [
        train_batches(Indices(case["n"]), state, usable=case["n"], step_samples=layout.effective, batch_size=case["batch"], rank=r, world_size=world, seed=0, num_workers=0, pin_memory=False, drop_last=layout.drop_last)
        for r in range(world)
    ]
    steps = []
    for _ in range(total):
        ids: list[int] = []
        for _ in range(layout.micro_batches(state.consumed)):  # the same count on every rank
            for batches in ranks:
                batch = next(batches)
                if not batch.pop(FILLER, False):
                    ids.extend(batch["input_ids"].view(-1).tolist())
                else:
                    assert (batch["labels"] == -100).all() and len(batch["labels"]) == 1
        steps.append((state.epoch, ids))
        state.consumed += layout.step_samples(state.consumed)
        if layout.epoch_ends(state.consumed):
            state.epoch, state.consumed = state.epoch + 1, 0
    return steps


def ringleader_rates(cfg, plan) -> list[float]:
    """The rate each step uses under ringleader's schedule (the one its strategies build)."""
    from trainer.optim import lr_lambda

    factor = lr_lambda(cfg.scheduler, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, learning_rate=LR)
    return [LR * factor(s) for s in range(plan.total_steps)]


# -- the grid ----------------------------------------------------------------------------------------


def case(n, batch, accumulation, **kw) -> dict[str, Any]:
    return {"n": n, "batch": batch, "accumulation": accumulation, **kw}


# One process: sizes that leave no tail, a smaller last micro-batch, a partial last accumulation
# step, both, a dataset smaller than one micro-batch or one step; fractional epochs; max_steps over
# several epochs; warmup as a ratio and as a count; drop_last on a tail, on none, on a partial step.
GRID_1 = [
    case(16, 4, 2), case(17, 4, 2), case(13, 4, 2), case(10, 4, 2, epochs=2), case(9, 3, 3, epochs=2.5, warmup=0.1),
    case(7, 2, 3, epochs=1.5), case(5, 5, 2), case(5, 2, 4, epochs=3), case(1, 1, 1, epochs=2), case(21, 1, 4, epochs=0.5, warmup=2),
    case(11, 3, 2, max_steps=7, warmup=0.2), case(6, 4, 2, max_steps=5), case(23, 5, 3, epochs=2, warmup=0.3),
    case(10, 4, 2, drop_last=True, epochs=2), case(13, 4, 2, drop_last=True), case(16, 4, 2, drop_last=True), case(14, 3, 2, drop_last=True, epochs=1.5, warmup=0.25),
    case(11, 3, 2, drop_last=True, max_steps=6),
]
SLOW_GRID_1 = [
    case(n, b, g, epochs=e, drop_last=d, warmup=0.1)
    for n, b, g, e, d in itertools.product((1, 2, 5, 7, 12, 19, 24), (1, 2, 3, 5), (1, 2, 3), (1, 1.7), (False, True))
    if n >= b
]
# Two processes: the world-size cases of GRID_1 (a rank with an empty share, a partial step).
GRID_2 = [case(16, 4, 2), case(13, 2, 2, epochs=2, warmup=0.1), case(9, 3, 2, epochs=1.5), case(5, 2, 2, epochs=2), case(11, 2, 3, max_steps=5, warmup=2), case(10, 2, 2, drop_last=True, epochs=2)]
SLOW_GRID_2 = [case(n, b, g, epochs=1.5, drop_last=d) for n, b, g, d in itertools.product((3, 7, 12, 17), (1, 2, 3), (1, 2, 3), (False, True)) if n >= b and (not d or n >= 2 * b)]


def check_against_trainer(base, c: dict[str, Any], world: int, hf: dict[str, Any]) -> None:
    cfg, plan = ringleader_plan(base, c, world)
    where = f"{c} on {world} process(es)"
    # The plan: Trainer's step count, steps per epoch (where its first epoch ends, unless the run
    # stops before), warmup.
    assert plan.total_steps == hf["global_step"] == len(hf["steps"]), where
    assert hf["epoch_ends"][0] == min(plan.steps_per_epoch, plan.total_steps), where
    warmup = c.get("warmup", 0)
    assert plan.warmup_steps == (math.ceil(warmup * plan.total_steps) if warmup < 1 else warmup), where
    # The schedule: each step's rate.
    assert ringleader_rates(cfg, plan) == pytest.approx([s["lr"] for s in hf["steps"]], rel=1e-12, abs=1e-15), where
    # The samples of each step: Trainer's; with several processes, Trainer's new ones (accelerate
    # fills the last batch of every process with samples from the start of the epoch).
    ours = ringleader_steps(c, world, plan.total_steps)
    theirs = [s["ids"] for s in hf["steps"]]
    if world == 1:
        assert [sorted(ids) for _, ids in ours] == [sorted(ids) for ids in theirs], where
    else:
        seen: dict[int, set[int]] = {}
        new = []
        for step, ids in enumerate(theirs, start=1):
            epoch = sum(end < step for end in hf["epoch_ends"])
            fresh = set(ids) - seen.setdefault(epoch, set())
            seen[epoch] |= fresh
            new.append(len(fresh))
        assert [len(ids) for _, ids in ours] == new, where
        # The samples of a step do not depend on the world size: one process, the same effective batch.
        alone = ringleader_steps({**c, "batch": c["batch"] * world}, 1, plan.total_steps)
        assert [(e, sorted(ids)) for e, ids in ours] == [(e, sorted(ids)) for e, ids in alone], where
    # Every sample once an epoch (with drop_last, all but the dropped micro-batch's).
    micro = c["batch"] * world
    per_epoch = c["n"] // micro * micro if c.get("drop_last") else c["n"]
    last = ours[-1][0]
    for epoch in range(last + 1):
        ids = [i for e, step in ours if e == epoch for i in step]
        assert len(ids) == len(set(ids)) and (len(ids) == per_epoch or epoch == last), where


def trainer_records(cases: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    from tests.hf_trainer_steps import record

    return [record(c, str(tmp_path / f"hf-{i}")) for i, c in enumerate(cases)]


def trainer_records_2(cases: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    """Trainer under torchrun, 2 processes on gloo, every case in one job."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "hf.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "hf_trainer_steps.py"), str(tmp_path / "cases.json"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launcher_env(OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_one_process_grid_equals_trainer(base, tmp_path):
    for c, hf in zip(GRID_1, trainer_records(GRID_1, tmp_path)):
        check_against_trainer(base, c, 1, hf)


def test_two_processes_grid_equals_trainer_under_torchrun(base, tmp_path):
    for c, hf in zip(GRID_2, trainer_records_2(GRID_2, tmp_path)):
        check_against_trainer(base, c, 2, hf)


@SLOW_VARIANT
def test_bigger_grid_equals_trainer(base, tmp_path):
    for c, hf in zip(SLOW_GRID_1, trainer_records(SLOW_GRID_1, tmp_path)):
        check_against_trainer(base, c, 1, hf)
    for c, hf in zip(SLOW_GRID_2, trainer_records_2(SLOW_GRID_2, tmp_path / "two")):
        check_against_trainer(base, c, 2, hf)


def test_a_plan_of_a_dataset_smaller_than_one_micro_batch_with_drop_last_is_refused(tmp_path):
    run = run_launcher(tmp_path / "run", "data=synthetic", "data.num_samples=3", "train.per_device_train_batch_size=2", "train.dataloader_drop_last=true", "cluster.nproc_per_node=2", "dry_run=true", check=False)
    assert run.code == 2 and run.proc.stderr.strip().startswith("ringleader: error: train.dataloader_drop_last: the dataset has 3 training samples, fewer than one micro-batch of 4")
    assert not (tmp_path / "run").exists()


# -- real runs -----------------------------------------------------------------------------------------

# 13 samples, 2 ranks x 2 per device x 2 accumulation (8 a step), 1.5 epochs: each epoch is a
# whole step and a partial one of 5 samples in 2 micro-batches, the second holding 1 sample (rank 1
# gets a filler row). Masked prompts of varied labelled-token counts (tests/user_code.py), SGD.
SEQ = 16
REAL = [
    "model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"model.block_size={SEQ}", "data._target_=tests.user_code.masked_prompts", f"data.seq_len={SEQ}", "data.num_samples=13",
    "optimizer=sgd", f"optimizer.learning_rate={LR}", "optimizer.momentum=0", "optimizer.weight_decay=0", "scheduler=linear", "scheduler.warmup_steps=0.25",
    "train.max_grad_norm=0", "train.max_steps=-1", "train.num_train_epochs=1.5", "train.logging_steps=1", "train.eval_strategy=no", "train.save_strategy=no",
    "train.include_num_input_tokens_seen=all", "train.report_to=[]", "train.seed=3",
]
REAL_CASE = case(13, 4, 2, epochs=1.5, warmup=0.25)  # Trainer's view of it on one process (2 x 2 per device)


def test_real_runs_step_as_trainer_with_token_exact_partial_steps(tmp_path):
    two = run_launcher(tmp_path / "two", *REAL, "cluster.nproc_per_node=2", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2")
    one = run_launcher(tmp_path / "one", *REAL, "cluster.nproc_per_node=1", "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2")
    (hf,) = trainer_records([REAL_CASE], tmp_path)
    rates = [s["lr"] for s in hf["steps"]]
    for run in (two, one):
        plan, logged = run.plan(), [m for m in run.metrics() if "loss" in m]
        assert plan["total_steps"] == hf["global_step"] == 3 and plan["steps_per_epoch"] == hf["epoch_ends"][0] == 2
        assert [m["step"] for m in logged] == [1, 2, 3]
        # Samples per step (every sample is SEQ input tokens): Trainer's 8, 5, 8.
        seen = [m["num_input_tokens_seen"] // SEQ for m in logged]
        assert [b - a for a, b in zip([0, *seen], seen)] == [len(s["ids"]) for s in hf["steps"]] == [8, 5, 8]
        # The rate each step used, as Trainer logs it (its learning_rate is read after the
        # optimizer step, before the schedule's: the rate tests/hf_trainer_steps.py records).
        assert [m["learning_rate"] for m in logged] == pytest.approx(rates, rel=1e-12, abs=1e-15)
    # The same samples per step on 2 ranks (one of them with a filler row) and on one process, and
    # token-exact losses: equal, partial steps included, and so are the weights.
    assert [m["loss"] for m in two.metrics() if "loss" in m] == pytest.approx([m["loss"] for m in one.metrics() if "loss" in m], rel=1e-5)
    got, expected = two.weights(), one.weights()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=2e-6)


# -- a run directory from before a key existed -----------------------------------------------------


def test_a_checkpoint_written_before_a_key_existed_resumes(one_rank_run, tmp_path):
    """A run saved by a ringleader whose schema lacked train.dataloader_drop_last and
    train.label_smoothing_factor (their lines taken out of its config.yaml, the checkpoint's marker
    re-described as that ringleader wrote it): a missing key is its default, not a config change.
    The launcher and the ranks both resume; a value other than the default is still refused."""
    import shutil

    import yaml

    from trainer.durable import crc32_of

    from tests.conftest import ONE_RANK_JOB

    # A copy of the session's 1-rank run (tests/conftest.py) as if it had died in step 3, after
    # saving step 2: step-4, final/ and result.json gone.
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run.run_dir, run_dir)
    for gone in ("checkpoints/step-4", "final"):
        shutil.rmtree(run_dir / gone)
    (run_dir / "result.json").unlink()
    saving = ONE_RANK_JOB
    checkpoint = run_dir / "checkpoints" / "step-2"
    for path in (run_dir / "config.yaml", checkpoint / "config.yaml"):
        config = yaml.safe_load(path.read_text())
        for key in ("dataloader_drop_last", "label_smoothing_factor"):
            del config["train"][key]
        path.write_text(yaml.safe_dump(config))
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["files"]["config.yaml"] = {"size": (checkpoint / "config.yaml").stat().st_size, "crc32": crc32_of(checkpoint / "config.yaml")}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))

    refused = run_launcher(run_dir, *saving, "train.label_smoothing_factor=0.1", check=False)
    assert refused.code == 2 and "train.label_smoothing_factor 0.0 -> 0.1" in refused.proc.stderr, refused.output
    resumed = run_launcher(run_dir, *saving)
    assert resumed.result()["status"] == "completed" and resumed.result()["global_step"] == 4
    assert "resumed from" in (run_dir / "logs" / "rank-0.log").read_text()
