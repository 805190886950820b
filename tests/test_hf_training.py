"""A transformers causal LM end to end through the launcher (issue 13): the shipped tiny Llama (random
weights from trainer/assets/llama_tiny) on the shipped stdlib instruction set, tokenized once by the
launcher's pre-step, trained on 2 CPU ranks, final/ loaded by from_pretrained and pipeline. Offline.

The DDP run (a checkpoint every step) is also the uninterrupted reference of the resume test; the
fsdp run is also the second run that finds the tokenized data in the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import SLOW_VARIANT, LazyRuns, launcher_env, run_launcher

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

ARGS = (
    "model=llama_tiny", "data=stdlib_instruct", "data.seq_len=128", "train.max_steps=4", "train.per_device_train_batch_size=4",
    "train.gradient_accumulation_steps=2", "train.logging_steps=1", "train.eval_strategy=no", "train.save_strategy=no", "train.eval_on_start=false",
    "optimizer.learning_rate=1e-3", "scheduler=constant",
)
EVERY_STEP = ("train.save_strategy=steps", "train.save_steps=1")


def env(cache: Path) -> dict[str, str]:
    # The tokenized data goes to data.cache_dir (cached), not XDG_CACHE_HOME: DeepSpeed's JIT-built
    # ops live in the user's cache, and a fresh one rebuilds them (minutes).
    return launcher_env(**OFFLINE)


def cached(cache: Path) -> tuple[str, ...]:
    return (f"data.cache_dir={cache}",)


def losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics() if "loss" in m]


@pytest.fixture(scope="module")
def cache(hf_cache) -> Path:
    return hf_cache  # tests/conftest.py: one per session


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache):
    """ARGS on DDP, with a checkpoint every step: the resume test's uninterrupted reference too."""
    return run_launcher(tmp_path_factory.mktemp("ddp") / "run", *ARGS, *cached(cache), *EVERY_STEP, "strategy=ddp", env=env(cache))


@pytest.fixture(scope="module")
def runs(ddp_run, tmp_path_factory, cache):
    """ARGS on another strategy, made when first asked for; after ddp_run, so the data is tokenized."""
    root = tmp_path_factory.mktemp("strategies")
    return LazyRuns(lambda strategy: run_launcher(root / strategy, *ARGS, *cached(cache), f"strategy={strategy}", env=env(cache)))


def test_llama_tiny_trains_final_loads_and_generates(ddp_run, runs, cache, tmp_path):
    run = ddp_run
    plan = run.plan()
    assert plan["data_cache"] and plan["tokenized"]["samples"]["train"] == plan["train_samples"] > 400
    assert 1.3e6 < plan["memory"]["num_parameters"] < 1.33e6  # counted from config.json, without torch
    assert run.result()["status"] == "completed" and len(losses(run)) == 4
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    final = run.run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("What does json.dumps do?", return_tensors="pt")["input_ids"]
    # The trained model: the shipped config with the weights the ranks ended with (final/'s tensors
    # loaded by name, not through from_pretrained); from_pretrained gives the same logits.
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from launcher.hf_config import package_path

    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(package_path("pkg:trainer/assets/llama_tiny"))).eval()
    missing, unexpected = trained.load_state_dict(load_file(str(final / "model.safetensors")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the embedding
    trained.tie_weights()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)
    out = pipeline("text-generation", model=str(final), device="cpu")("What does json.dumps do?", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("What does json.dumps do?")
    # A second run on the same data and tokenizer (the fsdp run of test_losses_agree_across_strategies)
    # tokenizes nothing: the plan names the same folder.
    again = runs["fsdp"]
    assert again.plan()["data_cache"] == plan["data_cache"] and again.plan()["tokenized"]["hit"] is True
    assert "cache hit, nothing tokenized" in again.proc.stdout
    # A dry run reads the counts from the cache; a changed setting is a new (unknown) entry.
    dry = run_launcher(tmp_path / "dry", *ARGS, *cached(cache), "dry_run=true", env=env(cache))
    assert "530 train" in dry.proc.stdout or str(plan["train_samples"]) in dry.proc.stdout
    changed = run_launcher(tmp_path / "dry2", *ARGS, *cached(cache), "dry_run=true", "data.train_on_prompt=true", env=env(cache))
    assert "known after tokenization" in changed.proc.stdout


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("zero2", marks=SLOW_VARIANT), pytest.param("zero3", marks=SLOW_VARIANT)])
def test_losses_agree_across_strategies(strategy, ddp_run, runs):
    run = runs[strategy]
    ref, got = losses(ddp_run), losses(run)
    assert len(got) == len(ref) == 4
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.run_dir / "final")
    assert json.loads((run.run_dir / "final" / "config.json").read_text())["model_type"] == "llama" and model is not None


@SLOW_VARIANT
def test_prompt_completion_with_packing_trains(cache, tmp_path):
    run = run_launcher(tmp_path / "run", *ARGS, *cached(cache), "data.format=prompt_completion", "data.packing=true", env=env(cache))
    assert run.plan()["train_samples"] == run.plan()["tokenized"]["packed_samples"]["train"] < run.plan()["tokenized"]["samples"]["train"]
    assert run.result()["status"] == "completed"


def test_interrupted_and_resumed_run_is_bit_identical_and_export_is_a_from_pretrained_folder(ddp_run, cache, tmp_path):
    reference = ddp_run  # uninterrupted, the same command (a checkpoint every step)
    every_step = (*ARGS, *cached(cache), *EVERY_STEP, "strategy=ddp")
    killed = run_launcher(tmp_path / "killed", *every_step, "cluster.max_restarts=1", env={**env(cache), "RINGLEADER_FAULT": "step:1:3"}, check=False)
    assert killed.code == 0, killed.output[-3000:]
    assert "fault injection" in (tmp_path / "killed" / "logs" / "rank-1.log").read_text()
    ref, got = reference.weights(), killed.weights()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # export of a checkpoint writes the same from_pretrained folder as final/, without the run.
    import subprocess
    import sys

    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "launcher", "export", str(reference.run_dir / "checkpoints" / "step-4"), str(out)], check=True, env=env(cache), capture_output=True)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(out).eval()
    b = AutoModelForCausalLM.from_pretrained(reference.run_dir / "final").eval()
    ids = torch.arange(5, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert (out / "tokenizer.json").read_bytes() == (reference.run_dir / "final" / "tokenizer.json").read_bytes()


@SLOW_VARIANT  # tests/test_lora.py's fsdp run streams a pretrained base onto the meta device and matches ddp; tests/test_hf_model.py the meta build
def test_fine_tune_pretrained_weights_under_fsdp_loads_on_meta_and_matches_ddp(ddp_run, cache, tmp_path):
    """model=hf from a from_pretrained folder: fsdp builds on the meta device and streams rank 0's
    safetensors into the shards; its first losses equal DDP's, which loads in full on each rank."""
    final = ddp_run.run_dir / "final"
    args = ("model=hf", f"model.name_or_path={final}", *ARGS[1:], *cached(cache), "train.max_steps=2")
    ddp = run_launcher(tmp_path / "ddp", *args, "strategy=ddp", env=env(cache))
    fsdp = run_launcher(tmp_path / "fsdp", *args, "strategy=fsdp", env=env(cache))
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-4, abs=1e-5)
    assert losses(ddp)[0] < losses(ddp_run)[0]  # it starts from the trained weights, not random ones


@SLOW_VARIANT
def test_fine_tune_pretrained_weights_under_zero3_loads_partitioned_and_matches_ddp(ddp_run, cache, tmp_path):
    """zero3 with pretrained weights: from_pretrained inside deepspeed.zero.Init."""
    final = ddp_run.run_dir / "final"
    args = ("model=hf", f"model.name_or_path={final}", *ARGS[1:], *cached(cache), "train.max_steps=2")
    ddp = run_launcher(tmp_path / "ddp", *args, "strategy=ddp", env=env(cache))
    zero3 = run_launcher(tmp_path / "zero3", *args, "strategy=zero3", env=env(cache))
    assert losses(zero3) == pytest.approx(losses(ddp), rel=1e-4, abs=1e-5)
    import re

    held, total = map(int, re.search(r"zero3: pretrained weights loaded partitioned, (\d+) of (\d+)", (tmp_path / "zero3" / "logs" / "rank-0.log").read_text()).groups())
    assert held <= total / 2 + 1000  # each rank holds its half (plus padding), never the whole model
