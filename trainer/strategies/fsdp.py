"""FSDP2 (`fully_shard`): parameters, gradients and optimizer states sharded over all ranks as
DTensors; each transformer block gathers its parameters for its own forward and backward.

Optimizer, schedule, scaler and DCP state are NativeStrategy's: get_state_dict understands DTensors,
so a checkpoint holds each rank's shards and reloads on another world size.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainer.strategies.native import NativeStrategy


class FSDPStrategy(NativeStrategy):
    def wrap(self, model: nn.Module) -> nn.Module:
        world = dist.get_world_size() if dist.is_initialized() else 1
        mesh = init_device_mesh(self.device.type, (world,))
        # Mixed precision the FSDP way: 16-bit parameters for compute, fp32 shards, gradients
        # reduced in fp32. No autocast on top (see `autocast`).
        if self.precision == "fp32":
            mp = MixedPrecisionPolicy()
        else:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16, reduce_dtype=torch.float32)
        reshard = self.cfg.strategy.reshard_after_forward
        blocks = getattr(model, "transformer_blocks", None)
        if blocks is None and getattr(model, "_no_split_modules", None):  # a transformers model: its decoder layers
            from trainer.hf_model import transformer_blocks

            blocks = transformer_blocks(model)
        if blocks is None:
            raise ValueError("strategy=fsdp: the model has no `transformer_blocks` (the modules to shard one by one); add that property, or use strategy=ddp")
        # QLoRA: bitsandbytes' 4-bit weights stay whole on every rank (frozen, 0.5 byte each). FSDP2
        # would turn them into plain parameters when it gathers them, losing their quantisation state
        # (axolotl #2992, accelerate #3983); the adapters and the rest are sharded as usual.
        four_bit = {p for p in model.parameters() if type(p).__name__ == "Params4bit"} or None
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, ignored_params=four_bit)
        # The root holds what is left (embeddings, final norm, the tied head): it stays gathered
        # after forward, since backward needs it first.
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=four_bit)
        weights = getattr(model, "ringleader_weights", None)
        if weights is not None:  # built on the meta device (trainer/build.py): allocate the shards, stream rank 0's weights in
            from trainer.hf_model import load_full_state_dict, materialize
            from trainer.lora import base_key, check_initialised, initial_values, lora_info

            materialize(model, self.device)
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            lora = lora_info(model)  # LoRA: the base under peft's names, the adapters from their seeded initial values
            if lora is None:
                load_full_state_dict(model, weights if rank0 else None)
            else:
                load_full_state_dict(model, weights if rank0 else None, rename=base_key, initial=initial_values(model, lora.seed) if rank0 else None)
                check_initialised(model)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts the parameters

    def discard_gradients(self) -> None:
        """Also the unsharded gradients that non-final micro-batches accumulate inside FSDP2 (its
        FSDPParam state, not the parameters' .grad): a rerun step must not add them in again."""
        super().discard_gradients()
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    for fsdp_param in group.fsdp_params:
                        fsdp_param.unsharded_accumulated_grad = None
                        if (unsharded := getattr(fsdp_param, "_unsharded_param", None)) is not None:
                            unsharded.grad = None

    def set_gradient_sync(self, sync: bool) -> None:
        # Non-final micro-batches keep unsharded gradients locally and reduce-scatter once.
        self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]  # FSDPModule's, added by fully_shard

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The norm over all ranks' shards (a DTensor reduction), then clipping with it."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm > 0 else math.inf, norm, foreach=True)
        return norm
