"""A transformers model (the shipped tiny Llama, random weights) on padded, prompt-masked chat data
of varying length (stdlib_instruct): the token-exact gradient with the transformers model itself,
resume from 2 ranks to 1, and ZeRO-3's partitioned build of random weights. Real torchrun runs on
gloo, offline.

One uninterrupted run on 1 process (batch 8) is the reference. A 2-rank run (2 per device x 2
accumulation: the same 8 samples a step) dies at step 3 after its step-2 checkpoint; its first two
steps must equal the reference's within fp32 rounding (plain SGD, no clipping: the update is the
gradient itself, so an average of micro-batch means instead of the token mean would show). Rerun
on 1 process it resumes from step 2 and must end where the reference ends.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.checkpoint_tools import log_of, read_dcp
from tests.conftest import launcher_env, run_launcher

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

SEED, LR = 42, 2.0
ARGS = (
    "model=llama_tiny", "data=stdlib_instruct", "data.seq_len=128", "train.max_steps=4", "train.logging_steps=1", "train.eval_strategy=no", "train.eval_on_start=false",
    "optimizer=sgd", f"optimizer.learning_rate={LR}", "optimizer.momentum=0", "optimizer.weight_decay=0", "scheduler=constant", "train.max_grad_norm=0",
    "train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=0", "train.report_to=[]", f"train.seed={SEED}",
)
ONE_PROCESS = ("cluster.nproc_per_node=1", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1")
TWO_RANKS = ("cluster.nproc_per_node=2", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2")
LOSS_RTOL = 1e-5  # tests/test_strategies.py's: only the order of fp32 reductions differs


def env(**extra: str) -> dict[str, str]:
    # The tokenized cache goes through data.cache_dir, not XDG_CACHE_HOME: that would also move
    # torch's extension cache and make DeepSpeed JIT-build its shm op again (minutes on 2 cores).
    return launcher_env(**OFFLINE, **extra)


def losses(run) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.metrics() if "loss" in m}


def model_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return {k.removeprefix("/model/"): v for k, v in read_dcp(checkpoint / "dcp").items() if k.startswith("/model/")}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, *, rtol: float = 1e-5, atol: float = 2e-6) -> None:
    assert set(got) == set(want), what
    for name, expected in want.items():
        torch.testing.assert_close(got[name], expected, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.fixture(scope="module")
def cache(hf_cache):
    return hf_cache  # tests/conftest.py: one per session


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """Uninterrupted, 1 process, batch 8."""
    return run_launcher(tmp_path_factory.mktemp("one") / "run", *ARGS, *ONE_PROCESS, f"data.cache_dir={cache}", env=env())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cache):
    """2 ranks x 2 x accumulation 2; rank 1 dies at step 3, after the step-2 checkpoint."""
    run = run_launcher(tmp_path_factory.mktemp("two") / "run", *ARGS, *TWO_RANKS, f"data.cache_dir={cache}", env=env(RINGLEADER_FAULT="step:1:3"), check=False)
    assert run.code != 0 and (run.run_dir / "checkpoints" / "step-2" / "COMPLETE").is_file(), run.output[-3000:]
    return run


def test_two_ranks_with_accumulation_give_the_gradient_of_one_process_on_the_whole_batch(reference, two_ranks):
    ref, got = losses(reference), losses(two_ranks)
    assert [got[s] for s in (1, 2)] == pytest.approx([ref[s] for s in (1, 2)], rel=LOSS_RTOL)
    from trainer.hf_model import SHIPPED_TINY, HFModelSpec, build_causal_lm

    initial = build_causal_lm(HFModelSpec(config=str(SHIPPED_TINY / "config.json")), seed=SEED).state_dict()
    want = model_tensors(reference.run_dir / "checkpoints" / "step-2")
    moved = max(float((want[k] - v).abs().max()) for k, v in initial.items() if k in want)
    assert moved > 1e-2, "the SGD steps must move the weights well beyond the tolerance"
    assert_close(model_tensors(two_ranks.run_dir / "checkpoints" / "step-2"), want, "step 2, 2 ranks vs 1 process:")


def test_resume_from_two_ranks_on_one_ends_where_the_uninterrupted_run_ends(reference, two_ranks, cache):
    resumed = run_launcher(two_ranks.run_dir, *ARGS, *ONE_PROCESS, f"data.cache_dir={cache}", env=env())
    assert resumed.result()["status"] == "completed" and resumed.result()["global_step"] == 4
    log = log_of(resumed.run_dir)
    assert f"resumed from {resumed.run_dir / 'checkpoints' / 'step-2'} at step 2" in log and "written by 2 rank(s), now 1" in log
    ref, got = losses(reference), losses(resumed)
    assert [got[s] for s in (3, 4)] == pytest.approx([ref[s] for s in (3, 4)], rel=LOSS_RTOL)
    # Four SGD steps at 2.0 compound the first two steps' fp32 rounding (~1e-6, the tolerance at
    # step 2 above) to a few 1e-6; a wrong data position or state would move weights by ~1e-2.
    assert_close(resumed.weights(), reference.weights(), "final, resumed on 1 process vs uninterrupted:", rtol=1e-4, atol=1e-5)


def test_zero3_builds_random_weights_partitioned_with_the_seed_of_ddp(two_ranks, cache, tmp_path):
    """No name_or_path under zero3: built inside deepspeed.zero.Init (no rank holds the whole model
    from that build), with rank 0's seeded values: the losses of ddp's first steps."""
    run = run_launcher(tmp_path / "run", *ARGS, *TWO_RANKS, f"data.cache_dir={cache}", "strategy=zero3", "train.max_steps=2", "train.save_strategy=no", env=env())
    ref, got = losses(two_ranks), losses(run)
    assert [got[s] for s in (1, 2)] == pytest.approx([ref[s] for s in (1, 2)], rel=LOSS_RTOL)
    for rank in (0, 1):
        found = re.search(r"zero3: random weights \(seed 42\) built partitioned, (\d+) of (\d+)", log_of(run.run_dir, rank))
        assert found, log_of(run.run_dir, rank)[-2000:]
        held, total = map(int, found.groups())
        assert held <= total / 2 + 1000  # its half (plus padding), never the whole model
