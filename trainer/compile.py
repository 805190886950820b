"""train.torch_compile (Trainer's torch_compile, torch_compile_mode, torch_compile_backend): compile each
transformer block in place before the strategy wraps or shards the model, as torchtitan's
apply_compile does before fully_shard.

Per block, not the whole model: the blocks are identical, so with dynamo's default inlining of
module parameters one graph (a forward and a backward) serves all of them; FSDP2's hooks, DDP's
gradient hooks and DeepSpeed's stay outside the compiled regions, so every strategy keeps its own
communication; and a graph break in the embeddings or the loss costs nothing. `Module.compile()`
compiles in place, so parameter names, state dicts, checkpoints and final/ are those of an
uncompiled run. A model without `transformer_blocks` (and no decoder layers named by transformers'
`_no_split_modules`) is compiled whole.

Compilation happens lazily at the first forward; `compile_counters()` reads dynamo's counters, so
the rank log proves it happened (frames compiled, graphs, graph breaks).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from launcher.schema import TrainConfig

log = logging.getLogger("ringleader")


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The modules compiled one by one: the model's transformer blocks, else the model itself."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None and getattr(model, "_no_split_modules", None):  # a transformers model: its decoder layers
        from trainer.hf_model import transformer_blocks

        try:
            blocks = transformer_blocks(model)
        except ValueError:
            blocks = None
    return list(blocks) if blocks else [model]


def apply_compile(model: nn.Module, t: TrainConfig) -> None:
    """torch.compile each block of `model` in place with the train group's mode and backend (None:
    inductor and torch's default mode)."""
    if not t.torch_compile:
        return
    backend = t.torch_compile_backend or "inductor"
    options = {"backend": backend, **({"mode": t.torch_compile_mode} if t.torch_compile_mode else {})}
    targets = compile_targets(model)
    for module in targets:
        module.compile(**options)
    what = f"{len(targets)} transformer blocks" if targets[0] is not model else f"the whole model ({type(model).__name__}: no transformer_blocks)"
    log.info("torch_compile: %s compiled in place (backend %s, mode %s), at their first forward", what, backend, t.torch_compile_mode or "default")


def compile_counters() -> dict[str, int]:
    """Dynamo's process-wide counters: frames compiled, distinct graphs, graph breaks."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": int(counters["frames"]["ok"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
