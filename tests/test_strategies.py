"""DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 behind one interface, for real: 2 CPU ranks on gloo.

One run per strategy (20 steps, accumulation 2, a checkpoint at step 10: tests/conftest.py
strategy_runs, made once per session) serves several tests: the same losses as DDP, exact resume,
export and warm start. DeepSpeed start-up costs a few seconds per run; the first run on a machine
JIT-builds DeepSpeed's shm comm op once. zero1 runs with RINGLEADER_SLOW=1: ringleader drives it
as zero2 (only the stage number DeepSpeed gets differs), which runs by default.
zero3_offload JIT-builds DeepSpeed's CPU Adam (about a minute the first time, cached after) and
runs slowly on two cores: its test runs with RINGLEADER_SLOW=1.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.checkpoint_tools import assert_same_tensors, log_of, read_dcp
from tests.conftest import SLOW_VARIANT, STRATEGY_JOB, TINY, Run, launcher_env, run_launcher

COMMON = STRATEGY_JOB
# zero2's path with DeepSpeed's stage 1 (ringleader's code is the same but for the stage number).
ZERO1 = pytest.param("zero1", marks=SLOW_VARIANT)
# Same seed, data and fp32 math; only the order of floating-point reductions differs (bucketed
# all-reduce vs reduce-scatter, the norm over flat partitions or DTensor shards).
LOSS_RTOL = 1e-5


def args(strategy: str, *extra: str) -> list[str]:
    return [*COMMON, f"strategy={strategy}", *extra]


@pytest.fixture(scope="module")
def runs(strategy_runs) -> dict[str, Run]:
    """run_launcher(dir, *args(strategy)) per strategy, made when first asked for (tests/conftest.py)."""
    return strategy_runs


def losses(run: Run) -> list[float]:
    return [m["loss"] for m in run.metrics() if "loss" in m]


@pytest.mark.parametrize("strategy", ["fsdp", ZERO1, "zero2", "zero3"])
def test_same_losses_as_ddp(runs, strategy):
    ref, got = losses(runs["ddp"]), losses(runs[strategy])
    assert len(ref) == len(got) == 20
    for step, (a, b) in enumerate(zip(ref, got), 1):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"{strategy} step {step}: loss {b} vs ddp {a}"
    norms = [(m["grad_norm"], n["grad_norm"]) for m, n in zip(runs["ddp"].metrics(), runs[strategy].metrics()) if "grad_norm" in m]
    assert all(abs(a - b) <= 1e-4 * a for a, b in norms), norms[:3]
    lrs = [(m["learning_rate"], n["learning_rate"]) for m, n in zip(runs["ddp"].metrics(), runs[strategy].metrics()) if "learning_rate" in m]
    assert all(a == pytest.approx(b, rel=1e-12, abs=1e-15) for a, b in lrs)  # the same LambdaLR schedule


@pytest.mark.parametrize("strategy", [pytest.param("zero2", marks=SLOW_VARIANT), "zero3", "fsdp"])  # zero2: zero3's DeepSpeed checkpoint path without partitioned parameters
def test_interrupted_and_resumed_ends_bit_identical(runs, strategy, tmp_path):
    """The run stopped after its checkpoint at step 10 (step-20 and final/ gone, as after a crash
    at step 15); rerunning the same command resumes from step 10 and ends with the same bits."""
    done = runs[strategy]
    run_dir = tmp_path / strategy
    shutil.copytree(done.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-20")
    shutil.rmtree(run_dir / "final")
    (run_dir / "result.json").unlink()
    assert (run_dir / "checkpoints" / "step-10" / "COMPLETE").is_file()
    resumed = run_launcher(run_dir, *args(strategy))
    assert any(m.get("event") == "resume" and m["step"] == 10 for m in resumed.metrics())
    a, b = done.weights(), resumed.weights()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{strategy}: {k} differs after resume"


def test_fsdp_async_save_holds_the_state_of_its_step(runs, tmp_path):
    """FSDP's DTensor shards through asynchronous saves. The copy of step 10's state runs 2 s late
    on both ranks (a fault point), so step 11's optimizer step must wait for it; the checkpoints
    and the final weights are the synchronous run's, bit for bit."""
    run = run_launcher(tmp_path / "run", *args("fsdp", "train.save_async=true"), env=launcher_env(RINGLEADER_FAULT="save-async-copy:0:10:delay,save-async-copy:1:10:delay"))
    assert "fault injection" in log_of(run.run_dir, 0) and "fault injection" in log_of(run.run_dir, 1)
    for step in (10, 20):
        assert_same_tensors(read_dcp(run.run_dir / "checkpoints" / f"step-{step}" / "dcp"), read_dcp(runs["fsdp"].run_dir / "checkpoints" / f"step-{step}" / "dcp"))
    assert_same_tensors(run.weights(), runs["fsdp"].weights())


@pytest.mark.parametrize("strategy", [ZERO1, "zero2", "zero3"])
def test_deepspeed_checkpoints_go_through_the_manager(runs, strategy):
    ckpt = runs[strategy].run_dir / "checkpoints" / "step-10"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "trainer_state.json").is_file()
    shards = sorted(p.name for p in (ckpt / "deepspeed").iterdir())
    assert [s for s in shards if "optim_states" in s] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert not list(ckpt.rglob("latest")), "DeepSpeed's `latest` file is never written or read"


@pytest.mark.parametrize("strategy", ["fsdp", ZERO1, "zero2", "zero3"])
def test_export_is_the_same_consolidated_model(runs, strategy):
    """final/model.safetensors of every strategy has DDP's keys, shapes and fp32 dtype, loads into
    the plain model, and holds nearly DDP's weights (Adam amplifies reduction-order noise)."""
    from trainer.build import build_model

    from launcher.compose import compose

    ref, got = runs["ddp"].weights(), runs[strategy].weights()
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    cfg = compose([*args(strategy), "train.output_dir=/unused"]).config
    model = build_model(cfg.model)
    model.load_state_dict(got, strict=True)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-3, atol=1e-4), k


def warm_start(runs, source: str, target: str, nproc: int, run_dir) -> Run:
    """source's final/ starts target on nproc ranks: one SGD step at a learning rate of 1e-12, saved."""
    init = runs[source].run_dir / "final" / "model.safetensors"
    return run_launcher(
        run_dir, *TINY, f"strategy={target}", f"cluster.nproc_per_node={nproc}", f"model.init_from={init}",
        "optimizer=sgd", "optimizer.learning_rate=1e-12", "optimizer.momentum=0", "train.max_steps=1", "train.save_strategy=steps", "train.save_steps=1",
    )


@pytest.fixture(scope="module")
def zero2_one_rank(runs, tmp_path_factory) -> Run:
    """zero3's export warm-starting zero2 on one rank: the warm start's default case, and DeepSpeed's
    run on one rank (test_deepspeed_on_one_rank)."""
    return warm_start(runs, "zero3", "zero2", 1, tmp_path_factory.mktemp("warm") / "run")


@pytest.mark.parametrize("source,target,nproc", [("zero3", "zero2", 1), pytest.param("fsdp", "zero2", 2, marks=SLOW_VARIANT), pytest.param("zero3", "ddp", 1, marks=SLOW_VARIANT)])
def test_warm_start_across_strategies_and_world_sizes(runs, source, target, nproc, tmp_path, request):
    """Weights exported by one strategy start another, on another world size. A learning rate of
    1e-12 leaves them in place, so the export of the new run must equal the source."""
    default = (source, target, nproc) == ("zero3", "zero2", 1)
    run = request.getfixturevalue("zero2_one_rank") if default else warm_start(runs, source, target, nproc, tmp_path / "warm")
    a, b = runs[source].weights(), run.weights()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-9), k
    losses_warm = losses(run)
    assert losses_warm[0] < losses(runs[source])[0] - 0.05  # it starts where the source ended, not from scratch


def test_gradient_checkpointing_under_zero3_gives_the_same_losses(runs, tmp_path):
    run = run_launcher(tmp_path / "ckpt", *args("zero3", "train.gradient_checkpointing=true", "train.save_strategy=no"))
    for a, b in zip(losses(runs["ddp"]), losses(run), strict=True):
        assert abs(a - b) <= LOSS_RTOL * abs(a)


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_bf16_mixed_precision_trains(strategy, tmp_path):
    run = run_launcher(tmp_path / "bf16", *TINY, f"strategy={strategy}", "train.bf16=true", "train.max_steps=10", "train.gradient_accumulation_steps=2", "optimizer.learning_rate=3e-3", "train.gradient_checkpointing=true")
    got = losses(run)
    assert run.plan()["precision"] == "bf16" and got[-1] < got[0] - 0.1, got
    assert all(v.dtype == torch.float32 for v in run.weights().values())  # exported from the fp32 master


@pytest.mark.skipif(not os.environ.get("RINGLEADER_SLOW"), reason="builds DeepSpeed's cpu_adam (about a minute of gcc the first time); set RINGLEADER_SLOW=1")
def test_zero3_offload_trains_and_matches(runs, tmp_path):
    """CPU Adam (DeepSpeed's, with offload) is not torch's AdamW kernel: close, not identical."""
    run = run_launcher(tmp_path / "offload", *args("zero3_offload", "train.save_strategy=no"), timeout=600)
    for a, b in zip(losses(runs["ddp"]), losses(run), strict=True):
        assert abs(a - b) <= 1e-3 * abs(a)


def test_deepspeed_on_one_rank(zero2_one_rank):
    """A single GPU is one rank: DeepSpeed's engine needs a process group even then (it failed with
    "Distributed backend is not initialized"). Same check on one CPU rank: zero2 trains and saves."""
    run = zero2_one_rank
    assert run.result()["status"] == "completed" and run.plan()["world_size"] == 1 and run.plan()["strategy"] == "zero2"
    assert (run.run_dir / "checkpoints" / "step-1" / "COMPLETE").is_file()
