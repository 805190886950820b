"""--from-training-args: the JSON transformers itself writes becomes a ringleader command line whose
overrides compose and validate to the same values; fields without an equivalent are refused, named."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.compose import compose
from launcher.migrate import TRAINER_DEFAULTS, Refused, load_arguments, overrides_for
from tests.conftest import ROOT, launcher_env

transformers = pytest.importorskip("transformers")

# A typical QLoRA-style fine-tuning setup.
FINETUNE = dict(
    learning_rate=2e-4, optim="paged_adamw_32bit", max_grad_norm=0.3, per_device_train_batch_size=2, gradient_accumulation_steps=8,
    lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1, logging_steps=10, save_strategy="steps", save_steps=50,
    save_total_limit=3, weight_decay=0.001, report_to="none", seed=1234, per_device_eval_batch_size=4, eval_strategy="steps",
    eval_steps=25, load_best_model_at_end=True, metric_for_best_model="loss", run_name="qlora-1", gradient_checkpointing=True,
)


def training_args_json(tmp_path: Path, name: str = "args.json", *, bf16: bool = True, **kwargs) -> Path:
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer-out"), **kwargs)
    if bf16:
        args.bf16 = True  # after __post_init__: its bf16 check wants a GPU, which this machine lacks
    path = tmp_path / name
    path.write_text(args.to_json_string())
    return path


def migrate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "--from-training-args", str(path)], capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=60)


def test_defaults_table_is_this_transformers(tmp_path):
    """The table migrate.py keeps (the launcher never imports transformers) equals TrainingArguments()."""
    written = json.loads(transformers.TrainingArguments(output_dir=str(tmp_path)).to_json_string())
    written.pop("output_dir")
    assert {k: TRAINER_DEFAULTS[k] for k in written} == written


def test_finetuning_arguments_become_overrides_that_compose_to_the_same_values(tmp_path):
    path = training_args_json(tmp_path, **FINETUNE)
    proc = migrate(path)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[:3] == ["python", "-m", "launcher"] and words[3:5] == ["optimizer=paged_adamw_32bit", "scheduler=cosine"]
    overrides = words[3:]
    cfg = compose(overrides).config
    o, s, t = cfg.optimizer, cfg.scheduler, cfg.train
    assert (o.name, o.learning_rate, o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_epsilon) == ("paged_adamw_32bit", 2e-4, 0.001, 0.9, 0.999, 1e-8)
    assert (s.name, s.warmup_steps, s.warmup_ratio, s.lr_scheduler_kwargs) == ("cosine", 0, 0.03, {})
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_grad_norm, t.num_train_epochs, t.max_steps) == (2, 8, 0.3, 1.0, -1)
    assert (t.bf16, t.fp16, t.gradient_checkpointing, t.seed, t.report_to, t.run_name) == (True, False, True, 1234, [], "qlora-1")
    assert (t.logging_steps, t.logging_first_step, t.eval_strategy, t.eval_steps, t.eval_max_batches, t.per_device_eval_batch_size) == (10, False, "steps", 25, 0, 4)
    assert (t.save_strategy, t.save_steps, t.save_total_limit, t.load_best_model_at_end, t.metric_for_best_model) == ("steps", 50, 3, True, "eval_loss")
    assert t.output_dir == str(tmp_path / "trainer-out")
    # ... and validate as a whole, as the user would run it (paged AdamW needs a CUDA profile).
    dry = subprocess.run([sys.executable, "-m", "launcher", *overrides, "+hw=1xH100", "dry_run=true"], capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=60)
    assert dry.returncode == 0, dry.stderr


def test_schedule_kwargs_and_optim_args_and_trackers_travel(tmp_path):
    path = training_args_json(
        tmp_path, bf16=False, optim="adafactor", optim_args="beta1=0.9", lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-6, "num_cycles": 0.75}, warmup_steps=20, report_to=["wandb", "mlflow"], max_steps=300,
    )
    proc = migrate(path)
    assert proc.returncode == 0, proc.stderr
    cfg = compose(shlex.split(proc.stdout)[3:]).config
    assert (cfg.optimizer.name, cfg.optimizer.optim_args, cfg.optimizer.learning_rate) == ("adafactor", "beta1=0.9", 5e-5)
    assert (cfg.scheduler.name, cfg.scheduler.lr_scheduler_kwargs, cfg.scheduler.num_cycles, cfg.scheduler.warmup_steps) == ("cosine_with_min_lr", {"min_lr": 1e-6}, 0.75, 20)
    assert cfg.train.report_to == ["wandb", "mlflow"] and cfg.train.max_steps == 300
    cfg.check()


def test_the_migration_imports_no_torch_or_transformers(tmp_path):
    path = training_args_json(tmp_path, **FINETUNE)
    code = f"import sys; from launcher.migrate import main_from_training_args as m; assert m([{str(path)!r}]) == 0; bad = {{'torch', 'transformers'}} & set(sys.modules); assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_fields_without_an_equivalent_are_refused_naming_all_of_them(tmp_path):
    path = training_args_json(tmp_path, bf16=False, torch_empty_cache_steps=10, push_to_hub=True, optim="lion_32bit", use_liger_kernel=True, logging_strategy="epoch", do_train=True)
    proc = migrate(path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ringleader: error: --from-training-args {path}: no ringleader equivalent for ")
    for field in ("optim=lion_32bit", "torch_empty_cache_steps=10", "push_to_hub=true", "use_liger_kernel=true", "logging_strategy=\"epoch\""):
        assert field in lines[0], field
    assert "do_train" not in lines[0]  # Trainer does not read it either: a note, not a refusal


def test_a_trainer_checkpoint_folder(tmp_path):
    """A folder with training_args.json is read; one with only training_args.bin (a pickle) is
    refused without unpickling it."""
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    training_args_json(folder, "training_args.json", **FINETUNE)
    assert load_arguments(folder)["learning_rate"] == 2e-4
    pickled = tmp_path / "checkpoint-1000"
    pickled.mkdir()
    (pickled / "training_args.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(Refused, match="training_args.bin, a pickle"):
        load_arguments(pickled)
    proc = migrate(pickled)
    assert proc.returncode == 2 and "training_args.bin" in proc.stderr


def test_older_names_from_transformers_4(tmp_path):
    """Files saved by transformers 4 name the ratio warmup_ratio and the evaluation evaluation_strategy."""
    args = json.loads(training_args_json(tmp_path, bf16=False).read_text())
    args.pop("eval_strategy")
    args.update(warmup_ratio=0.1, evaluation_strategy="epoch", overwrite_output_dir=True)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(args))
    overrides, notes = overrides_for(load_arguments(path))
    cfg = compose(overrides).config
    assert (cfg.scheduler.warmup_ratio, cfg.train.eval_strategy) == (0.1, "epoch")
    assert any(n.startswith("overwrite_output_dir") for n in notes)
