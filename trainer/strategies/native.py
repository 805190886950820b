"""What DDP and FSDP2 share: optimizer, schedule, fp16 scaler, clipping, and state through
torch.distributed.checkpoint (tensors) plus JSON (everything else, so nothing is pickled)."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.durable import FileInfo, write_file
from trainer.optim import build_optimizer, build_scheduler
from trainer.strategies.base import LOSS_SCALE, NONFINITE, StagedState, StepResult, Strategy, prepare_model, unwrap


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


@contextmanager
def without_zip_crc32() -> Iterator[None]:
    """torch.save, which DCP runs for every tensor, computes a CRC32 of each record of its zip
    format. Nothing reads it (torch.load does not check it) and the COMPLETE marker holds a CRC32
    of every whole file, so it only cost time: ~20% of a save. A process-wide setting, so it is
    restored at once; a torch.save of another thread in between only lacks that unused CRC."""
    if not hasattr(torch.serialization, "set_crc32_options"):  # torch < 2.6 always computes it
        yield
        return
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def dcp_save(tensors: dict[str, torch.Tensor], folder: Path, *, process_group=None) -> dict[Path, FileInfo]:
    """DCP save of `tensors` into folder; return the size and CRC32 of each file this rank wrote,
    already fsynced (so the checkpoint manager does not read them back). DCP's own per-file syncs
    are off: ChecksummingFileSystem fsyncs every file once, as it closes it."""
    import torch.distributed.checkpoint as dcp

    from trainer.safe_dcp import ChecksummingFileSystem

    writer = dcp.FileSystemWriter(str(folder), sync_files=False)
    writer.fs = ChecksummingFileSystem()
    with without_zip_crc32():
        dcp.save(tensors, storage_writer=writer, process_group=process_group)
    return writer.fs.written


def is_dtensor(t: torch.Tensor) -> bool:
    """Without importing torch.distributed.tensor (~1 s per rank): only FSDP makes DTensors, and
    it has imported it."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def same_layout(buffer: Any, t: Any) -> bool:
    """Whether a staging buffer kept from the previous save can take `t`."""
    if buffer is None or type(buffer) is not type(t) or buffer.shape != t.shape or buffer.dtype != t.dtype:
        return False
    return not is_dtensor(t) or (buffer.placements == t.placements and buffer.device_mesh == t.device_mesh)


def local(t: Any) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


class NativeStrategy(Strategy):
    """DDP and FSDP2: subclasses wrap the model (`wrap`) and control gradient sync (`set_gradient_sync`)."""

    _staged: threading.Event | None = None  # set when an asynchronous save has copied the state
    staging_wait_s: float = 0.0  # total time training waited for asynchronous saves' copies

    def setup(self, model: nn.Module, *, total_steps: int, warmup_steps: int) -> None:
        # A meta-built model (transformers weights under fsdp) gets its tensors in wrap, sharded.
        meta = any(p.is_meta for p in model.parameters())
        prepare_model(model, self.cfg.train)  # NEFTune, torch.compile per block: before DDP or fully_shard, as torchtitan
        self.model = self.wrap(model if meta else model.to(self.device))
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.scheduler, total_steps=total_steps, warmup_steps=warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def backward_scaled(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # With max_norm 0 the norm is still computed, for logging; inf leaves gradients unchanged.
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)

    def step(self) -> StepResult:
        self.wait_for_staging()
        self.scaler.unscale_(self.optimizer)
        norm = self.clip_grad_norm(self.cfg.train.max_grad_norm)
        finite = bool(torch.isfinite(norm))
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # with fp16 the scaler itself skips non-finite steps
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:  # as transformers' Trainer: the schedule advances only with an applied update
            self.scheduler.step()
        skipped = None if finite else LOSS_SCALE if self.scaler.is_enabled() else NONFINITE
        return StepResult(grad_norm=norm.detach(), skipped=skipped)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- state -----------------------------------------------------------------------------------

    # torch.distributed.checkpoint is imported where a checkpoint is saved or loaded, not at start-up
    # (trainer/safe_dcp.py says why).

    def state_options(self) -> Any:
        """A LoRA run's checkpoint holds the trainable parameters (the adapter) and their optimizer
        state, not the frozen base: that comes from model.name_or_path again on resume
        (trainer/checkpoint.py records which base it was and refuses another)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        lora = self.cfg.peft.enabled
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def tensor_state(self, *, model_only: bool = False) -> dict[str, Any]:
        """The model's and the optimizer's tensors; `model_only` (train.save_only_model): the model's."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if model_only:
            model_sd, optim_sd = get_model_state_dict(self.model, options=self.state_options()), None
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options())
        if self.cfg.peft.enabled:  # ignore_frozen_params keeps a tied alias of a frozen weight (lm_head of a tied embedding)
            trainable = {n for n, p in unwrap(self.model).named_parameters() if p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k in trainable}
        return {"model": model_sd} if model_only else {"model": model_sd, "optimizer": optim_sd}

    def extra_state(self, skeleton: Any, *, model_only: bool = False) -> dict[str, Any]:
        """What goes to strategy.json: the state dict without its tensors, schedule and scaler
        (`model_only`: the skeleton, and that it holds the model only)."""
        if model_only:
            return {"skeleton": skeleton, "model_only": True}
        return {"skeleton": skeleton, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def save_state(self, path: Path, *, process_group=None, model_only: bool = False) -> dict[str, FileInfo]:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(self.tensor_state(model_only=model_only), "", tensors)
        return self.write_state(path, tensors, self.extra_state(skeleton, model_only=model_only), process_group=process_group)

    def write_state(self, path: Path, tensors: dict[str, torch.Tensor], extra: dict[str, Any], *, process_group=None) -> dict[str, FileInfo]:
        """The tensors through DCP (every rank its shards), the rest as JSON (rank 0). Returns the
        files this rank wrote, by path relative to `path`, each fsynced, with size and CRC32."""
        written = {p.relative_to(path.absolute()).as_posix(): info for p, info in dcp_save(tensors, path / "dcp", process_group=process_group).items()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            written["strategy.json"] = write_file(path / "strategy.json", json.dumps(extra).encode())
        return written

    def staged_state(self, staged: threading.Event, *, model_only: bool = False) -> StagedState:
        """For an asynchronous save, at a step boundary: CPU buffers for the tensors, the rest of
        the state (a copy), and `copy`, which fills the buffers with the state as it is now.

        The caller runs `copy` on its writer thread and then sets `staged`; until then step() and
        the loads wait for it (wait_for_staging). So the copy overlaps the next forward and
        backward, which only read parameters and optimizer state, and the checkpoint still holds
        this step's state however soon training changes it (pytorch #144657 was an asynchronous
        save that did not copy). Module buffers are copied at once: a forward may change them
        (BatchNorm statistics, DDP's broadcast of buffers). The CPU buffers are kept from the
        previous save (the manager waits for that one to finish first): allocating ~state-size
        fresh memory at every save costs more than the copy (page faults)."""
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(self.tensor_state(model_only=model_only), "", tensors)
        extra = json.loads(json.dumps(self.extra_state(skeleton, model_only=model_only)))  # a copy: step() changes them
        module_buffers = {f"/model/{name}" for name, _ in unwrap(self.model).named_buffers()}
        cache: dict[str, torch.Tensor] = self.__dict__.setdefault("_staging", {})
        out, later = {}, []
        for key, value in tensors.items():
            value = value.detach()
            if not same_layout(cache.get(key), value):
                cache[key] = torch.empty_like(value, device="cpu")  # a DTensor's: its shard on the CPU
            out[key] = cache[key]
            pair = (local(cache[key]), local(value))
            if key in module_buffers:
                pair[0].copy_(pair[1])
            else:
                later.append(pair)

        def copy() -> None:
            for buffer, value in later:
                buffer.copy_(value)

        self._staged = staged
        return out, extra, copy

    def wait_for_staging(self) -> None:
        """Called before anything changes parameters, optimizer state or schedule: an asynchronous
        save may still be copying them (staged_state)."""
        if self._staged is not None:
            start = time.perf_counter()
            self._staged.wait()
            self.staging_wait_s += time.perf_counter() - start
            self._staged = None

    def load_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        from trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

        self.wait_for_staging()
        extra = json.loads((path / "strategy.json").read_text())
        model_only = extra.get("model_only") is True  # train.save_only_model: weights only, the optimizer and scaler stay as built
        tensors: dict[str, torch.Tensor] = {}
        split_tensors(self.tensor_state(model_only=model_only), "", tensors)
        # Read (and refuse) crafted metadata here, where its error is one line: inside dcp.load it
        # comes back wrapped in a CheckpointException with every rank's traceback.
        SafeFileSystemReader(str(path / "dcp")).read_metadata()
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path / "dcp")), planner=SafeLoadPlanner())
        state = join_tensors(extra["skeleton"], tensors)
        if model_only:
            set_model_state_dict(self.model, state["model"], options=self.state_options())
            return
        optim = state["optimizer"]
        for group in optim.get("param_groups", []):
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optim, options=self.state_options())
        self.scheduler.load_state_dict(extra["scheduler"])
        if extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def full_state_dict(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(self.model, options=options)  # type: ignore[return-value]  # tensors only

