"""train.save_only_model (Trainer's): checkpoints hold the model's weights and the loop's position,
no optimizer, scaler or RNG state; `export` and load_best_model_at_end work from them, final/ is
what a full run writes, and a resume from one (here torchrun's restart after a rank is killed)
loads the weights, the data position and the schedule's step, says in the log and in
metrics.jsonl that it is not exact, and goes on. Real runs: 2 CPU ranks on gloo, real DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint_tools import checkpoint_steps, log_of, read_dcp
from tests.conftest import SLOW_VARIANT, TINY, Run, interrupt_after, launcher_env, run_launcher
from tests.test_lora import ADAPTER, OFFLINE, adapted, args, base, cache  # noqa: F401  # base, cache: its fixtures (the LoRA variant)

# 6 steps, a checkpoint and an evaluation every 2, the best model loaded at the end. Plain SGD with
# momentum would do as well; AdamW's two moments make the optimizer state twice the weights.
JOB = [
    *TINY, "train.max_steps=6", "train.save_strategy=steps", "train.save_steps=2", "train.eval_strategy=steps", "train.eval_steps=2",
    "train.load_best_model_at_end=true", "train.report_to=[]", "scheduler=linear", "scheduler.warmup_steps=0",
    # The "best" evaluation is the highest loss, an early one: loading it at the end changes the
    # weights, so a load that did nothing would show.
    "train.greater_is_better=true",
]
CRASH = "step:1:5"  # rank 1 SIGKILLs itself after step 5 (trainer/faults.py); torchrun restarts the job once


def sizes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    from trainer.export import export_checkpoint

    return load_file(str(export_checkpoint(checkpoint, out) / "model.safetensors"))


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


def check_model_only_resume(run: Run, *, at: int) -> dict:
    """The run was killed after step `at` + 1 and resumed from step-`at`, a model-only checkpoint:
    it says so in a warning on rank 0's log and in the resume event, and completes."""
    assert run.code == 0, run.output[-3000:]
    assert run.result()["status"] == "completed" and run.result()["global_step"] == 6
    events = [m for m in run.metrics() if m.get("event") == "resume"]
    assert len(events) == 1 and events[0]["step"] == at and "not an exact resume" in events[0]["note"], events
    assert "WARNING" in next(line for line in log_of(run.run_dir).splitlines() if "not an exact resume" in line)
    state = json.loads((run.run_dir / "checkpoints" / f"step-{at}" / "trainer_state.json").read_text())
    assert state["save_only_model"] is True and state["schedule_position"] == at
    return events[0]


def test_model_only_checkpoints_export_load_best_and_resume_saying_so(tmp_path):
    full = run_launcher(tmp_path / "full", *JOB)
    only = run_launcher(tmp_path / "only", *JOB, "train.save_only_model=true", "cluster.max_restarts=1", env=launcher_env(RINGLEADER_FAULT=CRASH), check=False)
    check_model_only_resume(only, at=4)
    assert "warning: train.save_only_model" in only.output  # the plan says it before the start
    # The checkpoint: the model's tensors and no optimizer or RNG state, a third of the full one
    # (AdamW keeps two moments per weight).
    saved, reference = only.run_dir / "checkpoints" / "step-4", full.run_dir / "checkpoints" / "step-4"
    keys = set(read_dcp(saved / "dcp"))
    assert keys and all(k.startswith("/model/") for k in keys) and any(k.startswith("/optimizer/") for k in read_dcp(reference / "dcp"))
    assert not list(saved.glob("rng-*")) and list(reference.glob("rng-*"))
    assert sizes(saved) < 0.5 * sizes(reference), (sizes(saved), sizes(reference))
    # Until the crash both runs are the same run: export gives the same weights from either checkpoint.
    assert_equal(export(saved, tmp_path / "x-only"), export(reference, tmp_path / "x-full"))
    # After the resume the schedule goes on at the restored step: the rates equal the full run's
    # (the optimizer's moments start afresh, so the weights do not).
    rates = {m["step"]: m["learning_rate"] for m in full.metrics() if "learning_rate" in m}
    assert {m["step"]: m["learning_rate"] for m in only.metrics() if "learning_rate" in m and m["step"] >= 5} == {5: rates[5], 6: rates[6]}
    # load_best_model_at_end from a model-only checkpoint: final/ holds that checkpoint's weights,
    # in the same files a full run writes.
    best = only.result()["best_step"]
    assert best in checkpoint_steps(only.run_dir) and best < 6
    assert_equal(only.weights(), export(only.run_dir / "checkpoints" / f"step-{best}", tmp_path / "x-best"))
    assert sorted(p.name for p in (only.run_dir / "final").iterdir()) == sorted(p.name for p in (full.run_dir / "final").iterdir())


@pytest.mark.parametrize("strategy", [pytest.param("fsdp", marks=SLOW_VARIANT), pytest.param("zero1", marks=SLOW_VARIANT), pytest.param("zero2", marks=SLOW_VARIANT), "zero3"])
def test_model_only_checkpoints_on_sharded_strategies(strategy, tmp_path):
    """Every rank's shard of the weights (fsdp), or DeepSpeed's fp32 weights gathered as final/
    takes them (zero1/2/3: no optimizer partitions, no deepspeed/ folder); the best one loads into
    the sharded model at the end (the resume's load is the same: the ddp test above runs it)."""
    run = run_launcher(tmp_path / "run", *JOB, f"strategy={strategy}", "train.save_only_model=true", timeout=600)
    saved = run.run_dir / "checkpoints" / "step-4"
    assert not (saved / "deepspeed").exists() and all(k.startswith("/model/") for k in read_dcp(saved / "dcp"))
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["save_only_model"] is True and state["schedule_position"] == 4
    best = run.result()["best_step"]
    assert best < 6
    assert_equal(run.weights(), export(run.run_dir / "checkpoints" / f"step-{best}", tmp_path / "x-best"))


@SLOW_VARIANT
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_a_lora_runs_model_only_checkpoints_hold_the_adapter(strategy, base, cache, tmp_path):
    """LoRA (tests/test_lora.py's tiny Llama base): the checkpoint holds the adapter's tensors and
    nothing else; the restart after the kill loads them onto the base, and export writes the adapter."""
    lora = args(base, f"strategy={strategy}", cache=cache)  # 4 steps, a checkpoint every 2
    run = run_launcher(tmp_path / "run", *lora, "train.save_only_model=true", "cluster.max_restarts=1", env=launcher_env(**OFFLINE, RINGLEADER_FAULT="step:1:3"), check=False, timeout=900)
    assert run.code == 0, run.output[-3000:]
    assert any("not an exact resume" in m.get("note", "") for m in run.metrics() if m.get("event") == "resume")
    keys = set(read_dcp(run.run_dir / "checkpoints" / "step-2" / "dcp"))
    adapter = {n for n, _ in adapted(base).named_parameters() if any(a in n for a in ADAPTER)}
    assert {k.removeprefix("/model/") for k in keys} == adapter
    from trainer.export import export_checkpoint

    out = export_checkpoint(run.run_dir / "checkpoints" / "step-4", tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()


def test_a_stops_checkpoint_is_whole_so_the_resume_after_it_is_exact(tmp_path):
    """Ctrl-C (as SIGTERM or SLURM's USR2 before a requeue) saves a checkpoint that the job resumes
    from next: with save_only_model it is a full one all the same (optimizer and RNG state), so that
    resume is exact (the full-checkpoint resume tests cover what it then does)."""
    run_dir = tmp_path / "run"
    _, out = interrupt_after(run_dir, *TINY, "train.max_steps=100000", "train.logging_steps=1", "train.report_to=[]", "train.save_only_model=true")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "stopped", out
    (saved,) = [p.parent for p in (run_dir / "checkpoints").glob("step-*/COMPLETE")]
    assert any(k.startswith("/optimizer/") for k in read_dcp(saved / "dcp")) and list(saved.glob("rng-*")), sorted(read_dcp(saved / "dcp"))[:5]
    assert "save_only_model" not in json.loads((saved / "trainer_state.json").read_text())
