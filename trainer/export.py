"""Consolidated weights any PyTorch user can load: final/model.safetensors and final/config.yaml.

    from safetensors.torch import load_file
    model = GPT(**yaml.safe_load(open("final/config.yaml"))["model"]["kwargs"])   # or your own class
    model.load_state_dict(load_file("final/model.safetensors"))

The end of a run writes final/; `python -m launcher export CHECKPOINT_DIR [OUT_DIR]` writes the
same two files from any checkpoint of a DDP or FSDP run, on any machine, in one process with no
process group (torch.distributed.checkpoint reshards N ranks' shards into the plain model).
"""

from __future__ import annotations

import os
import shutil
import warnings
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
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, folder)


def write_final(folder: Path, strategy, cfg: RunConfig, *, is_main: bool) -> None:
    state = strategy.full_state_dict()  # collective
    if is_main:
        save_consolidated(folder, state, cfg)
    if dist.is_initialized():
        dist.barrier()


def export_checkpoint(checkpoint: Path, out: Path | None = None) -> Path:
    """Write model.safetensors + config.yaml from a checkpoint folder into `out` (by default
    <run>/exports/<checkpoint name>/). Raises CheckpointError naming a bad file."""
    from trainer.build import build_model
    from trainer.checkpoint import CheckpointError, verify

    checkpoint = checkpoint.expanduser().resolve()
    verify(checkpoint)  # every file against the COMPLETE marker, before anything is read
    config = checkpoint / "config.yaml"
    if not config.is_file():  # checkpoints from before the config was saved with them
        config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{checkpoint / 'config.yaml'}: missing, and no run config at {config}; the model cannot be rebuilt")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(config)))
    if not (checkpoint / "dcp").is_dir():
        raise CheckpointError(f"{checkpoint / 'dcp'}: missing; export reads torch.distributed.checkpoint folders (DDP, FSDP). For a DeepSpeed checkpoint, resume it and let the run end: it writes final/")
    model = build_model(cfg.model)
    state = {f"/model/{k}": v for k, v in model.state_dict(keep_vars=False).items()}
    load_dcp_tensors(checkpoint / "dcp", state)
    weights = {k.removeprefix("/model/"): v for k, v in state.items()}
    model.load_state_dict(weights, strict=True)  # the shapes and names fit the model
    out = (out or checkpoint.parent.parent / "exports" / checkpoint.name).expanduser().resolve()
    save_consolidated(out, model.state_dict(), cfg)
    return out


def load_dcp_tensors(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill `state` in place from a DCP folder, in this process alone, without unsafe unpickling."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.checkpoint import CheckpointError
    from trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{folder}: cannot read the model's tensors ({type(exc).__name__}: {exc})") from exc
