"""LoRA through peft (issue 14 items 1, 2 and 4's refusals), run as a user runs it: a random tiny
Llama saved with save_pretrained once per module is the pretrained base (`model=hf
model.name_or_path=BASE peft=lora`), trained on 2 CPU ranks on gloo, offline.

One run per strategy (ddp, fsdp, zero2, zero3; 4 steps, accumulation 2, a checkpoint every 2
steps) serves several tests: the same losses on every strategy, the frozen base unchanged bit for
bit (each rank checks what it holds at the end and logs it), the adapter alone in the checkpoint
with its optimizer state, the plan's count of what trains. Resumes reuse a run's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint_tools import log_of, read_dcp
from tests.conftest import ROOT, SLOW_VARIANT, Run, launcher_env, run_launcher

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
LOSS_RTOL = 1e-5  # tests/test_strategies.py's: only the order of fp32 reductions differs
ADAPTER = (".lora_A.", ".lora_B.")


def args(base: Path, *extra: str, cache: Path | None = None) -> list[str]:
    return [
        *([f"data.cache_dir={cache}"] if cache else []), "model=hf", f"model.name_or_path={base}", "peft=lora", "peft.r=8", "peft.lora_alpha=16", "peft.lora_dropout=0",
        "data=stdlib_instruct", "data.seq_len=64", "train.max_steps=4", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
        "train.logging_steps=1", "train.eval_strategy=no", "train.eval_on_start=false", "train.save_strategy=steps", "train.save_steps=2",
        "train.save_total_limit=0", "train.report_to=[]", "optimizer.learning_rate=1e-2", "scheduler=constant", *extra,
    ]


def env(cache: Path) -> dict[str, str]:
    return launcher_env(**OFFLINE)  # the tokenized data goes to data.cache_dir (args); DeepSpeed's JIT-built ops stay in the user's cache


def losses(run: Run) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.metrics() if "loss" in m}


@pytest.fixture(scope="module")
def cache(hf_cache) -> Path:
    return hf_cache  # tests/conftest.py: one per session


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained base: the shipped tiny Llama's config with random weights, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shipped = ROOT / "trainer" / "assets" / "llama_tiny"
    folder = tmp_path_factory.mktemp("base") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shipped)).save_pretrained(folder)
    for f in shipped.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    return folder


class Runs(dict):
    """One run per strategy, made when a test first asks for it (a -k selection runs only those)."""

    def __init__(self, root: Path, base: Path, cache: Path) -> None:
        super().__init__()
        self.root, self.base, self.cache = root, base, cache

    def __missing__(self, strategy: str) -> Run:
        self[strategy] = run_launcher(self.root / strategy, *args(self.base, f"strategy={strategy}", cache=self.cache), env=env(self.cache), timeout=900)
        return self[strategy]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base, cache) -> dict[str, Run]:
    return Runs(tmp_path_factory.mktemp("lora"), base, cache)


def adapted(base: Path, r: int = 8):
    """The PeftModel ringleader trains, built here the same way (for names and counts)."""
    from transformers import AutoModelForCausalLM

    from launcher.schema import PeftConfig
    from trainer.lora import apply_lora

    return apply_lora(AutoModelForCausalLM.from_pretrained(base), PeftConfig(name="lora", method="lora", r=r, lora_alpha=16), base=str(base))


# zero2 is zero3's DeepSpeed path without the partitioned parameters: a slower variant, as in
# tests/test_hf_training.py (the default run stays one run per behaviour).
ZERO2 = pytest.param("zero2", marks=SLOW_VARIANT)


@pytest.mark.parametrize("strategy", ["fsdp", ZERO2, "zero3"])
def test_same_losses_as_ddp(runs, strategy):
    ref, got = losses(runs["ddp"]), losses(runs[strategy])
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert abs(ref[step] - got[step]) <= LOSS_RTOL * abs(ref[step]), f"{strategy} step {step}: loss {got[step]} vs ddp {ref[step]}"
    assert ref[4] < ref[1]  # the adapter learns


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", ZERO2, "zero3"])
def test_only_the_adapter_trains_and_the_base_stays_bit_for_bit(runs, base, strategy):
    run = runs[strategy]
    assert run.result()["status"] == "completed"
    for rank in (0, 1):  # each rank compared what it holds (its shards, partitions or share) with the base's file
        log = log_of(run.run_dir, rank)
        line = next(ln for ln in log.splitlines() if "peft: frozen base weights unchanged" in ln)
        assert int(line.split("unchanged: ")[1].split()[0]) > 0, line
    model = adapted(base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if any(a in n for a in ADAPTER)}
    memory = run.plan()["memory"]
    assert memory["num_trainable_parameters"] == trainable  # counted from config.json, without torch
    assert memory["frozen_parameters"] > 0 and memory["optimizer"] < memory["frozen_parameters"]
    assert "M train (lora r 8)" in run.proc.stdout and "frozen parameters" in run.proc.stdout


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_holds_the_adapter_and_its_optimizer_state_only(runs, base, strategy):
    run = runs[strategy]
    tensors = read_dcp(run.run_dir / "checkpoints" / "step-4" / "dcp")
    model_keys = {k for k in tensors if k.startswith("/model/")}
    optim_keys = {k for k in tensors if k.startswith("/optimizer/state/")}
    adapter = {n for n, _ in adapted(base).named_parameters() if any(a in n for a in ADAPTER)}
    assert {k.removeprefix("/model/") for k in model_keys} == adapter
    assert {k.split("/")[3] for k in optim_keys} == adapter  # /optimizer/state/<name>/exp_avg...
    state = json.loads((run.run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["peft_base"]["folder"] == str(base) and "model.safetensors" in state["peft_base"]["files"]


@pytest.mark.parametrize("strategy", [ZERO2, "zero3"])
def test_deepspeed_checkpoint_holds_no_base_weights(runs, base, strategy):
    folder = runs[strategy].run_dir / "checkpoints" / "step-4"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < (base / "model.safetensors").stat().st_size / 2  # adapter + Adam state + fp32 master: a fraction of the base


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", ZERO2, "zero3"])
def test_final_adapter_loads_with_peft_and_export_merges(runs, base, strategy, tmp_path):
    """final/ is the trained adapter in peft's format, export writes the same, --merge (on the fsdp
    run) a plain transformers folder: tests/test_lora_export.py's checks, on this file's runs."""
    from tests.test_lora_export import check_final_and_export

    check_final_and_export(runs[strategy], base, tmp_path, r=8, steps=4, merge=strategy == "fsdp")


def test_interrupted_and_resumed_ends_bit_identical(runs, base, cache, tmp_path):
    """The fsdp run as if it had crashed after its step-2 checkpoint: the same command resumes
    (base from model.name_or_path on the meta device, the adapter and its optimizer from the
    checkpoint) and ends with the same bits."""
    done = runs["fsdp"]
    run_dir = tmp_path / "fsdp"
    shutil.copytree(done.run_dir, run_dir)
    for gone in ("checkpoints/step-4", "final"):
        shutil.rmtree(run_dir / gone, ignore_errors=True)
    (run_dir / "result.json").unlink()
    resumed = run_launcher(run_dir, *args(base, "strategy=fsdp", cache=cache), env=env(cache), timeout=900)
    assert any(m.get("event") == "resume" and m["step"] == 2 for m in resumed.metrics())
    want, got = read_dcp(done.run_dir / "checkpoints" / "step-4" / "dcp"), read_dcp(run_dir / "checkpoints" / "step-4" / "dcp")
    assert sorted(want) == sorted(got)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, differ[:3]


def test_resume_from_2_ranks_on_1(runs, base, cache, tmp_path):
    """The ddp run's step-2 checkpoint resumed on one process (batch 4, the same 8 samples a step):
    it ends where the 2-rank run ended, within fp32 rounding."""
    run_dir = tmp_path / "one"
    shutil.copytree(runs["ddp"].run_dir, run_dir)
    for gone in ("checkpoints/step-4", "final"):
        shutil.rmtree(run_dir / gone, ignore_errors=True)
    (run_dir / "result.json").unlink()
    one = ("cluster.nproc_per_node=1", "train.per_device_train_batch_size=4", "train.resume_with_changed_config=true")
    resumed = run_launcher(run_dir, *args(base, "strategy=ddp", *one, cache=cache), env=env(cache), timeout=900)
    assert any(m.get("event") == "resume" and m["step"] == 2 for m in resumed.metrics())
    want, got = read_dcp(runs["ddp"].run_dir / "checkpoints" / "step-4" / "dcp"), read_dcp(run_dir / "checkpoints" / "step-4" / "dcp")
    for k in (k for k in want if k.startswith("/model/")):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_resume_on_a_changed_base_is_refused(base, tmp_path):
    """The checkpoint records its base (folder, config.json's hash, weight files' sizes and times):
    resuming after the base changed is refused, before any state is loaded."""
    from trainer.checkpoint import CheckpointManager, ConfigChangedError

    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    config = {"peft": {"method": "lora"}, "model": {"name_or_path": str(copy), "revision": ""}}
    manager = CheckpointManager(tmp_path / "ck", rank=0, world_size=1, device=torch.device("cpu"), save_total_limit=0, config_hash="x", config=config)
    state = {"peft_base": manager.peft_base()}
    manager.check_base(tmp_path, state)  # the same base: fine
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    later = CheckpointManager(tmp_path / "ck", rank=0, world_size=1, device=torch.device("cpu"), save_total_limit=0, config_hash="x", config=config)
    with pytest.raises(ConfigChangedError, match="model.safetensors changed"):
        later.check_base(tmp_path, state)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=llama_tiny", "data=stdlib_instruct", "peft=lora"], "model.name_or_path: peft=lora trains an adapter for pretrained weights"),
        (["peft=lora"], "peft.method: lora adapts a transformers model, but model=gpt_tiny"),
        (["model=hf", "model.name_or_path=BASE", "data=stdlib_instruct", "peft=qlora"], "peft.method: qlora loads the base in 4 bits with bitsandbytes, which needs CUDA"),
        (["model=hf", "model.name_or_path=BASE", "data=stdlib_instruct", "peft=qlora", "strategy=fsdp", "+hw=1xH100"], "peft.bnb_4bit_quant_storage: is bfloat16, but strategy=fsdp"),
        (["peft.r=4"], "peft.r: is a LoRA setting, but peft.method=none"),
    ],
)
def test_bad_input_is_refused_with_one_line_and_nothing_written(base, cache, tmp_path, overrides, message):
    overrides = [o.replace("BASE", str(base)) for o in overrides]
    before = sorted(p.name for p in cache.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "launcher", *overrides, f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=launcher_env(XDG_CACHE_HOME=str(cache), **OFFLINE), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists() and sorted(p.name for p in cache.rglob("*")) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA (bitsandbytes' 4-bit kernels); this machine has none, and the launcher refuses it (test above)")
def test_qlora_trains_on_a_gpu(base, cache, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    run = run_launcher(
        tmp_path / "qlora", *args(base, "peft=qlora", "peft.r=8", "model.dtype=bfloat16", "train.bf16=true", "cluster.nproc_per_node=1", "train.per_device_train_batch_size=4", cache=cache),
        env=env(cache),
    )
    steps = losses(run)
    assert sorted(steps) == [1, 2, 3, 4] and steps[4] < steps[1]
    assert "4-bit ones not compared" in log_of(run.run_dir, 0)


def test_the_end_of_run_check_catches_a_frozen_weight_that_moved(base):
    """check_frozen_unchanged (run by every rank at the end of a LoRA run) against the base's file,
    in one process: the untouched model passes, one changed frozen weight is named."""
    from trainer.lora import check_frozen_unchanged

    model = adapted(base)
    checked, _ = check_frozen_unchanged(model)
    assert checked > 0
    name, p = next((n, p) for n, p in model.named_parameters() if not p.requires_grad and "layers.0" in n and p.dim() == 2)
    with torch.no_grad():
        p[0, 0] += 1
    with pytest.raises(RuntimeError, match=f"frozen base weight {name} changed"):
        check_frozen_unchanged(model)
