"""Composition, validation and planning: what the launcher does before anything starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from launcher.__main__ import main
from tests.conftest import ROOT, launcher_env, run_launcher

# (override(s), the key the one-line error must name)
BAD_INPUTS = [
    (["train.foo=1"], "train.foo"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["optimizer=adamx"], "optimizer"),
    (["+hw=9xA100"], "hw"),
    (["optimizer.learning_rate=-1"], "optimizer.learning_rate"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["optimizer.adam_beta2=1.5"], "optimizer.adam_beta2"),
    (["train.bf16=true", "train.fp16=true"], "train.fp16"),
    (["+hw=4xV100", "train.bf16=true", "cluster=local"], "train.bf16"),
    (["+hw=cpu", "train.fp16=true"], "train.fp16"),
    (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size"),
    (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps"),
    (["train.max_steps=-1", "train.num_train_epochs=0"], "train.num_train_epochs"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm"),
    (["train.logging_steps=0"], "train.logging_steps"),
    (["train.eval_strategy=sometimes"], "train.eval_strategy"),
    (["train.save_strategy=always"], "train.save_strategy"),
    (["train.load_best_model_at_end=true", "train.eval_strategy=no"], "train.load_best_model_at_end"),
    (["train.load_best_model_at_end=true", "train.eval_strategy=steps", "train.eval_steps=30", "train.save_strategy=steps", "train.save_steps=50"], "train.save_steps"),
    (["train.early_stopping_patience=2", "train.eval_strategy=no"], "train.early_stopping_patience"),
    (["scheduler.warmup_ratio=1.5"], "scheduler.warmup_ratio"),
    (["scheduler.name=exponential"], "scheduler.name"),
    (["optimizer=sgd", "optimizer.name=lion"], "optimizer.name"),
    (["+hw=cpu", "optimizer.name=paged_adamw_8bit"], "optimizer"),
    (["cluster.nodes=2"], "cluster.nodes"),
    (["cluster.max_nodes=2", "cluster.nodes=4", "cluster.name=slurm"], "cluster.nodes"),
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd"),
    (["data.seq_len=512"], "data.seq_len"),
    (["data.validation_fraction=1.0"], "data.validation_fraction"),
    (["model.vocab_size=100"], "model.vocab_size"),
    (["data=text_files"], "data.paths"),
    (["data=tokens_bin", "data.seq_len=128", "data.paths=[/nonexistent/train.bin]"], "data.paths"),
    (["train.resume=/nonexistent/checkpoints/step-5"], "train.resume"),
    (["train.nonfinite=ignore"], "train.nonfinite"),
    (["+hw=cpu", "train.ddp_backend=nccl"], "train.ddp_backend"),
    (["+hw=8xA100", "cluster=local"], "hw"),
    (["train.per_device_train_batch_size=100000"], "train.per_device_train_batch_size"),
    (["train.metric_for_best_model=accuracy"], "train.metric_for_best_model"),
    (["cluster.partition=gpu\nrm -rf /"], "cluster.partition"),
    (["data._target_=mypkg.MyData", "train.max_steps=-1"], "data.num_samples"),
    (["strategy.name=tensor_parallel"], "strategy.name"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_INPUTS, ids=[" ".join(o)[:50] for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_key_exit_2_and_nothing_written(overrides, key, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main([*overrides, f"train.output_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"ringleader: error: {key}"), err
    assert not run_dir.exists()


def test_bad_input_through_the_command(tmp_path):
    run = run_launcher(tmp_path / "run", "optimizer.learning_rate=-3e-4", check=False)
    assert run.code == 2
    assert run.proc.stderr.strip() == "ringleader: error: optimizer.learning_rate: must be > 0, got -0.0003; set e.g. optimizer.learning_rate=3e-4"
    assert run.proc.stdout == ""
    assert not (tmp_path / "run").exists()


def plan_for(tmp_path, capsys, *overrides: str) -> dict:
    """The plan a dry run prints, read back from the Plan object the launcher builds."""
    from launcher.compose import compose
    from launcher.prepare import prepare

    prepared = prepare(compose([*overrides, f"train.output_dir={tmp_path / 'run'}", "dry_run=true"]))
    return prepared.plan.to_dict()


def test_derived_values_follow_training_arguments(tmp_path, capsys):
    p = plan_for(tmp_path, capsys, "+hw=cpu", "train.per_device_train_batch_size=3", "train.gradient_accumulation_steps=5", "train.max_steps=-1", "train.num_train_epochs=2.5", "scheduler.warmup_steps=0", "scheduler.warmup_ratio=0.1")
    assert p["world_size"] == 2
    assert p["effective_batch_size"] == 3 * 2 * 5
    assert p["steps_per_epoch"] == p["train_samples"] // 30
    assert p["total_steps"] == math.ceil(2.5 * p["steps_per_epoch"])
    assert p["warmup_steps"] == math.ceil(0.1 * p["total_steps"])
    assert p["tokens_per_step"] == 30 * 128


def test_max_steps_wins_and_warmup_steps_win(tmp_path, capsys):
    p = plan_for(tmp_path, capsys, "train.max_steps=77", "train.num_train_epochs=3", "scheduler.warmup_steps=7", "scheduler.warmup_ratio=0.5")
    assert p["total_steps"] == 77
    assert p["warmup_steps"] == 7


def test_transformers_agrees_on_warmup_and_steps(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    p = plan_for(tmp_path, capsys, "train.max_steps=-1", "train.num_train_epochs=0.3", "scheduler.warmup_ratio=0.07")
    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio)
    ratio = {"warmup_ratio": 0.07} if "warmup_ratio" in transformers.TrainingArguments.__dataclass_fields__ else {"warmup_steps": 0.07}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=0.3, report_to=[], **ratio)
    assert args.get_warmup_steps(p["total_steps"]) == p["warmup_steps"]


@pytest.mark.parametrize(("profile", "nproc", "backend"), [("cpu", 2, "gloo"), ("8xA100", 8, "nccl"), ("8xH100", 8, "nccl"), ("1xH100", 1, "nccl"), ("4xV100", 4, "nccl"), ("8xH200", 8, "nccl")])
def test_hardware_profiles(profile, nproc, backend, tmp_path, capsys):
    p = plan_for(tmp_path, capsys, f"+hw={profile}", "cluster=local")
    assert (p["nproc_per_node"], p["backend"]) == (nproc, backend)


def test_without_hw_the_launcher_describes_this_machine(tmp_path, capsys):
    p = plan_for(tmp_path, capsys)
    import os

    cpus = len(os.sched_getaffinity(0))
    assert p["accelerator"] == "cpu" and p["nproc_per_node"] == 2
    assert p["threads_per_rank"] == max(1, cpus // 2)
    assert p["env"]["OMP_NUM_THREADS"] == str(max(1, cpus // 2))


def test_dry_run_prints_the_plan_and_the_exact_command_without_torch(tmp_path):
    code = (
        "import sys; from launcher.__main__ import main; rc = main(sys.argv[1:]);"
        "bad = [m for m in ('torch', 'deepspeed', 'accelerate') if m in sys.modules];"
        "assert not bad, bad; sys.exit(rc)"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, "dry_run=true", f"train.output_dir={run_dir}"], capture_output=True, text=True, env=launcher_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "effective" in proc.stdout and "world size 2" in proc.stdout
    assert f"--nproc_per_node=2 --standalone --max_restarts=0 --monitor_interval=0.5 --module trainer {run_dir}" in proc.stdout
    assert not run_dir.exists()


def test_print_config(capsys):
    assert main(["--cfg", "job", "optimizer=sgd"]) == 0
    out = capsys.readouterr().out
    assert "name: sgd" in out and "per_device_train_batch_size" in out


def test_user_config_dir_adds_a_model(tmp_path, capsys):
    conf = tmp_path / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "wide.yaml").write_text("name: wide\n_target_: trainer.model.GPT\nn_layer: 1\nn_head: 2\nn_embd: 256\n")
    assert main(["--config-dir", str(tmp_path / "myconf"), "model=wide", "dry_run=true", f"train.output_dir={tmp_path / 'r'}"]) == 0
    assert "wide / pystdlib" in capsys.readouterr().out


def test_conf_ships_in_the_wheel(tmp_path):
    """A wheel installed into a fresh venv finds conf/ (as launcher/conf) from any folder."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    wheel = next(wheels.glob("ringleader-*.whl"))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in launcher_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "launcher", "dry_run=true", "optimizer=sgd", f"train.output_dir={tmp_path / 'r'}"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sgd lr" in proc.stdout
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import launcher.paths as p; print(p.config_dir())"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert str(venv) in located.stdout, located.stdout


def test_plan_json_and_config_yaml_are_what_ranks_read(tmp_path):
    run_dir = tmp_path / "run"
    code = main(["train.max_steps=3", f"train.output_dir={run_dir}", "dry_run=false", "cluster.nproc_per_node=1", "train.export_final=false", "train.save_strategy=no", "train.eval_strategy=no"])
    assert code == 0
    plan = json.loads((run_dir / "plan.json").read_text())
    from trainer.runtime import load_run

    cfg, plan_read = load_run(run_dir)
    assert plan_read == plan
    assert cfg.train.output_dir == str(run_dir)
    assert cfg.hw.accelerator == "cpu"
    assert (run_dir / "result.json").exists()
