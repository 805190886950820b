"""Checkpoints on disk: damaged files are named, resume=auto falls back, crafted pickles run no
code, retention keeps the newest and the best; and, with real jobs, a stalled rank ends the job
naming it, and resume on another world size continues the same curve.

The first tests write real checkpoints in this process with the real CheckpointManager and DDP
strategy at world size 1 (no process group is needed for that); the others start real 2-rank
torchrun jobs through `python -m launcher`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.checkpoint_tools import assert_same_tensors, checkpoint_steps, flip_byte, job, log_of, plant_code_in_metadata, read_dcp, train_losses
from tests.conftest import SLOW_VARIANT, Run, launcher_env, run_launcher, side_by_side
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.loop import LoopState


def tiny_strategy(seed: int = 0):
    from launcher.schema import RunConfig
    from trainer.build import build_model
    from trainer.strategies import build_strategy

    cfg = RunConfig()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size = 1, 16, 2, 8
    cfg.optimizer.learning_rate = 1e-2
    torch.manual_seed(seed)
    strategy = build_strategy("ddp", cfg=cfg, device=torch.device("cpu"))
    strategy.setup(build_model(cfg.model), total_steps=10, warmup_steps=0)
    return strategy


def train_step(strategy) -> None:
    ids = torch.randint(0, 256, (2, 8))
    strategy.backward(strategy.forward(ids, ids))
    strategy.step()


def manager(root: Path, limit: int = 0) -> CheckpointManager:
    return CheckpointManager(root, rank=0, world_size=1, device=torch.device("cpu"), save_total_limit=limit, config_hash="test")


def save_steps(root: Path, steps, *, limit: int = 0, keep=frozenset()) -> tuple[CheckpointManager, object]:
    strategy, checkpoints = tiny_strategy(), manager(root, limit)
    for step in steps:
        train_step(strategy)
        checkpoints.save(step, strategy, dataclasses.asdict(LoopState(step=step)), keep=set(keep))
    return checkpoints, strategy


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """checkpoints/ with step-1 and step-2, written by the real manager."""
    root = tmp_path_factory.mktemp("saved") / "checkpoints"
    save_steps(root, [1, 2])
    return root


def copy_of(saved: Path, tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    return root


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "truncated shard": ("dcp/__0_0.distcp", truncate, "bytes, expected"),
    "deleted shard": ("dcp/__0_0.distcp", Path.unlink, "missing from the checkpoint"),
    "flipped byte in a shard": ("dcp/__0_0.distcp", flip_byte, "checksum mismatch"),
    "flipped byte in the loop state": ("trainer_state.json", lambda p: flip_byte(p, 2), "checksum mismatch"),
    "deleted RNG state": ("rng-0.safetensors", Path.unlink, "missing from the checkpoint"),
    "deleted marker": ("COMPLETE", Path.unlink, "missing; the checkpoint is incomplete"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file(saved, tmp_path, damage):
    root = copy_of(saved, tmp_path)
    name, spoil, message = DAMAGE[damage]
    spoil(root / "step-2" / name)
    strategy = tiny_strategy(seed=1)
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(str(root / "step-2" / name)) + ".*" + re.escape(message)):
        manager(root).restore(str(root / "step-2"), strategy)  # train.resume=<that path>
    assert_same_tensors(strategy.model.state_dict(), before)  # refused before anything was loaded


def test_auto_falls_back_to_the_newest_checkpoint_that_loads_and_says_so(saved, tmp_path, caplog):
    root = copy_of(saved, tmp_path)
    shard = root / "step-2" / "dcp" / "__0_0.distcp"
    flip_byte(shard)
    strategy = tiny_strategy(seed=1)
    with caplog.at_level(logging.WARNING, logger="ringleader"):
        path, state = manager(root).restore("auto", strategy)
    assert path == root / "step-1" and state["loop"]["step"] == 1
    assert f"skipping checkpoint step 2, it cannot be used: {shard}: checksum mismatch" in caplog.text
    assert_same_tensors(strategy.model.state_dict(), {k.removeprefix("/model/"): v for k, v in read_dcp(root / "step-1" / "dcp").items() if k.startswith("/model/")})

    flip_byte(root / "step-1" / "trainer_state.json", 2)
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        manager(root).restore("auto", strategy)
    assert manager(tmp_path / "empty").restore("auto", strategy) is None


def test_a_crafted_metadata_pickle_runs_no_code_and_is_named(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    sentinel = tmp_path / "code-ran"
    metadata = plant_code_in_metadata(root / "step-2", sentinel)
    with pytest.raises(CheckpointError, match=re.escape(f"{metadata}: refusing to unpickle posix.system")):
        manager(root).restore(str(root / "step-2"), tiny_strategy())
    assert not sentinel.exists()
    # The danger is real: torch.distributed.checkpoint's own reader unpickles it and runs it.
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):  # os.system's return value is no Metadata, once it has run
        FileSystemReader(str(root / "step-2" / "dcp")).read_metadata()
    assert sentinel.exists()


def test_a_step_right_after_an_async_save_waits_for_its_copy(tmp_path, monkeypatch):
    """An asynchronous save returns before it has copied the state; the copy runs on the writer
    thread, here 2 s late (a fault point). The optimizer step issued at once must wait for it: the
    checkpoint holds the state of its own step, and equals a synchronous save of that state."""
    from trainer import faults

    strategy, checkpoints = tiny_strategy(), manager(tmp_path / "checkpoints")
    train_step(strategy)
    checkpoints.save(1, strategy, dataclasses.asdict(LoopState(step=1)))
    monkeypatch.setattr(faults, "FAULTS", faults.parse("save-async-copy:0:2:delay", 0))
    checkpoints.save(2, strategy, dataclasses.asdict(LoopState(step=1)), asynchronous=True)
    train_step(strategy)  # changes every parameter and both Adam moments
    checkpoints.wait()
    sync, asynchronous = (read_dcp(tmp_path / "checkpoints" / f"step-{s}" / "dcp") for s in (1, 2))
    assert_same_tensors(asynchronous, sync)
    assert not torch.equal(strategy.model.state_dict()["wte.weight"], sync["/model/wte.weight"]), "the step after the save changed nothing"
    manager(tmp_path / "checkpoints").verify_together(tmp_path / "checkpoints" / "step-2")


@pytest.mark.parametrize(("limit", "keep", "left"), [(1, {2}, [2, 5]), (2, {1}, [1, 4, 5]), (1, set(), [5])])
def test_retention_keeps_the_newest_and_the_best(tmp_path, limit, keep, left):
    save_steps(tmp_path / "checkpoints", [1, 2, 3, 4, 5], limit=limit, keep=keep)
    assert checkpoint_steps(tmp_path) == left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step-{s}" for s in left]


def test_a_missing_resume_path_is_refused_before_anything_starts(tmp_path):
    run = run_launcher(tmp_path / "run", *job(), f"train.resume={tmp_path / 'nowhere' / 'step-8'}", check=False)
    assert run.code == 2
    assert "train.resume" in run.output and "nowhere" in run.output
    assert not (tmp_path / "run").exists()


# A high learning rate makes eval_loss best at step 4 of 8 (test_load_best_model_at_end_keeps_the_best_and_the_newest).
# One rank with accumulation 4: the job's 16 samples a step, as 2 ranks x 2 (the loss is token-exact).
BEST = job(**{
    "cluster.nproc_per_node": 1, "train.gradient_accumulation_steps": 4,
    "model.dropout": 0.0, "train.max_steps": 8, "optimizer.learning_rate": 0.03, "scheduler": "constant",
    "train.eval_strategy": "steps", "train.eval_steps": 2, "train.save_steps": 2, "train.save_total_limit": 1,
    "train.load_best_model_at_end": "true",
})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The real jobs whose tests need no timing, side by side (tests/conftest.py), named after their
    tests; the stalled rank (a timeout) runs alone."""
    root = tmp_path_factory.mktemp("jobs")
    return side_by_side(
        best=partial(run_launcher, root / "best", *BEST),
        commit_error=partial(run_launcher, root / "commit_error", *job(**{"train.max_steps": 4}), env=launcher_env(RINGLEADER_FAULT="save-marker:0:4:error"), check=False, timeout=240),
    )


def test_load_best_model_at_end_keeps_the_best_and_the_newest(runs):
    """A high learning rate makes eval_loss best at step 4 of 8; with save_total_limit=1 the best
    and the newest checkpoint survive, and the final weights are the best checkpoint's."""
    run = runs["best"]  # BEST
    assert run.result()["best_step"] == 4, "the scenario needs a best checkpoint older than the newest"
    assert checkpoint_steps(run.run_dir) == [4, 8]
    best = {k.removeprefix("/model/"): v for k, v in read_dcp(run.run_dir / "checkpoints" / "step-4" / "dcp").items() if k.startswith("/model/")}
    assert_same_tensors(run.weights(), best)


def log_time(line: str) -> datetime.datetime:
    return datetime.datetime.strptime(line.split(" ", 1)[0], "%H:%M:%S")


def test_a_stalled_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    """Rank 1 sleeps (for an hour) before step 3's collective. Rank 0's collective times out after
    train.ddp_timeout; a monitored barrier names rank 1; torchrun's SIGTERM reaches rank 1, whose
    watchdog dumps its stack and exits. Nothing waits for torchrun's 30 s SIGKILL, or the hour."""
    timeout = 4  # not lower: under load, healthy ranks may drift a second or two apart
    run = run_launcher(tmp_path / "run", *job(**{"train.ddp_timeout": timeout, "train.save_strategy": "no"}), env=launcher_env(RINGLEADER_FAULT="step:1:3:stall"), check=False, timeout=240)
    assert run.code != 0
    assert "rank(s) 1 stalled" in run.output  # the launcher's summary of the rank logs
    rank0, rank1 = log_of(run.run_dir, 0).splitlines(), log_of(run.run_dir, 1).splitlines()
    stalled_at = log_time(next(line for line in rank1 if "fault injection" in line))
    named = next(line for line in rank0 if "StalledRankError: a collective timed out on rank 0" in line)
    assert "rank(s) 1 stalled" in named
    exited = next(line for line in rank1 if "rank 1 stalled (error: no training step" in line)
    assert "Current thread" in "\n".join(rank1) or "Thread 0x" in "\n".join(rank1), "the stalled rank's stack is in its log"
    # Bounds, not benchmarks: the failure modes are 30 s (torchrun's SIGKILL) and 3600 s (the stall).
    assert (log_time(named) - stalled_at).total_seconds() <= 2 * timeout + 4
    assert (log_time(exited) - stalled_at).total_seconds() <= 2 * timeout + 15
    # Per-rank step times, to see a straggler: the slowest rank's step time and its rank.
    steps = [e for e in run.metrics() if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(e["step_time_s"] > 0 and e["slowest_rank"] in (0, 1) for e in steps)


@SLOW_VARIANT  # resumes on another world size run by default in test_loop_holes (more ranks), test_lora and test_hf_resume (2 -> 1)
def test_resume_on_another_world_size_continues_the_same_losses(tmp_path):
    """2 ranks -> 1 rank -> 2 ranks, 8 samples a step throughout (4 x 2 ranks, or 4 x 2
    accumulation on 1): the step after each resume has the loss the uninterrupted run had, to
    1e-6 relative. Dropout off: its masks depend on the world size."""
    common = {"model.dropout": 0.0, "train.gradient_accumulation_steps": 1, "train.max_steps": 10}
    two = run_launcher(tmp_path / "two", *job(**common))
    one = run_launcher(tmp_path / "one", *job(**{**common,
        "cluster.nproc_per_node": 1, "train.gradient_accumulation_steps": 2, "train.resume": tmp_path / "two" / "checkpoints" / "step-4"}))
    assert "resumed from" in log_of(one.run_dir) and "written by 2 rank(s), now 1" in log_of(one.run_dir)
    back = run_launcher(tmp_path / "back", *job(**common, **{"train.resume": tmp_path / "one" / "checkpoints" / "step-8"}))
    assert "written by 1 rank(s), now 2" in log_of(back.run_dir)

    for resumed, uninterrupted, step in ((one, two, 5), (back, one, 9)):
        got, want = train_losses(resumed.run_dir)[step], train_losses(uninterrupted.run_dir)[step]
        assert abs(got - want) <= 1e-6 * abs(want), f"step {step}: {got} vs {want}"


# -- retention by save order, re-saves, commit errors, a changed config ----------------------------


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    """Step 200 and 300 are from an earlier trajectory; saving step 100 (a restart that fell back)
    must keep step-100: it is the newest save, whatever its number."""
    root = tmp_path / "checkpoints"
    save_steps(root, [200, 300])
    save_steps(root, [100], limit=2)
    assert checkpoint_steps(tmp_path) == [100, 300]
    save_steps(root, [150], limit=1)
    assert checkpoint_steps(tmp_path) == [150]
    assert manager(root).restore("auto", tiny_strategy())[0] == root / "step-150"


def test_a_fallback_past_a_corrupt_checkpoint_keeps_a_loadable_one(tmp_path):
    """save_total_limit=1: step-4 is corrupt, resume=auto falls back to step-1; the next save
    (step 3) is kept and the corrupt step-4 goes: a loadable checkpoint remains."""
    root = tmp_path / "checkpoints"
    save_steps(root, [1, 4])
    flip_byte(root / "step-4" / "dcp" / "__0_0.distcp")
    checkpoints, strategy = manager(root, limit=1), tiny_strategy()
    assert checkpoints.restore("auto", strategy)[0] == root / "step-1"
    checkpoints.save(3, strategy, dataclasses.asdict(LoopState(step=3)))
    assert checkpoint_steps(tmp_path) == [3]
    assert manager(root).restore("auto", tiny_strategy())[0] == root / "step-3"


RESAVE = """
import sys
from pathlib import Path
from tests.test_checkpoint import save_steps
save_steps(Path(sys.argv[1]), [1, 1])
"""


def test_a_crash_while_re_saving_a_step_leaves_that_step_loadable(tmp_path):
    """A restart re-saves step-1: the process is killed (SIGKILL, a real crash) after the old
    step-1 was renamed aside and before the new one is in place. The next start puts the old one
    back; step-1 loads."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    root = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", RESAVE, str(root)], cwd=ROOT, env=launcher_env(RINGLEADER_FAULT="save-replace:0:1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (root / "step-1").exists() and (root / ".replaced-step-1" / "COMPLETE").exists() and (root / "step-1.tmp").exists()
    checkpoints = manager(root)
    checkpoints.clean_incomplete()
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]
    path, state = checkpoints.restore("auto", tiny_strategy())
    assert path == root / "step-1" and state["loop"]["step"] == 1


def test_a_checkpoint_of_another_config_is_refused_by_the_ranks_unless_allowed(tmp_path):
    """The ranks' safety net behind the launcher's check: a changed learning rate raises (not a
    warning), naming the key; with train.resume_with_changed_config it loads."""
    from omegaconf import OmegaConf

    from launcher.schema import RunConfig
    from trainer.checkpoint import ConfigChangedError

    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path)
    cfg.optimizer.learning_rate = 0.001
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    save_steps(tmp_path / "checkpoints", [1])  # its config.yaml: the one above
    cfg.optimizer.learning_rate = 0.002
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    step1 = tmp_path / "checkpoints" / "step-1"
    strict = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, device=torch.device("cpu"), save_total_limit=0, config_hash="other", config=new)
    with pytest.raises(ConfigChangedError, match=re.escape(f"{step1} was written with another config: optimizer.learning_rate 0.001 -> 0.002")):
        strict.restore("auto", tiny_strategy())
    allowed = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, device=torch.device("cpu"), save_total_limit=0, config_hash="other", config=new, allow_config_change=True)
    assert allowed.restore("auto", tiny_strategy())[0] == step1


def test_a_commit_error_on_rank_0_ends_every_rank_with_it(runs):
    """Rank 0's part of step 4's commit fails (an OSError, as a full disk would give). Rank 1 must
    learn it from rank 0 at once and fail the same save, not wait at a barrier for ddp_timeout."""
    run = runs["commit_error"]  # 4 steps, RINGLEADER_FAULT=save-marker:0:4:error
    assert run.code != 0
    assert "OSError: fault injection" in log_of(run.run_dir, 0)
    assert "rank 0 could not commit the checkpoint" in log_of(run.run_dir, 1)
    assert checkpoint_steps(run.run_dir) == []
