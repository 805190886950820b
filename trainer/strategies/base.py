"""The strategy interface, and the parts DDP and FSDP share (autocast, scaler, clipping, DCP state)."""

from __future__ import annotations

import contextlib
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from launcher.schema import RunConfig, TrainConfig
from trainer.durable import FileInfo
from trainer.model_io import Batch, EvalStatistics, loss_sum_and_count

# Why a step's update was not applied (StepResult.skipped); the schedule did not advance either.
LOSS_SCALE = "loss_scale"  # the fp16 loss scaler's overflow: it lowered its scale and tries again; expected now and then
NONFINITE = "nonfinite"  # non-finite gradients: train.nonfinite decides (stop with an error, or skip)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    grad_norm: torch.Tensor  # before clipping, over all ranks
    skipped: str | None = None  # None: the update was applied; else LOSS_SCALE or NONFINITE


# An asynchronous save's parts (Strategy.staged_state): CPU buffers for the tensors, the rest of the
# state, and the copy that fills the buffers.
StagedState = tuple[dict[str, torch.Tensor], dict[str, Any], Callable[[], None]]


class Strategy(ABC):
    """Wrap a model and its optimizer, run forward/backward/step, and save or load their state.

    Subclasses: DDP and FSDP2 (torch.distributed.checkpoint for state) and DeepSpeed ZeRO (its own
    engine and checkpoint format). The checkpoint manager calls save_state/load_state, and for an
    asynchronous save staged_state/write_state (NativeStrategy; others save synchronously).

    The loss is token-exact: the loop calls `loss` on each micro-batch (the summed cross-entropy
    of its labelled tokens) and `backward(loss_sum, tokens=...)` with the labelled tokens of the
    whole optimizer step on all ranks; the strategy maps that onto its own gradient reduction.
    """

    model: nn.Module  # what forward runs on
    optimizer: torch.optim.Optimizer

    def __init__(self, *, cfg: RunConfig, device: torch.device, process_group=None) -> None:
        self.cfg = cfg
        self.device = device
        self.precision = "bf16" if cfg.train.bf16 else "fp16" if cfg.train.fp16 else "fp32"
        # Ranks whose gradients the reduction averages (DDP's all-reduce, FSDP's reduce-scatter and
        # ZeRO's reduction all divide by it): backward multiplies it back in for a token-exact loss.
        self.data_parallel_size = dist.get_world_size() if dist.is_initialized() else 1

    @abstractmethod
    def setup(self, model: nn.Module, *, total_steps: int, warmup_steps: int) -> None:
        """Wrap the model; build the optimizer and the schedule."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def loss(self, batch: Batch, *, sync: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed cross-entropy of one micro-batch's labelled tokens, and their count
        (trainer/model_io.py). Gradients of its backward are reduced across ranks only when `sync`
        (the last micro-batch of an optimizer step)."""
        self.set_gradient_sync(sync)
        with self.autocast():
            return loss_sum_and_count(self.model, batch, label_smoothing=self.cfg.train.label_smoothing_factor if self.model.training else 0.0)

    def evaluate_batch(self, statistics: EvalStatistics, batch: Batch) -> None:
        """One evaluation batch's forward into `statistics` (trainer/model_io.py), under autocast."""
        with self.autocast():
            statistics.update(self.model, batch)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        """The mean loss of one micro-batch (for a single micro-batch: tests and benchmarks)."""
        total, count = self.loss({"input_ids": input_ids, "labels": labels}, sync=sync)
        return total / count.clamp(min=1)

    def set_gradient_sync(self, sync: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor, *, tokens: int | None = None) -> None:
        """Backward of one micro-batch. With `tokens` (the labelled tokens of the whole optimizer
        step, over all ranks), `loss` is the micro-batch's summed cross-entropy, and the gradients
        after the step's reduction are those of (sum over every micro-batch of every rank) / tokens.
        Without, `loss` is already normalised and the ranks' gradients are averaged as usual."""
        if tokens is not None:
            loss = loss * (self.data_parallel_size / max(tokens, 1))
        self.backward_scaled(loss)

    @abstractmethod
    def backward_scaled(self, loss: torch.Tensor) -> None:
        """Backward of a loss whose gradients the strategy's reduction then averages over ranks."""

    @abstractmethod
    def step(self) -> StepResult:
        """Clip to max_grad_norm, apply the update unless gradients are non-finite, zero them,
        and advance the learning-rate schedule; say whether (and why) the update was skipped."""

    @property
    @abstractmethod
    def learning_rate(self) -> float: ...

    @abstractmethod
    def save_state(self, path: Path, *, process_group=None, model_only: bool = False) -> dict[str, FileInfo] | None:
        """Write this rank's share of model, optimizer, schedule and scaler state under path;
        `model_only` (train.save_only_model): the model's weights only (a LoRA run's: the adapter).
        Return the files this rank wrote (relative to path), fsynced, with their size and CRC32,
        or None when the strategy cannot tell: the checkpoint manager then reads them back."""

    @abstractmethod
    def load_state(self, path: Path) -> None:
        """Load what save_state wrote; a model-only checkpoint loads the weights and leaves the
        optimizer, schedule and scaler as they are (the checkpoint manager places the schedule)."""

    def staged_state(self, staged: threading.Event, *, model_only: bool = False) -> StagedState | None:
        """For an asynchronous save: the state copied at this step boundary (NativeStrategy says
        how), written later by write_state. None: this strategy saves synchronously only."""
        return None

    def write_state(self, path: Path, tensors: dict[str, torch.Tensor], extra: dict[str, Any], *, process_group=None) -> dict[str, FileInfo] | None:
        """Write what staged_state returned; only strategies that stage implement it."""
        raise NotImplementedError(f"{type(self).__name__} saves synchronously only")

    @abstractmethod
    def full_state_dict(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Consolidated weights on the CPU, on rank 0 (other ranks may get an empty dict).
        Collective: every rank calls it. `trainable_only`: the parameters that train (a LoRA
        adapter) and the buffers, not the frozen weights."""

    def discard_gradients(self) -> None:
        """Drop the gradients of a step that is not applied but run again (an out-of-memory error
        in one of its micro-batches: trainer/autobatch.py)."""
        self.model.zero_grad(set_to_none=True)

    def eval(self) -> None:
        self.model.eval()

    def train(self) -> None:
        self.model.train()


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Per transformer block: ringleader's GPT and transformers models have Hugging Face's switch
    `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`, non-reentrant unless
    `kwargs` (train.gradient_checkpointing_kwargs: torch.utils.checkpoint's arguments) say otherwise;
    a user's model may define it too, or a `gradient_checkpointing` attribute (then no kwargs)."""
    kwargs = dict(kwargs or {})
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "config"):
        from trainer.hf_model import enable_gradient_checkpointing as hf_enable

        hf_enable(model, kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": kwargs} if kwargs else {}))  # type: ignore[operator]
    elif hasattr(model, "gradient_checkpointing") and not kwargs:
        setattr(model, "gradient_checkpointing", True)
    elif hasattr(model, "gradient_checkpointing"):
        raise ValueError("train.gradient_checkpointing_kwargs: this model's switch is an attribute that takes no arguments; give it gradient_checkpointing_enable(gradient_checkpointing_kwargs=...), or drop them")
    else:
        raise ValueError("train.gradient_checkpointing: this model has no gradient_checkpointing switch; set it to false")


def neftune_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """NEFTune (Jain et al. 2023, as transformers' Trainer): in training only, uniform noise in
    [-alpha/sqrt(L*d), alpha/sqrt(L*d)] added to the input embeddings of a [B, L, d] batch."""
    if not module.training:
        return output
    alpha: float = getattr(module, "neftune_noise_alpha")
    bound = alpha / math.sqrt(output.size(1) * output.size(2))
    return output + torch.zeros_like(output).uniform_(-bound, bound)


def activate_neftune(model: nn.Module, alpha: float) -> None:
    """train.neftune_noise_alpha: the noise hook on the model's input embeddings (transformers'
    get_input_embeddings(), which ringleader's GPT has too)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_embeddings) or not isinstance(embeddings := get_embeddings(), nn.Module):
        raise ValueError(f"train.neftune_noise_alpha: {type(model).__name__} has no get_input_embeddings() to add noise to; give it one (as transformers models have), or drop it")
    embeddings.neftune_noise_alpha = alpha  # type: ignore[assignment]
    embeddings.register_forward_hook(neftune_hook)


def prepare_model(model: nn.Module, t: TrainConfig) -> None:
    """What every strategy applies to the plain model before wrapping or sharding it: NEFTune's
    hook on the embeddings, then torch.compile of each transformer block (trainer/compile.py)."""
    if t.neftune_noise_alpha:
        activate_neftune(model, t.neftune_noise_alpha)
    if t.torch_compile:
        from trainer.compile import apply_compile

        apply_compile(model, t)
