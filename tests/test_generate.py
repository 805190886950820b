"""Generations during evaluation (train.eval_prompts, trainer/generate.py): real 2-rank runs of the
shipped tiny Llama on the stdlib instruction set complete fixed prompts at each evaluation without
deadlock under ddp and zero3 (fsdp as a slow variant); the completions logged at the last step equal
what from_pretrained(final/) + generate gives in one process; a run with prompts computes the same
losses as one without (the training stream is untouched). Offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import SLOW_VARIANT, launcher_env, run_launcher

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

PROMPTS = ["What does json.dumps do?", "Which function of the math module does this: return the square root of x."]
NEW_TOKENS = 8
ARGS = (
    "model=llama_tiny", "data=stdlib_instruct", "data.seq_len=96", "train.max_steps=4", "train.per_device_train_batch_size=4",
    "train.logging_steps=1", "train.eval_strategy=steps", "train.eval_steps=2", "train.eval_max_batches=1", "train.eval_on_start=false",
    "train.save_strategy=no", "optimizer.learning_rate=3e-3", "scheduler=constant",
)
WITH_PROMPTS = (f"train.eval_prompts=[{','.join(json.dumps(p) for p in PROMPTS)}]", f"train.eval_max_new_tokens={NEW_TOKENS}")


def env(cache: Path) -> dict[str, str]:
    # Tokenized data goes to data.cache_dir (cached_args), not XDG_CACHE_HOME: DeepSpeed's
    # JIT-built ops live under the user's cache, and a fresh one rebuilds them (minutes).
    return launcher_env(**OFFLINE)


def cached_args(cache: Path) -> tuple[str, ...]:
    return (f"data.cache_dir={cache}",)


@pytest.fixture(scope="module")
def cache(hf_cache) -> Path:
    return hf_cache  # tests/conftest.py: one per session


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache):
    return run_launcher(tmp_path_factory.mktemp("ddp") / "run", *ARGS, *cached_args(cache), *WITH_PROMPTS, "strategy=ddp", env=env(cache))


def generation_events(run) -> list[dict]:
    return [m for m in run.metrics() if "generations" in m]


def reference(final: Path) -> list[str]:
    """The prompts completed in one process by the final model as a user loads it."""
    from transformers import AutoModelForCausalLM

    from trainer.generate import PromptFormat, encode_prompt, greedy_config
    from trainer.text_data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = load_tokenizer(str(final))
    out = []
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt, PromptFormat(format="messages"))
        with torch.no_grad():
            generated = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=greedy_config(tok, NEW_TOKENS))
        new = generated[0, len(ids):].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


def check_generations(run) -> None:
    assert run.result()["status"] == "completed"
    events = generation_events(run)
    assert [e["step"] for e in events] == [2, 4]  # at each evaluation
    assert all([g["prompt"] for g in e["generations"]] == PROMPTS for e in events)
    assert [g["completion"] for g in events[-1]["generations"]] == reference(run.run_dir / "final")


def test_prompts_are_completed_at_each_evaluation_and_leave_training_untouched(ddp_run, cache, tmp_path):
    check_generations(ddp_run)
    # The same run without prompts: the same losses, training and evaluation, bit for bit.
    plain = run_launcher(tmp_path / "plain", *ARGS, *cached_args(cache), "strategy=ddp", env=env(cache))
    assert not generation_events(plain)

    def numbers(run):
        return [(m["step"], m.get("loss"), m.get("eval_loss")) for m in run.metrics() if "loss" in m or "eval_loss" in m]

    assert numbers(ddp_run) == numbers(plain) and len(numbers(plain)) == 6
    # TensorBoard holds the completions as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ddp_run.run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert any("eval/generations" in tag for tag in events.Tags()["tensors"])
    # A prompt is written as training wrote the user turn: the chat template up to the assistant's turn.
    from trainer.generate import PromptFormat, encode_prompt
    from trainer.text_data import chat_template_of, encode_messages, load_tokenizer
    from launcher.hf_config import TextDataSpec, package_path

    tok = load_tokenizer(package_path("pkg:trainer/assets/llama_tiny"))
    ids, target = encode_messages([{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "json.dumps(obj)"}], tokenizer=tok, chat_template=chat_template_of(tok, TextDataSpec(format="messages")))
    assert encode_prompt(tok, PROMPTS[0], PromptFormat(format="messages")) == ids[: target.index(1)]


@pytest.mark.parametrize("strategy", ["zero3", pytest.param("fsdp", marks=SLOW_VARIANT)])
def test_sharded_strategies_generate_on_every_rank_without_deadlock(strategy, cache, tmp_path):
    # ddp_timeout bounds a deadlock: a rank left alone in a collective ends the job instead of hanging.
    run = run_launcher(tmp_path / "run", *ARGS, *cached_args(cache), *WITH_PROMPTS, f"strategy={strategy}", "train.ddp_timeout=120", env=env(cache), timeout=400)
    check_generations(run)


def test_prompts_for_a_model_without_generate_are_refused(tmp_path):
    run = run_launcher(tmp_path / "run", "train.eval_prompts=[hello]", "train.eval_strategy=steps", check=False)
    assert run.code == 2 and not (tmp_path / "run").exists()
    lines = [line for line in run.proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ringleader: error: train.eval_prompts:"), run.output
