"""Loading pretrained transformers weights the way that scales (trainer/safetensors_reader.py,
trainer/hf_model.py): the file reader returns what safetensors' own loader does, and under ZeRO-3
on 2 gloo ranks ringleader's rank-0 streaming load gives exactly from_pretrained's weights (fp32
and bf16, tied head), falling back to transformers' loader where it must (a slower variant).
Host memory is measured by benchmarks/bench_hf_load.py. Offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import SLOW_VARIANT
from trainer import hf_model
from trainer.hf_model import SHIPPED_TINY, HFModelSpec, build_causal_lm
from trainer.safetensors_reader import SafetensorsReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reader_reads_what_safetensors_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7, generator=g), "bf16": torch.randn(3, 4, generator=g).bfloat16(), "f16": torch.randn(9, generator=g).half(),
        "i64": torch.arange(-3, 9), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with SafetensorsReader([tmp_path / "model.safetensors"]) as reader, safe_open(str(tmp_path / "model.safetensors"), framework="pt") as ref:
        assert sorted(reader.keys()) == sorted(tensors)
        for name in tensors:
            got = reader.read(name)
            assert got.dtype == tensors[name].dtype and torch.equal(got, ref.get_tensor(name)), name
        out = torch.empty(5, 7)
        assert reader.read("f32", out=out) is out and torch.equal(out, tensors["f32"])  # straight into the target
        cast = torch.empty(3, 4)
        reader.read("bf16", out=cast)
        assert torch.equal(cast, tensors["bf16"].float())
        assert torch.equal(reader.read("bf16", dtype=torch.float32), tensors["bf16"].float())
        with pytest.raises(ValueError, match="shape"):
            reader.read("f32", out=torch.empty(7, 5))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="cut.safetensors"):
        SafetensorsReader([tmp_path / "cut.safetensors"])


def zero3_load(tmp_path, cases: dict[str, tuple[str, torch.dtype]]) -> None:
    """Load each case (name: (source folder, dtype)) on 2 ranks through trainer/build.py's zero3
    path (tests/assets/hf_zero3_load.py), then compare the gathered weights with from_pretrained's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = build_causal_lm(HFModelSpec(config=str(SHIPPED_TINY / "config.json")), seed=7)
    folder = hf_model.save_pretrained_dir(tmp_path / "src", src.state_dict(), config=src.config)
    legacy = tmp_path / "legacy"  # the same weights as .bin only: transformers' loader must take it
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy / "config.json")
    torch.save(src.state_dict(), legacy / "pytorch_model.bin")
    where = {"safetensors": folder, "bin": legacy}
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "tests", "assets", "hf_zero3_load.py")
    args = [f"{name}={where[kind]}:{str(dtype).removeprefix('torch.')}" for name, (kind, dtype) in cases.items()]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (kind, dtype) in cases.items():
        info = json.loads((tmp_path / f"{name}.json").read_text())
        assert info["fallback"] is (kind == "bin"), (name, info["said"])
        assert info["tied"] and info["training"] is False and info["inv_freq_dtype"] == "torch.float32", (name, info)
        assert info["dtype"] == str(dtype) and info["config_dtype"] == str(dtype), (name, info)
        assert info["local"] <= info["total"] // 2 + 1000  # partitioned: half the elements on rank 0
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert sorted(got) == sorted(ref), name
        for k, v in ref.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (name, k)
        if kind != "bin":
            assert info["name_or_path"] == str(folder)


def test_zero3_rank0_streaming_load_equals_from_pretrained(tmp_path):
    """2 ranks: each parameter partitioned as built, rank 0 reads each weight and scatters it into
    the partitions; the gathered weights equal from_pretrained's bit for bit, in fp32 and in bf16
    (zero.Init's dtype under train.bf16), the head tied, the module in eval mode as from_pretrained
    leaves it. The default suite's one real run of zero3 pretrained loading."""
    zero3_load(tmp_path, {"fp32": ("safetensors", torch.float32), "bf16": ("safetensors", torch.bfloat16)})


@SLOW_VARIANT
def test_zero3_bin_weights_go_through_transformers_loader(tmp_path):
    """A folder with .bin weights only: every rank agrees to hand it to transformers' ZeRO-3
    from_pretrained (the path ringleader used before), with the same weights."""
    zero3_load(tmp_path, {"bin": ("bin", torch.float32)})
