"""DeepSpeed ZeRO 1/2/3 (and offload) behind the strategy interface: the engine owns the optimizer,
the partitioning, accumulation boundaries and clipping; its config comes from the schema
(launcher/deepspeed_config.py), the learning-rate schedule is ringleader's LambdaLR.

How the interface maps onto the engine:
  forward(sync)  -> engine.set_gradient_accumulation_boundary(sync), then engine(...)
  backward(loss)  -> engine.backward(loss, scale_wrt_gas=False): the loss is already normalised by
                    the step's global token count (Strategy.backward), so the engine must not divide
                    it by its gradient_accumulation_steps (what scale_wrt_gas=True does, DeepSpeed
                    0.19 engine.backward). Its per-output hook that would divide too stands aside
                    when engine.backward runs (the graph is registered as scaled). ZeRO's reduction
                    averages over the data-parallel ranks, which Strategy.backward multiplies back.
  step()         -> engine.step() once per optimizer step (DeepSpeed's documented pattern for an
                    explicit boundary); clipping, the skip on non-finite gradients and the schedule
                    happen inside; the norm is the engine's, before clipping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from launcher.deepspeed_config import deepspeed_config
from trainer.durable import FileInfo, write_file
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.strategies.base import LOSS_SCALE, NONFINITE, StepResult, Strategy, prepare_model
from trainer.strategies.native import dcp_save, split_tensors

log = logging.getLogger("ringleader")
TAG = "deepspeed"  # the sub-folder of every checkpoint; always passed, DeepSpeed's `latest` is never used


def safe_load(path: str, map_location=None) -> dict:
    """torch.load with weights_only=True: tensors, containers and four DeepSpeed classes with
    plain attributes (an enum, two loss scalers, a two-int dataclass), nothing else. DeepSpeed
    itself calls torch.load with weights_only=False, which runs whatever a file pickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def adapter_only(engine):
    """The engine's module_state_dict for a LoRA run's checkpoint: DeepSpeed's
    exclude_frozen_parameters drops frozen parameters by name, but keeps a tied alias of one (the
    lm_head of a tied embedding); only the trainable parameters are kept here."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        state = DeepSpeedEngine.module_state_dict(engine, destination, prefix, keep_vars, exclude_frozen_parameters)
        if not exclude_frozen_parameters:
            return state
        trainable = {prefix + n for n, p in engine.module.named_parameters() if p.requires_grad}
        return type(state)((k, v) for k, v in state.items() if k in trainable)

    return module_state_dict


class DeepSpeedStrategy(Strategy):
    def setup(self, model: nn.Module, *, total_steps: int, warmup_steps: int) -> None:
        import deepspeed

        # Reuses the process group init_runtime made (gloo on CPU, nccl on GPUs).
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo", dist_init_required=False)
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.config = deepspeed_config(self.cfg, world_size=world)
        prepare_model(model, self.cfg.train)  # NEFTune, torch.compile per block: before the engine wraps and partitions it
        client_optimizer = None if "optimizer" in self.config else build_optimizer(model, self.cfg.optimizer)

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return build_scheduler(optimizer, self.cfg.scheduler, total_steps=total_steps, warmup_steps=warmup_steps)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, self.cfg.optimizer.weight_decay) if client_optimizer is None else None,
            optimizer=client_optimizer,
            lr_scheduler=schedule,
            config=self.config,
            dist_init_required=False,
        )
        self.model = self.engine
        self.stage = self.config["zero_optimization"]["stage"]
        self.engine.checkpoint_engine.load = safe_load  # DeepSpeed's own load unpickles anything
        if self.cfg.peft.enabled:
            self.engine.module_state_dict = adapter_only(self.engine)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed holds the module in bf16/fp16 itself

    def set_gradient_sync(self, sync: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(sync)

    def backward_scaled(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = math.nan
        norm_t = norm.detach().float().cpu() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
        # The engine advances the schedule only when it applied the update (an fp16 overflow skips
        # both), as transformers' Trainer does.
        skipped = LOSS_SCALE if not applied else None if bool(torch.isfinite(norm_t)) else NONFINITE
        return StepResult(grad_norm=norm_t, skipped=skipped)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def eval(self) -> None:
        self.engine.eval()

    def train(self) -> None:
        self.engine.train()

    # -- state -----------------------------------------------------------------------------------

    def save_state(self, path: Path, *, process_group=None, model_only: bool = False) -> dict[str, FileInfo] | None:
        """DeepSpeed's own sharded format under path/deepspeed/ (every rank its optimizer
        partition). Collective over the default group; the manager's marker decides completeness.
        `model_only` (train.save_only_model): save_model_only."""
        if model_only:
            return self.save_model_only(path, process_group=process_group)
        # A LoRA run saves the trainable parameters only: the frozen base comes from model.name_or_path.
        self.engine.save_checkpoint(str(path), tag=TAG, client_state={}, save_latest=False, exclude_frozen_parameters=self.cfg.peft.enabled)
        return None

    def save_model_only(self, path: Path, *, process_group=None) -> dict[str, FileInfo]:
        """train.save_only_model: the fp32 weights (a LoRA run's: the adapter) consolidated on rank 0
        as final/ takes them, written by rank 0 through DCP with strategy.json: the layout of a DDP
        checkpoint, so `export` and load_state read it as one, and it loads on any world size.
        DeepSpeed's own format has no weights-only form under ZeRO-3 (its module holds partitions)."""
        state = self.full_state_dict(trainable_only=self.cfg.peft.enabled)  # collective; {} off rank 0
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors({"model": state}, "", tensors)
        written = {p.relative_to(path.absolute()).as_posix(): info for p, info in dcp_save(tensors, path / "dcp", process_group=process_group).items()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            written["strategy.json"] = write_file(path / "strategy.json", json.dumps({"skeleton": skeleton, "model_only": True}).encode())
        return written

    def load_model_only(self, path: Path) -> None:
        """A save_model_only checkpoint: every rank reads the whole (DCP, in this process alone)
        and sets its partitions of the fp32 master weights and the module's from it. The optimizer,
        schedule and loss scale stay as built. A LoRA run's holds the adapter: the frozen base
        stays as loaded from model.name_or_path."""
        import torch.distributed.checkpoint as dcp

        from trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

        wanted = [(names, p) for names, p in self._named_parameters() if p.requires_grad or not self.cfg.peft.enabled]
        # Whole fp32 tensors (ds_shape: a ZeRO-3 parameter's full shape), filled by DCP without collectives.
        tensors = {f"/model/{names[0]}": torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=torch.float32) for names, p in wanted}
        SafeFileSystemReader(str(path / "dcp")).read_metadata()  # crafted metadata refused here, in one line
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path / "dcp")), planner=SafeLoadPlanner(), no_dist=True)
        for names, p in wanted:
            self._set_full_param(p, tensors[f"/model/{names[0]}"])

    def load_state(self, path: Path) -> None:
        if (path / "strategy.json").is_file():  # written by save_model_only (train.save_only_model)
            self.load_model_only(path)
            return
        loaded, _ = self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True, load_module_strict=not self.cfg.peft.enabled)
        if loaded is None:
            raise FileNotFoundError(f"{path / TAG}: no DeepSpeed checkpoint there")

    def _named_parameters(self) -> list[tuple[list[str], nn.Parameter]]:
        """Each parameter once, with every state-dict key that names it (tied weights have two)."""
        module = self.engine.module
        by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), ([], p))[0].append(name)
        return list(by_id.values())

    def full_state_dict(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """fp32 weights, consolidated from the optimizer's fp32 partitions (ZeRO-3 included), with
        the plain model's keys. Collective: every rank gathers, rank 0 keeps them."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        rank = dist.get_rank() if dist.is_initialized() else 0
        out: dict[str, torch.Tensor] = {}
        for names, p in self._named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p)
            if full is None and hasattr(p, "ds_id"):  # frozen under ZeRO-3: no optimizer partition; the module's is empty until gathered
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().float().clone()
            elif full is None:  # not managed by a ZeRO optimizer (frozen): the module holds it whole
                full = p.detach().float()
            if rank == 0:
                value = full.detach().to("cpu", torch.float32).clone()
                for name in names:
                    out[name] = value
        if rank == 0:
            for name, buf in self.engine.module.named_buffers():
                out[name] = buf.detach().to("cpu").clone()
            keys = self.engine.module.state_dict().keys()
            out = {k: out[k] for k in keys if k in out}
        return out

    def _set_full_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """One parameter from its whole fp32 value: the optimizer's fp32 master partition and the
        module's (16-bit or fp32) copy; under ZeRO-3 gathered, set by rank 0, re-partitioned."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(p.device))
        if self.stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.device, p.dtype))
        else:
            p.data.copy_(value.to(p.device, p.dtype))
