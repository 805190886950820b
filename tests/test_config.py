"""Composition, validation and planning: what the launcher does before anything starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.__main__ import main
from tests.conftest import ROOT, launcher_env, run_launcher

# (override(s), the key the one-line error must name)
BAD_INPUTS = [
    # Transformers models and their text data (launcher/schema.py, launcher/validate.py check_transformers).
    (["model=hf", "model.name_or_path=/nonexistent/model", "data=stdlib_instruct"], "model.name_or_path"),
    (["model=llama_tiny", "model.device_map=auto", "data=stdlib_instruct"], "model.device_map"),
    (["model=llama_tiny", "model.dtype=float8", "data=stdlib_instruct"], "model.dtype"),
    (["model=llama_tiny", "data=jsonl", "data.paths=[/nonexistent/train.jsonl]"], "data.paths"),
    (["model=llama_tiny", "data=stdlib_instruct", "data.format=text"], "data.format"),
    (["model=llama_tiny", "data=stdlib_instruct", "data.packing=true", "model.attn_implementation=paged_attention"], "data.packing"),
    (["model=llama_tiny", "data=pystdlib"], "model"),
    (["data=stdlib_instruct", "data.seq_len=64"], "data.name"),
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
    (["train.metric_for_best_model=bleu"], "train.metric_for_best_model"),
    (["cluster.partition=gpu\nrm -rf /"], "cluster.partition"),
    (["data._target_=mypkg.MyData", "train.max_steps=-1"], "data.num_samples"),
    (["strategy.name=tensor_parallel"], "strategy.name"),
    # What a careless user types, group by group: each accepted before, failing on the ranks or never.
    (["hw.cpu_ranks=0"], "hw.cpu_ranks"),
    (["hw.cpu_ranks=-2"], "hw.cpu_ranks"),
    (["+hw=cpu", "hw.accelerator=tpu"], "hw.accelerator"),
    (["+hw=8xA100", "hw.gpus_per_node=-1", "dry_run=true"], "hw.gpus_per_node"),
    (["hw.cpus_per_node=-4"], "hw.cpus_per_node"),
    (["hw.gpu_memory_gb=-1"], "hw.gpu_memory_gb"),
    (["hw.peak_tflops_bf16=nan"], "hw.peak_tflops_bf16"),
    (["strategy=zero2", "strategy.zero_stage=3"], "strategy.zero_stage"),
    (["strategy=zero2", "strategy.offload_param=true"], "strategy.offload_param"),
    (["strategy=fsdp2"], "strategy"),
    (["strategy=ddp", "+strategy.deepspeed.zero_optimization.stage=2"], "strategy.deepspeed"),
    (["optimizer.learning_rate=inf"], "optimizer.learning_rate"),
    (["optimizer.learning_rate=nan"], "optimizer.learning_rate"),
    (["optimizer.learning_rate=0"], "optimizer.learning_rate"),
    (["optimizer.adam_beta1=-0.1"], "optimizer.adam_beta1"),
    (["optimizer.adam_epsilon=0"], "optimizer.adam_epsilon"),
    (["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum"),
    (["scheduler.warmup_steps=-1"], "scheduler.warmup_steps"),
    (["scheduler.warmup_ratio=-0.1"], "scheduler.warmup_ratio"),
    (["scheduler=cosine", "scheduler.num_cycles=0"], "scheduler.num_cycles"),
    (["scheduler=cosine_restarts"], "scheduler"),
    (["model._target_="], "model._target_"),
    (["model._target_=not a path"], "model._target_"),
    (["model.init_from=/etc/passwd"], "model.init_from"),
    (["model.init_from=/nonexistent/model.safetensors"], "model.init_from"),
    (["model.n_layer=0"], "model.n_layer"),
    (["model.n_head=0"], "model.n_head"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.block_size=0"], "model.block_size"),
    (["model.num_parameters=-5", "model._target_=tests.user_code.Bigram"], "model.num_parameters"),
    (["model=gpt_huge"], "model"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data.validation_fraction=-0.1"], "data.validation_fraction"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.max_bytes=-1"], "data.max_bytes"),
    (["data=text_files", "data.paths=[/nonexistent/*.txt]"], "data.paths.0"),
    (["data=synthetic", "data.num_samples=0"], "data.num_samples"),
    (["data._target_=bad path!", "train.max_steps=5"], "data._target_"),
    (["data.name=imagenet"], "data.name"),
    (["data=imagenet"], "data"),
    (["cluster.nodes=0"], "cluster.nodes"),
    (["cluster.nproc_per_node=-1"], "cluster.nproc_per_node"),
    (["cluster.max_restarts=-1"], "cluster.max_restarts"),
    (["cluster.max_requeues=-1"], "cluster.max_requeues"),
    (["cluster.time_min=0"], "cluster.time_min"),
    (["cluster.container_runtime=docker"], "cluster.container_runtime"),
    (["cluster.rdzv_port=70000"], "cluster.rdzv_port"),
    (["cluster.monitor_interval=0"], "cluster.monitor_interval"),
    (["cluster.cpus_per_task=-1"], "cluster.cpus_per_task"),
    (["cluster.mem_gb=-1"], "cluster.mem_gb"),
    (["cluster.gpus_per_node=-2"], "cluster.gpus_per_node"),
    (["cluster.max_nodes=-1"], "cluster.max_nodes"),
    (["cluster.signal_delay_s=-5"], "cluster.signal_delay_s"),
    (["cluster=kubernetes"], "cluster"),
    (["train.max_steps=-1", "train.num_train_epochs=inf"], "train.num_train_epochs"),
    (["train.max_steps=-5"], "train.max_steps"),
    (["train.per_device_eval_batch_size=0"], "train.per_device_eval_batch_size"),
    (["train.eval_steps=-1"], "train.eval_steps"),
    (["train.save_strategy=steps", "train.save_steps=0"], "train.save_steps"),
    (["train.save_total_limit=-1"], "train.save_total_limit"),
    (["train.seed=-1"], "train.seed"),
    (["train.ddp_timeout=0"], "train.ddp_timeout"),
    (["train.ddp_backend=mpi"], "train.ddp_backend"),
    (["train.eval_max_batches=-1"], "train.eval_max_batches"),
    (["train.early_stopping_threshold=-0.1"], "train.early_stopping_threshold"),
    (["train.early_stopping_patience=-1"], "train.early_stopping_patience"),
    (["train.report_to=[comet_ml]"], "train.report_to"),
    (["train.torch_compile_mode=fast"], "train.torch_compile_mode"),  # torch_compile itself works now (issue 15 item 4)
    (["train.metric_for_best_model=eval_bleu"], "train.metric_for_best_model"),
    (["train.resume=/etc"], "train.resume"),
    (["train.greater_is_better=maybe"], "train.greater_is_better"),
    (["train.learning_rate=3e-4"], "train.learning_rate"),
    (["train.max_steps=\u00fc"], "train.max_steps"),
    (["dry_run=maybe"], "dry_run"),
    (["foo=1"], "foo"),
]

# Inputs that need a real launch (not a dry run) to be refused: where the run directory would go.
BAD_PLACES = [
    ("train.output_dir=", "train.output_dir"),
    ("train.output_dir=/etc/passwd/run", "train.output_dir"),
    ("train.output_dir=/proc/ringleader-run", "train.output_dir"),
    ("train.logging_dir=/etc/passwd", "train.logging_dir"),
]


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """A current folder and a cache folder of their own, so a test can assert that nothing at all
    was written (a run directory, a Hydra folder, ringleader's dataset-listing cache)."""
    for name in ("cwd", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def written(sandbox: Path) -> list[str]:
    return sorted(str(p.relative_to(sandbox)) for p in sandbox.rglob("*") if p.name not in ("cwd", "cache"))


def assert_one_line(code: int, err: str, key: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"ringleader: error: {key}"), err


@pytest.mark.parametrize(("overrides", "key"), BAD_INPUTS, ids=[" ".join(o)[:50] for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_key_exit_2_and_nothing_written(overrides, key, sandbox, capsys):
    code = main([*overrides, f"train.output_dir={sandbox / 'run'}"])
    assert_one_line(code, capsys.readouterr().err.strip(), key)
    assert written(sandbox) == []


@pytest.mark.parametrize(("override", "key"), BAD_PLACES)
def test_a_run_directory_that_cannot_be_made_is_refused_before_anything(override, key, sandbox, capsys):
    code = main(["train.max_steps=1", override])
    assert_one_line(code, capsys.readouterr().err.strip(), key)
    assert written(sandbox) == []


def test_the_bad_input_matrix_covers_every_group():
    keys = {key for _, key in BAD_INPUTS} | {key for _, key in BAD_PLACES}
    assert len(BAD_INPUTS) + len(BAD_PLACES) >= 80
    for group in ("hw", "strategy", "optimizer", "scheduler", "model", "data", "cluster", "train"):
        assert sum(k.split(".")[0] == group for k in keys) >= 3, group


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
    assert p["steps_per_epoch"] == math.ceil(p["train_samples"] / 30)  # Trainer's count: the last partial step too (issue 15 item 1)
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
    # The new venv sees this interpreter's packages (hydra, omegaconf) through a .pth file: with
    # --system-site-packages it would see the system's, which inside a virtual environment (as most
    # users run the tests) are not the ones installed. Paths named in a .pth are not scanned for
    # .pth files themselves, so this checkout's editable install stays out of the way.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    (Path(inner) / "outer-packages.pth").write_text("\n".join(outer) + "\n")
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


# Verbs on run directories and sweep folders: (arguments, a text the one line must contain).
BAD_VERBS = [
    (["status"], "status needs a run directory"),
    (["status", "/nonexistent/run"], "/nonexistent/run is not a ringleader run directory"),
    (["status", "{sandbox}/existing/notrun"], "notrun is not a ringleader run directory"),
    (["logs", "{sandbox}/existing/run", "--bogus"], "--bogus"),
    (["logs", "{sandbox}/existing/run"], "no log yet"),
    (["logs", "{sandbox}/existing/run", "--slurm"], "no SLURM job"),
    (["cancel", "{sandbox}/existing/run"], "no SLURM job to cancel"),
    (["export"], "export needs a checkpoint folder"),
    (["export", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["export", "a", "b", "c"], "export needs a checkpoint folder"),
    (["export", "{sandbox}/existing/run"], "COMPLETE"),
    (["summary"], "summary needs a sweep folder"),
    (["summary", "/nonexistent/sweep"], "holds no trials"),
    (["statuss", "{sandbox}/existing/run"], "'statuss' is not an override"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_VERBS, ids=[" ".join(a)[:40] for a, _ in BAD_VERBS])
def test_bad_verb_input_is_one_line_exit_2_and_nothing_written(args, expected, sandbox, capsys):
    (sandbox / "existing" / "notrun").mkdir(parents=True)
    (sandbox / "existing" / "run").mkdir()
    (sandbox / "existing" / "run" / "config.yaml").write_text("train:\n  output_dir: run\n")
    before = written(sandbox)
    code = main([a.format(sandbox=sandbox) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ringleader: error: ") and expected in err, err
    assert written(sandbox) == before


BAD_SWEEPS = [
    (["optimizer.learning_rate=1e-3,-1"], "optimizer.learning_rate"),
    (["scheduler=cosine,nope"], "scheduler"),
    (["hw.cpu_ranks=1,0"], "hw.cpu_ranks"),
    (["train.max_steps=5,\u00fc"], "train.max_steps"),
    (["train.save_strategy=steps", "train.save_steps=0,10"], "train.save_steps"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_SWEEPS, ids=[" ".join(o)[:40] for o, _ in BAD_SWEEPS])
def test_a_sweep_with_a_bad_trial_starts_none_and_writes_nothing(overrides, key, sandbox):
    """The sweep folder (Hydra's, timestamped under the current folder) is not even created."""
    env = launcher_env(XDG_CACHE_HOME=str(sandbox / "cache"))
    proc = subprocess.run([sys.executable, "-m", "launcher", "-m", *overrides], capture_output=True, text=True, cwd=sandbox / "cwd", env=env, timeout=120)
    assert_one_line(proc.returncode, proc.stderr.strip(), key)
    assert "no trial was started" in proc.stderr or key == "train.max_steps"
    assert written(sandbox) == []


def test_a_folder_that_is_not_a_run_is_never_written_into(sandbox, capsys):
    """`train.output_dir=.` in a project folder would overwrite its config.yaml and fill it with
    logs and checkpoints: a folder with files and no plan.json is refused, untouched."""
    project = sandbox / "cwd"
    (project / "config.yaml").write_text("mine: true\n")
    before = written(sandbox)
    code = main(["train.output_dir=.", "train.max_steps=1"])
    assert_one_line(code, capsys.readouterr().err.strip(), "train.output_dir")
    assert (project / "config.yaml").read_text() == "mine: true\n" and written(sandbox) == before


def test_transformers_host_and_file_rules_are_one_line_and_write_nothing(sandbox, capsys, monkeypatch):
    """launcher/validate.py check_transformers: a hub id not cached while offline, a tokenizer
    without a chat template for format=messages, a field the data's first record lacks."""
    import shutil

    from launcher.hf_config import package_path

    files = sandbox / "files"
    shutil.copytree(package_path("pkg:trainer/assets/llama_tiny"), files / "tok")
    tok_cfg = files / "tok" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({k: v for k, v in json.loads(tok_cfg.read_text()).items() if k != "chat_template"}))
    (files / "d.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    before = written(sandbox)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["model=hf", "model.name_or_path=nobody/not-cached", "data=stdlib_instruct"], "model.name_or_path"),
        (["model=llama_tiny", f"model.tokenizer={files / 'tok'}", "data=stdlib_instruct"], "data.chat_template"),
        (["model=llama_tiny", "data=jsonl", f"data.paths=[{files / 'd.jsonl'}]", "data.format=prompt_completion"], "data.prompt_field"),
        (["model=llama_tiny", "data=jsonl", f"data.paths=[{files / 'd.jsonl'}]"], "data.text_field"),
    ]
    for overrides, key in cases:
        code = main([*overrides, f"train.output_dir={sandbox / 'run'}"])
        assert_one_line(code, capsys.readouterr().err.strip(), key)
        assert written(sandbox) == before
