"""The fine-tuning demo (README "Fine-tune with LoRA (offline demo)", conf/demo/) at a reduced size:
the two commands a user pastes, `+demo=pretrain` then `+demo=lora`, on 2 CPU ranks, offline. The
LoRA run evaluates before its first step and after its last: the eval loss on response tokens goes
down, and the fixed prompts are completed at both (metrics.jsonl)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import launcher_env, run_launcher

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)


def test_demo_pretrains_then_lora_lowers_the_eval_loss_and_logs_generations(hf_cache: Path, tmp_path: Path) -> None:
    # The instruction set is tokenized into the session's data.cache_dir (tests/conftest.py), which
    # the other tests of this tokenizer share: not a fresh XDG_CACHE_HOME, where DeepSpeed's JIT
    # ops would be rebuilt too.
    env = launcher_env(**OFFLINE)
    pretrain = run_launcher(
        tmp_path / "pretrain", "+demo=pretrain", "train.max_steps=10", "train.per_device_train_batch_size=8", "train.eval_strategy=no", "train.logging_steps=5",
        "data.kwargs.max_bytes=400000", env=env,
    )
    assert pretrain.result()["status"] == "completed" and (tmp_path / "pretrain" / "final" / "config.json").is_file()
    lora = run_launcher(
        tmp_path / "lora", "+demo=lora", f"model.name_or_path={tmp_path / 'pretrain' / 'final'}", f"data.cache_dir={hf_cache}", "train.max_steps=12", "train.eval_steps=12",
        "train.eval_max_new_tokens=6", env=env,
    )
    assert lora.result()["status"] == "completed"
    evals = [m for m in lora.metrics() if "eval_loss" in m]
    assert [e["step"] for e in evals] == [0, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    generations = [m for m in lora.metrics() if "generations" in m]
    assert [g["step"] for g in generations] == [0, 12] and all(len(g["generations"]) == 3 for g in generations)
