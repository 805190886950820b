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
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from launcher.deepspeed_config import deepspeed_config
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.strategies.base import LOSS_SCALE, NONFINITE, StepResult, Strategy, prepare_model

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

    def save_state(self, path: Path, *, process_group=None) -> None:
        """DeepSpeed's own sharded format under path/deepspeed/ (every rank its optimizer
        partition). Collective over the default group; the manager's marker decides completeness."""
        # A LoRA run saves the trainable parameters only: the frozen base comes from model.name_or_path.
        self.engine.save_checkpoint(str(path), tag=TAG, client_state={}, save_latest=False, exclude_frozen_parameters=self.cfg.peft.enabled)

    def load_state(self, path: Path) -> None:
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

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the fp32 master partitions and the module's (16-bit or fp32) parameters from
        consolidated weights. Every rank calls it with the same state."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for names, p in self._named_parameters():
            value = state[names[0]].to(torch.float32)
            safe_set_full_fp32_param(p, value.to(p.device))
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.device, p.dtype))
            else:
                p.data.copy_(value.to(p.device, p.dtype))
