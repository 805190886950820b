"""The strategy interface, and the parts DDP and FSDP share (autocast, scaler, clipping, DCP state)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from launcher.schema import RunConfig
from trainer.durable import FileInfo


@dataclass(frozen=True, kw_only=True)
class StepResult:
    grad_norm: torch.Tensor  # before clipping, over all ranks
    skipped: bool  # the update was not applied (non-finite gradients); the schedule did not advance
    # The skip was the fp16 loss scaler's: it lowered its scale and will try again. Expected now and
    # then, counted in skipped_steps; any other skip is a non-finite step (train.nonfinite decides).
    overflow: bool = False


class Strategy(ABC):
    """Wrap a model and its optimizer, run forward/backward/step, and save or load their state.

    Subclasses: DDP and FSDP2 (torch.distributed.checkpoint for state) and DeepSpeed ZeRO (its own
    engine and checkpoint format). The checkpoint manager calls save_state/load_state, and for an
    asynchronous save staged_state/write_state where a strategy has them (NativeStrategy).
    """

    model: nn.Module  # what forward runs on
    optimizer: torch.optim.Optimizer

    def __init__(self, *, cfg: RunConfig, device: torch.device, process_group=None) -> None:
        self.cfg = cfg
        self.device = device
        self.precision = "bf16" if cfg.train.bf16 else "fp16" if cfg.train.fp16 else "fp32"

    @abstractmethod
    def setup(self, model: nn.Module, *, total_steps: int, warmup_steps: int) -> None:
        """Wrap the model; build the optimizer and the schedule."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        """The loss of one micro-batch. Gradients of its backward are reduced across ranks only
        when `sync` (the last micro-batch of an optimizer step)."""
        self.set_gradient_sync(sync)
        with self.autocast():
            return self.model(input_ids, labels)

    def set_gradient_sync(self, sync: bool) -> None:
        pass

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, already divided by the accumulation steps."""

    @abstractmethod
    def step(self) -> StepResult:
        """Clip to max_grad_norm, apply the update unless gradients are non-finite, zero them,
        and advance the learning-rate schedule."""

    @property
    @abstractmethod
    def learning_rate(self) -> float: ...

    @abstractmethod
    def save_state(self, path: Path, *, process_group=None) -> dict[str, FileInfo] | None:
        """Write this rank's share of model, optimizer, schedule and scaler state under path.
        Return the files this rank wrote (relative to path), fsynced, with their size and CRC32,
        or None when the strategy cannot tell: the checkpoint manager then reads them back."""

    @abstractmethod
    def load_state(self, path: Path) -> None: ...

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated weights on the CPU, on rank 0 (other ranks may get an empty dict).
        Collective: every rank calls it."""

    @abstractmethod
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Initialise the weights from consolidated ones (warm start); every rank calls it."""

    def eval(self) -> None:
        self.model.eval()

    def train(self) -> None:
        self.model.train()

    def close(self) -> None:
        pass


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Per transformer block: ringleader's GPT has the switch; a user's model may define
    `gradient_checkpointing_enable()` as Hugging Face models do."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    elif hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
    else:
        raise ValueError("train.gradient_checkpointing: this model has no gradient_checkpointing switch; set it to false")
