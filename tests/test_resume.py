"""Resume is exact: crashes, kill -9 with elastic restarts, crashes inside a save, corrupt and
crafted checkpoints, asynchronous saves and export, all against one uninterrupted run.

Real 2-rank torchrun jobs on gloo, started with `python -m launcher`. Faults are injected with
RINGLEADER_FAULT (trainer/faults.py): the rank SIGKILLs itself at a named point, in torchrun's
first attempt only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import partial

import pytest
from safetensors.torch import load_file

from tests.checkpoint_tools import assert_same_tensors, checkpoint_steps, flip_byte, job, leftovers, log_of, plant_code_in_metadata, read_dcp, train_losses
from tests.conftest import ROOT, Run, launcher_env, run_launcher, side_by_side


def faulty(run_dir, fault: str, *overrides: str) -> Run:
    return run_launcher(run_dir, *overrides, env=launcher_env(RINGLEADER_FAULT=fault), check=False)


# Saving every 2 steps does not change what the job computes: test_crash_then_rerun's checkpoints.
EVERY_2 = job(**{"train.save_steps": 2})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The reference and the faulty runs, side by side (tests/conftest.py), the longest first, each
    named after the test that reads it. The asynchronous save's writer waits 2 s: far longer than the two steps it
    must let through, even with another run beside it."""
    root = tmp_path_factory.mktemp("resume")
    return side_by_side(
        crash_in_every_phase=partial(faulty, root / "phases", "save-shard:1:8@0,save-marker:0:8@1,save-rename:0:8@2,save-retention:0:8@3", *job(**{"cluster.max_restarts": 4, "train.save_total_limit": 1})),
        kill_9=partial(faulty, root / "kill_9", "step:1:10", *job(**{"cluster.max_restarts": 1, "data.num_workers": 1})),
        reference=partial(run_launcher, root / "reference", *job()),
        crashed=partial(faulty, root / "crashed", "step:1:11", *EVERY_2),  # test_crash_then_rerun's own: it damages and reruns it
        async_save=partial(faulty, root / "async_save", "save-async-write:0:8:delay,save-async-write:1:8:delay", *job(**{"train.save_async": "true"})),
    )


@pytest.fixture(scope="module")
def reference(runs) -> Run:
    """The uninterrupted run every scenario must reproduce bit for bit."""
    run = runs["reference"]
    assert checkpoint_steps(run.run_dir) == [4, 8, 12, 14]
    return run


def test_kill_9_with_max_restarts_resumes_in_epoch_1_and_loses_at_most_one_save_interval(reference, runs):
    """torchrun restarts both workers after rank 1's SIGKILL at step 10; they resume from step-8,
    3 steps into epoch 1. With a data loader worker process (num_workers=1), started afresh."""
    run = runs["kill_9"]  # step:1:10, cluster.max_restarts=1 data.num_workers=1
    run_dir = run.run_dir
    assert run.code == 0, run.output[-3000:]
    assert run.result()["status"] == "completed" and run.result()["global_step"] == 14
    assert "restart 1" in log_of(run_dir, 1) and "fault injection" in log_of(run_dir, 1)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-8'} at step 8 (epoch 1, 48 samples into it)" in log_of(run_dir)

    events = run.metrics()
    resumes = [i for i, e in enumerate(events) if e.get("event") == "resume"]
    assert len(resumes) == 1 and events[resumes[0]]["step"] == 8
    reached = max(e["step"] for e in events[: resumes[0]] if "loss" in e)  # step 10 died unlogged
    assert reached == 9
    assert reached + 1 - events[resumes[0]]["step"] <= 4, "steps lost (done again): at most one save interval"
    assert_same_tensors(run.weights(), reference.weights())
    # After the resume every step saw the same samples and dropout masks: the same losses, exactly.
    want = train_losses(reference.run_dir)
    assert {s: v for s, v in train_losses(run_dir).items() if s > 8} == {s: v for s, v in want.items() if s > 8}


def test_crash_then_rerun_falls_back_past_corrupt_and_crafted_checkpoints(reference, runs, tmp_path):
    """Rank 1 dies at step 11; rerunning the same command resumes. Before that, step-10's DCP
    metadata is replaced by a pickle that would run a command (its marker re-recorded, so only the
    loader's unpickling can stop it) and step-8 gets a flipped byte: resume=auto skips both, says
    why, resumes from step-6 (1 step into epoch 1) and ends bit-identical to the reference."""
    crashed = runs["crashed"]  # EVERY_2 with step:1:11
    run_dir = crashed.run_dir
    assert crashed.code != 0 and "SIGKILL" in crashed.output
    assert not (run_dir / "final").exists()
    assert checkpoint_steps(run_dir) == [2, 4, 6, 8, 10]
    sentinel = tmp_path / "code-ran"
    crafted = plant_code_in_metadata(run_dir / "checkpoints" / "step-10", sentinel)
    flipped = run_dir / "checkpoints" / "step-8" / "dcp" / "__0_0.distcp"
    flip_byte(flipped)

    resumed = run_launcher(run_dir, *EVERY_2)
    assert not sentinel.exists(), "the crafted checkpoint ran its code"
    log = log_of(run_dir)
    assert "skipping checkpoint step 10" in log and f"{crafted}: refusing to unpickle posix.system" in log
    assert "skipping checkpoint step 8" in log and f"{flipped}: checksum mismatch" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step-6'} at step 6 (epoch 1, 16 samples into it)" in log
    assert_same_tensors(resumed.weights(), reference.weights())


def test_crash_in_every_phase_of_a_save_resumes_from_the_newest_complete_checkpoint(reference, runs):
    """One job, five torchrun attempts, save_total_limit=1. The save of step 8 is crashed in each
    of its phases in turn: attempt 0, rank 1's shard half written; 1, every file in but no COMPLETE
    marker; 2, the marker written but step-8.tmp not yet renamed; 3, the save done and retention
    busy deleting step-4 (renamed to .deleting-step-4, half removed). Each restart must resume
    from the newest complete checkpoint: step-4 three times, then step-8."""
    run = runs["crash_in_every_phase"]  # max_restarts=4, save_total_limit=1, the faults of the 4 attempts above
    run_dir = run.run_dir
    assert run.code == 0, run.output[-3000:]
    log = log_of(run_dir)
    assert log_of(run_dir, 1).count("fault injection") == 1 and log.count("fault injection") == 3
    resumed = re.findall(r"resumed from \S+/(step-\d+) at step", log)
    assert resumed == ["step-4", "step-4", "step-4", "step-8"]
    removed = re.findall(r"removing incomplete checkpoint \S+/checkpoints/(\S+)", log)
    assert removed == ["step-8.tmp", "step-8.tmp", "step-8.tmp", ".deleting-step-4"]
    assert leftovers(run_dir) == [] and checkpoint_steps(run_dir) == [14]
    assert_same_tensors(run.weights(), reference.weights())


def test_async_save_holds_the_state_of_its_step(reference, runs):
    """The writer thread of step 8's save waits 2 s (a slow disk) while training goes on: the
    checkpoint must still hold step 8's parameters and optimizer state, as a synchronous save does."""
    run = runs["async_save"]  # train.save_async=true, the writers of step 8 delayed
    run_dir = run.run_dir
    assert run.code == 0, run.output[-3000:]
    lines = log_of(run_dir).splitlines()
    committed = next(i for i, line in enumerate(lines) if "checkpoint saved:" in line and line.endswith("step-8"))
    stepped = next(i for i, line in enumerate(lines) if " step 10 epoch" in line)
    assert stepped < committed, "training must go on while step 8's checkpoint is written"
    assert_same_tensors(read_dcp(run_dir / "checkpoints" / "step-8" / "dcp"), read_dcp(reference.run_dir / "checkpoints" / "step-8" / "dcp"))
    saved, want = (json.loads((d / "checkpoints" / "step-8" / "trainer_state.json").read_text())["loop"] for d in (run_dir, reference.run_dir))
    assert saved == want
    assert_same_tensors(run.weights(), reference.weights())


def test_export_any_checkpoint_and_load_it_with_plain_pytorch(reference):
    """`python -m launcher export CHECKPOINT` consolidates a checkpoint in one process (no process
    group) into <run>/exports/step-N; plain PyTorch loads it, and final/, strictly."""
    checkpoint = reference.run_dir / "checkpoints" / "step-14"
    proc = subprocess.run([sys.executable, "-m", "launcher", "export", str(checkpoint)], capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = reference.run_dir / "exports" / "step-14"
    assert sorted(p.name for p in out.iterdir()) == [".ringleader-export", "config.yaml", "model.safetensors"]
    assert_same_tensors(load_file(str(out / "model.safetensors")), reference.weights())

    # A fresh process: safetensors, yaml and the model class, strict loading; nothing else.
    script = (
        "import sys, yaml\n"
        "from safetensors.torch import load_file\n"
        "from trainer.model import GPT\n"
        "for folder in sys.argv[1:]:\n"
        "    kwargs = yaml.safe_load(open(folder + '/config.yaml'))['model']['kwargs']\n"
        "    model = GPT(**kwargs)\n"
        "    model.load_state_dict(load_file(folder + '/model.safetensors'), strict=True)\n"
        "    print('loaded', folder, sum(p.numel() for p in model.parameters()))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script, str(reference.run_dir / "final"), str(out)], capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.count("loaded") == 2
