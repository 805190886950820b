"""What DDP and FSDP2 share: optimizer, schedule, fp16 scaler, clipping, and state through
torch.distributed.checkpoint (tensors) plus JSON (everything else, so nothing is pickled)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from trainer.optim import build_optimizer, build_scheduler
from trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner
from trainer.strategies.base import StepResult, Strategy


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state dict by {"__tensor__": key}; collect them by key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def int_keys(state: dict) -> dict:
    """JSON turns the optimizer's integer parameter ids into strings; turn them back."""
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in state.items()}


def dcp_writer(folder: Path) -> dcp.FileSystemWriter:
    """DCP's writer without its own fsyncs: the checkpoint manager fsyncs every file once, before
    it writes the COMPLETE marker (DCP's per-file syncs made a save ~1.5x slower here)."""
    return dcp.FileSystemWriter(str(folder), sync_files=False)


class NativeStrategy(Strategy):
    """DDP and FSDP2: subclasses wrap the model (`wrap`) and control gradient sync (`backward`)."""

    def setup(self, model: nn.Module, *, total_steps: int, warmup_steps: int) -> None:
        self.model = self.wrap(model.to(self.device))
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.scheduler, total_steps=total_steps, warmup_steps=warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # With max_norm 0 the norm is still computed, for logging; inf leaves gradients unchanged.
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)

    def step(self) -> StepResult:
        self.scaler.unscale_(self.optimizer)
        norm = self.clip_grad_norm(self.cfg.train.max_grad_norm)
        finite = bool(torch.isfinite(norm))
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # with fp16 the scaler itself skips non-finite steps
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(grad_norm=norm.detach(), skipped=not finite)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- state -----------------------------------------------------------------------------------

    def tensor_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save_state(self, path: Path, *, process_group=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(self.tensor_state(), "", tensors)
        dcp.save(tensors, storage_writer=dcp_writer(path / "dcp"), process_group=process_group)
        if not dist.is_initialized() or dist.get_rank() == 0:
            extra = {"skeleton": skeleton, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
            (path / "strategy.json").write_text(json.dumps(extra))

    def staged_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A copy of the state taken now, for an asynchronous save: training may change the
        parameters as soon as this returns (the bug of pytorch #144657 was not copying CPU tensors).
        Plain tensors are copied into CPU buffers kept from the previous save (the manager waits
        for that one to finish first): allocating ~state-size fresh memory at every save costs
        more than the copy (page faults), and would be most of what an async save blocks."""
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(self.tensor_state(), "", tensors)
        cache: dict[str, torch.Tensor] = self.__dict__.setdefault("_staging", {})
        staged = {}
        for k, v in tensors.items():
            v = v.detach()
            buffer = cache.get(k)
            if type(v) is torch.Tensor and buffer is not None and buffer.shape == v.shape and buffer.dtype == v.dtype:
                staged[k] = buffer.copy_(v)
            else:  # the first save, or a DTensor shard (FSDP): a fresh copy
                staged[k] = v.to("cpu", copy=True)
                if type(v) is torch.Tensor:
                    cache[k] = staged[k]
        extra = {"skeleton": skeleton, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        return staged, extra

    def load_state(self, path: Path) -> None:
        extra = json.loads((path / "strategy.json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        split_tensors(self.tensor_state(), "", tensors)
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path / "dcp")), planner=SafeLoadPlanner())
        state = join_tensors(extra["skeleton"], tensors)
        optim = state["optimizer"]
        for group in optim.get("param_groups", []):
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optim)
        self.scheduler.load_state_dict(extra["scheduler"])
        if extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
