"""Strategy configuration, in the launcher (no torch): the derived DeepSpeed config against recorded
files, contradicting keys refused, the memory plan, paged optimizers on CPU.

Re-record the DeepSpeed configs after an intended change:
    RINGLEADER_RECORD=1 python -m pytest tests/test_strategies_config.py -k recorded
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.__main__ import main
from launcher.compose import ConfigError, compose
from launcher.deepspeed_config import deepspeed_config
from launcher.memory import count_parameters, gpt_parameters, model_state_bytes
from launcher.prepare import prepare
from tests.conftest import ROOT, launcher_env

RECORDED = ROOT / "tests" / "recorded" / "deepspeed"

# name -> overrides; each derived config is compared with RECORDED/<name>.json
CASES = {
    "zero1": ["strategy=zero1", "+hw=cpu"],
    "zero2": ["strategy=zero2", "+hw=cpu", "train.gradient_accumulation_steps=4", "train.max_grad_norm=0.5"],
    "zero3": ["strategy=zero3", "+hw=cpu", "+strategy.deepspeed.zero_optimization.stage3_prefetch_bucket_size=1000000"],
    "zero3_offload": ["strategy=zero3_offload", "+hw=cpu", "+strategy.deepspeed.zero_optimization.offload_optimizer.pin_memory=true"],
    "zero2_bf16_sgd": ["strategy=zero2", "optimizer=sgd", "+hw=8xA100", "train.bf16=true", "+strategy.deepspeed.zero_optimization.overlap_comm=true"],
    "zero3_fp16_paged": ["strategy=zero3", "optimizer=paged_adamw_8bit", "+hw=4xV100", "train.fp16=true"],
}


def prepared(tmp_path: Path, *overrides: str):
    return prepare(compose([*overrides, f"train.output_dir={tmp_path / 'run'}", "dry_run=true"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_derived_deepspeed_config_matches_recorded(name, tmp_path):
    p = prepared(tmp_path, *CASES[name])
    derived = p.plan.deepspeed
    assert derived == deepspeed_config(p.config, world_size=p.plan.world_size)  # the trainer's call
    path = RECORDED / f"{name}.json"
    if os.environ.get("RINGLEADER_RECORD"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(derived, indent=2, sort_keys=True) + "\n")
    assert derived == json.loads(path.read_text()), f"{path} differs; re-record with RINGLEADER_RECORD=1 if intended"


def test_derived_values_follow_the_schema(tmp_path):
    p = prepared(tmp_path, "strategy=zero2", "train.per_device_train_batch_size=3", "train.gradient_accumulation_steps=5", "train.max_grad_norm=0.25", "optimizer.learning_rate=2e-4", "optimizer.adam_beta2=0.98", "train.bf16=true")
    ds = p.plan.deepspeed
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * p.plan.world_size == p.plan.effective_batch_size
    assert ds["gradient_clipping"] == 0.25 and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert ds["zero_optimization"]["stage"] == 2 and "scheduler" not in ds
    assert prepared(tmp_path, "strategy=ddp").plan.deepspeed == {}


# (override, the key the error names first, the schema key it must also name)
CONTRADICTIONS = [
    ("+strategy.deepspeed.train_micro_batch_size_per_gpu=7", "strategy.deepspeed.train_micro_batch_size_per_gpu", "train.per_device_train_batch_size"),
    ("+strategy.deepspeed.gradient_clipping=0.3", "strategy.deepspeed.gradient_clipping", "train.max_grad_norm"),
    ("+strategy.deepspeed.gradient_accumulation_steps=8", "strategy.deepspeed.gradient_accumulation_steps", "train.gradient_accumulation_steps"),
    ("+strategy.deepspeed.train_batch_size=1000", "strategy.deepspeed.train_batch_size", "train.per_device_train_batch_size"),
    ("+strategy.deepspeed.zero_optimization.stage=3", "strategy.deepspeed.zero_optimization.stage", "strategy.zero_stage"),
    ("+strategy.deepspeed.bf16.enabled=true", "strategy.deepspeed.bf16.enabled", "train.bf16"),
    ("+strategy.deepspeed.optimizer.type=Lamb", "strategy.deepspeed.optimizer", "optimizer"),
    ("+strategy.deepspeed.scheduler.type=WarmupLR", "strategy.deepspeed.scheduler", "scheduler"),
    ("+strategy.deepspeed.zero_optimization.offload_optimizer.device=cpu", "strategy.deepspeed.zero_optimization.offload_optimizer.device", "strategy.offload_optimizer"),
]


@pytest.mark.parametrize("override,key,schema_key", CONTRADICTIONS)
def test_contradicting_deepspeed_key_is_refused_naming_both(override, key, schema_key, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["strategy=zero2", override, f"train.output_dir={run_dir}", "train.max_steps=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"ringleader: error: {key}:") and schema_key in err, err
    assert not run_dir.exists()


def test_agreeing_and_deepspeed_only_keys_are_merged(tmp_path):
    p = prepared(
        tmp_path, "strategy=zero3_offload", "train.per_device_train_batch_size=4",
        "+strategy.deepspeed.train_micro_batch_size_per_gpu=4",  # agrees: allowed
        "+strategy.deepspeed.zero_optimization.reduce_bucket_size=1000000",
        "+strategy.deepspeed.zero_optimization.offload_param.device=nvme",
        "+strategy.deepspeed.zero_optimization.offload_param.nvme_path=/local/nvme",
    )
    zero = p.plan.deepspeed["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000000 and zero["stage"] == 3
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": "/local/nvme"} and zero["offload_optimizer"] == {"device": "cpu"}
    with pytest.raises(ConfigError, match="offload_param.device"):
        prepared(tmp_path, "strategy=zero3_offload", "+strategy.deepspeed.zero_optimization.offload_param.device=none")


@pytest.mark.parametrize("overrides,key", [
    (["strategy=zero2", "strategy.zero_stage=3"], "strategy.zero_stage"),
    (["strategy=zero2", "strategy.offload_param=true"], "strategy.offload_param"),
    (["strategy=ddp", "strategy.offload_optimizer=true"], "strategy.offload_optimizer"),
    (["strategy=fsdp", "+strategy.deepspeed.zero_optimization.stage=2"], "strategy.deepspeed"),
])
def test_strategy_knobs_must_agree_with_the_strategy(overrides, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        prepared(tmp_path, *overrides)
    assert info.value.key == key


def test_dry_run_prints_the_deepspeed_config_without_torch(tmp_path):
    code = "import sys; from launcher.__main__ import main; rc = main(sys.argv[1:]); assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules; sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code, "strategy=zero3", "dry_run=true", f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=launcher_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split("deepspeed config:", 1)[1]
    assert json.loads(printed)["zero_optimization"]["stage"] == 3
    assert "memory/rank" in proc.stdout and not (tmp_path / "run").exists()


# -- memory plan -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt_tiny", "gpt_small", "gpt2_small"])
def test_parameter_count_formula_is_exact(model, tmp_path):
    import torch

    from trainer.build import build_model

    cfg = compose([f"model={model}", f"train.output_dir={tmp_path}"]).config
    real = sum(p.numel() for p in build_model(cfg.model, device="meta").parameters())  # tied head counted once
    assert count_parameters(cfg) == real
    assert gpt_parameters(vocab_size=50257, block_size=1024, n_layer=12, n_embd=768, bias=True) == 124_439_808  # GPT-2 small, as published
    del torch


def test_model_state_bytes_are_the_zero_paper_formulas():
    n = 64
    total = {s: sum(model_state_bytes(s, world_size=n, mixed=True).values()) for s in ("ddp", "zero1", "zero2", "zero3", "fsdp")}
    assert total["ddp"] == 16
    assert total["zero1"] == pytest.approx(4 + 12 / n)
    assert total["zero2"] == pytest.approx(2 + 14 / n)
    assert total["zero3"] == pytest.approx(16 / n) and total["fsdp"] == pytest.approx(16 / n)


def test_plan_memory_and_fit_warning_naming_what_fits(tmp_path):
    big = ["+hw=8xA100", "model=gpt2_small", "model.n_layer=48", "model.n_embd=1600", "model.n_head=25", "data=synthetic", "data.num_samples=100000", "data.seq_len=1024", "train.bf16=true", "train.per_device_train_batch_size=16"]
    p = prepared(tmp_path, *big)
    mem = p.plan.memory
    assert mem["num_parameters"] > 1.5e9
    assert mem["parameters"] + mem["gradients"] + mem["optimizer"] == pytest.approx(16 * mem["num_parameters"] / 1e9)
    assert mem["activations_if_checkpointed"] < mem["activations"] / 2
    assert any("does not fit the 80 GB" in w and "strategy=zero1 fits" in w for w in p.plan.warnings), p.plan.warnings
    assert "warning: about" in p.text
    # With zero3 the model states shrink by the world size and the same job fits: no warning.
    fits = prepared(tmp_path, *big, "strategy=zero3")
    assert not fits.plan.warnings and fits.plan.memory["optimizer"] == pytest.approx(mem["optimizer"] * 12 / 8 / 8)
    # Too big for any sharding at this batch: the suggestion lowers the micro-batch, same effective batch.
    huge = prepared(tmp_path, *big, "train.per_device_train_batch_size=128", "strategy=zero3")
    warning = " ".join(huge.plan.warnings)
    assert "train.gradient_checkpointing=true" in warning and "per_device_train_batch_size=" in warning, warning


def test_custom_model_without_parameter_count_says_how_to_get_one(tmp_path):
    assert prepared(tmp_path, "model._target_=tests.user_code.Bigram", "+model.kwargs.vocab=256", "+hw=cpu").plan.warnings == []
    p = prepared(tmp_path, "model._target_=tests.user_code.Bigram", "+model.kwargs.vocab=256", "+hw=1xH100")
    assert p.plan.memory == {} and any("model.num_parameters" in w for w in p.plan.warnings)
    counted = prepared(tmp_path, "model._target_=tests.user_code.Bigram", "+model.kwargs.vocab=256", "model.num_parameters=65536")
    assert counted.plan.memory["num_parameters"] == 65536 and counted.plan.memory["parameters"] == pytest.approx(65536 * 4 / 1e9)


# -- paged optimizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_optimizers_refused_on_cpu_before_launch(optimizer, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([f"optimizer={optimizer}", "+hw=cpu", f"train.output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer" in err and "CUDA" in err and "optimizer=adamw" in err
    assert not run_dir.exists()
    # On a GPU profile the same choice plans (bitsandbytes runs on the ranks; not testable here).
    p = prepared(tmp_path, f"optimizer={optimizer}", "+hw=1xH100")
    assert p.config.optimizer.name == optimizer
