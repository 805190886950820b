"""LoRA adapters that load anywhere (issue 14 item 3): a LoRA run's final/ is the adapter in peft's
format, loaded by `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)`
with the trained model's logits, from every strategy (ddp, fsdp, zero3; zero2 as a slow
variant); export of a mid-run checkpoint writes the same adapter, and with --merge a plain
transformers folder whose logits are base plus adapter (check_final_and_export, run by
tests/test_lora.py on its one run per strategy); the check of what was written catches the
empty and partial adapters ZeRO-3 tools have saved (peft #453/#1402, trl #4416, DeepSpeed #7900).
2 CPU ranks, offline, a tiny random Llama saved as the pretrained base."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "trainer" / "assets" / "llama_tiny"
IDS = torch.arange(5, 45).reshape(2, 20)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained base: the shipped tiny Llama config with seeded random weights, saved as a
    from_pretrained folder with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("base") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY)).save_pretrained(folder)
    for f in TINY.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def adapted(base: Path, **peft: object):
    """The base with LoRA layers, as a LoRA run builds it (trainer/lora.py)."""
    from transformers import AutoModelForCausalLM

    from trainer.lora import apply_lora

    settings = {"method": "lora", "name": "lora", "r": 4, "lora_alpha": 8.0, **peft}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return apply_lora(model, settings, seed=0, base=str(base))


def loaded(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# -- the check, on files written in this process ------------------------------------------------


def test_the_check_catches_an_empty_partial_or_zero_adapter_and_passes_a_good_one(base, tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer.adapter_io import ADAPTER_WEIGHTS, AdapterError, adapter_final_files, check_adapter, expected_adapter, save_adapter

    model = adapted(base, modules_to_save=["lm_head"], bias="lora_only").eval()
    torch.manual_seed(1)
    with torch.no_grad():  # "trained": lora_B away from its zero start
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    expected = expected_adapter(model, device=torch.device("cpu"))
    assert any(k.endswith("lm_head.weight") for k in expected) and sum(".lora_B." in k for k in expected) == 28  # 4 layers x 7 linears
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    good = tmp_path / "good"
    good.mkdir()
    written = save_adapter(model, state, good, base=str(base))
    check_adapter(good, expected, written=written, base=str(base))
    # peft loads it onto the base and gives the adapted model's logits
    assert json.loads((good / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert torch.allclose(logits(loaded(base, good)), logits(model), atol=1e-6, rtol=0)

    tensors = load_file(str(good / ADAPTER_WEIGHTS))
    b = next(k for k in tensors if ".lora_B." in k)

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return folder

    cases = {
        "missing": (lambda t: t.pop(b), "missing (1 of"),
        "empty": (lambda t: t.__setitem__(b, torch.empty(0)), "another shape"),  # ZeRO-3's partitioned parameter, ungathered
        "zeros": (lambda t: t.__setitem__(b, torch.zeros_like(t[b])), "all zeros where the trained model's are not"),
        "partial": (lambda t: t.__setitem__(b, torch.cat([t[b][: len(t[b]) // 2], torch.zeros_like(t[b][len(t[b]) // 2 :])])), "other values"),
        "nan": (lambda t: t.__setitem__(b, torch.full_like(t[b], float("nan"))), "not finite"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(AdapterError, match=re.escape(message)) as caught:
            check_adapter(broken(name, change), expected, base=str(base))
        assert b in str(caught.value) and "DeepSpeed #7900" in str(caught.value)
    # The file on disk differs from what was handed to the writer, though each tensor looks plausible.
    swapped = broken("swapped", lambda t: t.__setitem__(b, -t[b]))
    with pytest.raises(AdapterError, match="other values"):
        check_adapter(swapped, expected, written=written, base=str(base))
    with pytest.raises(AdapterError, match="names base"):
        check_adapter(good, expected, base="/elsewhere")

    class UngatheredZero3:
        """A strategy stand-in whose gather returns ZeRO-3's partitioned parameters as they look
        without their gather (0 elements): what the writer got in DeepSpeed #7900."""

        device = torch.device("cpu")

        def __init__(self, model) -> None:
            self.model = model

        def full_state_dict(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
            return {n: torch.empty(0) for n, p in self.model.named_parameters() if p.requires_grad}

    with pytest.raises(AdapterError, match="another shape"):
        adapter_final_files(tmp_path / "final", UngatheredZero3(model), base=str(base), revision="", is_main=True)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".final*"))


# -- real runs ------------------------------------------------------------------------------------


def trained_model(base: Path, checkpoint: Path, *, r: int):
    """The model the run ended with, from its checkpoint's tensors (not through final/): the base
    with LoRA layers, the checkpoint's adapter tensors loaded by name."""
    from trainer.export import read_dcp_model, read_deepspeed_model

    weights = read_dcp_model(checkpoint / "dcp") if (checkpoint / "dcp").is_dir() else read_deepspeed_model(checkpoint)
    model = adapted(base, r=r, lora_alpha=2.0 * r)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names <= weights.keys()
    model.load_state_dict({n: weights[n] for n in names}, strict=False)
    return model.eval()


def assert_final_is_the_trained_adapter(run, base: Path, *, r: int, steps: int) -> None:
    final = run.run_dir / "final"
    assert run.result()["status"] == "completed"
    files = sorted(p.name for p in final.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "tokenizer.json", ".ringleader-export"} <= set(files)
    assert "model.safetensors" not in files  # not the base weights
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == r and config["peft_type"] == "LORA"
    trained = trained_model(base, run.run_dir / "checkpoints" / f"step-{steps}", r=r)
    assert torch.allclose(logits(loaded(base, final)), logits(trained), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(trained), logits(adapted(base, r=r, lora_alpha=2.0 * r).eval()), atol=1e-4)  # it did train


def export(*args: str) -> int:
    from launcher.__main__ import main

    return main(["export", *args])


def check_final_and_export(run, base: Path, tmp_path: Path, *, r: int, steps: int, merge: bool) -> None:
    """What a LoRA run of any strategy must leave: final/ is the trained adapter, loaded by peft;
    export of the last checkpoint writes the same adapter; with `merge`, export --merge writes a
    plain transformers folder whose logits are base plus adapter. tests/test_lora.py calls this on
    its one run per strategy (the runs are shared, not made twice)."""
    assert_final_is_the_trained_adapter(run, base, r=r, steps=steps)
    from safetensors.torch import load_file

    checkpoint = run.run_dir / "checkpoints" / f"step-{steps}"
    out = tmp_path / "exported"
    assert export(str(checkpoint), str(out)) == 0
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(run.run_dir / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((run.run_dir / "final" / "adapter_config.json").read_text())
    if not merge:
        return
    # --merge: a plain transformers folder, base plus adapter
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    assert export(str(checkpoint), str(merged_dir), "--merge") == 0
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(logits(merged), logits(loaded(base, run.run_dir / "final")), atol=1e-5, rtol=0)
    # re-export into the same folder without --merge: the merged weights go, the adapter comes
    assert export(str(checkpoint), str(merged_dir)) == 0
    assert (merged_dir / "adapter_config.json").is_file() and not (merged_dir / "model.safetensors").exists()