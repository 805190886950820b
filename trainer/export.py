"""Consolidated weights any PyTorch user can load: final/model.safetensors and final/config.yaml.

    from safetensors.torch import load_file
    model = GPT(**yaml.safe_load(open("final/config.yaml"))["kwargs"])   # or your own class
    model.load_state_dict(load_file("final/model.safetensors"))
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import save_file

from launcher.schema import RunConfig
from trainer.build import model_kwargs


def save_consolidated(folder: Path, state: dict[str, torch.Tensor], cfg: RunConfig) -> None:
    """Write weights and config into folder atomically (a .tmp folder renamed at the end)."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage, which safetensors refuses: each key gets its own copy.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "ringleader"})
    model = {"_target_": cfg.model._target_, "name": cfg.model.name, "kwargs": model_kwargs(cfg.model)}
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml({"model": model, "run": OmegaConf.structured(cfg)}))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        os.replace(folder, old)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, folder)


def write_final(folder: Path, strategy, cfg: RunConfig, *, is_main: bool) -> None:
    state = strategy.full_state_dict()  # collective
    if is_main:
        save_consolidated(folder, state, cfg)
    if dist.is_initialized():
        dist.barrier()
