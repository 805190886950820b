"""The model-call contract: how a batch reaches a model and how its loss comes back, as a sum over
labelled tokens and their count, so the loop can make the loss token-exact (DESIGN.md "Loss").

A batch is a dict of tensors:
  input_ids       [B, T] int64
  labels          [B, T] int64, ALREADY ALIGNED with the model's output positions: labels[:, i] is
                  the target of position i; -100 (IGNORE_INDEX) means no loss there (padding, a
                  masked prompt)
  attention_mask  [B, T] optional, 1 = a real token
  position_ids    [B, T] optional, restarting at 0 for each packed sample
Datasets may return (input_ids, labels) tuples, or dicts with those keys; `collate` stacks either.

How a model is called (the contract for a user's own model):
  - A transformers PreTrainedModel is called as model(input_ids=, attention_mask=, position_ids=)
    without labels (so it never shifts them again nor averages them itself), and ringleader takes
    the summed cross-entropy of `.logits` against the aligned labels.
  - Any other model is called as model(input_ids, labels), plus attention_mask= and position_ids=
    as keyword arguments when the batch has them. It returns either logits [B, T, V], or the MEAN
    cross-entropy over the positions whose label is not -100 (F.cross_entropy's default). A mean is
    turned back into a sum by multiplying it by that count, so the old contract stays token-exact.
    A micro-batch without any labelled token then contributes nothing (its NaN mean is dropped).
  - Either way the loss of an optimizer step is token-exact: the summed cross-entropy of every
    labelled token of every micro-batch on every rank over the global count of labelled tokens.
  - Optional, on any model: `transformer_blocks` (the modules FSDP shards one by one),
    `gradient_checkpointing_enable()` or a `gradient_checkpointing` attribute, and
    `flops_per_token(seq_len=...)` for MFU (else 6 x the parameter count is used).
A dataset with a `collate_fn` attribute has its batches made by it (padding, packing); else
`collate` stacks equal-length samples.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]
OPTIONAL_KEYS = ("attention_mask", "position_ids")


def collate(samples: Sequence[Any]) -> Batch:
    """DataLoader's collate_fn for equal-length samples: (input_ids, labels) tuples or dicts of
    tensors, stacked into the batch dict. Padding collators for text data produce the same dict."""
    first = samples[0]
    if isinstance(first, Mapping):
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in first}
    input_ids, labels = zip(*samples)
    return {"input_ids": torch.stack([torch.as_tensor(x) for x in input_ids]), "labels": torch.stack([torch.as_tensor(y) for y in labels])}


def as_batch(batch: Any) -> Batch:
    """A batch from any loader: the dict itself, or an (input_ids, labels) pair of stacked tensors."""
    if isinstance(batch, Mapping):
        return dict(batch)
    input_ids, labels = batch
    return {"input_ids": input_ids, "labels": labels}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_labels(batch: Batch) -> int:
    """Labelled tokens of a batch (labels != -100), counted where the batch lies (the CPU, before
    the loop moves it: no device sync)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def is_transformers_model(model: nn.Module) -> bool:
    """Whether the model (under a DDP or DeepSpeed wrapper) is a transformers PreTrainedModel,
    without importing transformers: a model of it has imported it already."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    return isinstance(inner, transformers.PreTrainedModel)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy (in fp32) over positions whose label is not -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def loss_sum_and_count(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the model on one micro-batch (see the module's docstring); return the summed
    cross-entropy over its labelled tokens and their number (an int64 tensor on the batch's device)."""
    labels = batch["labels"]
    count = (labels != IGNORE_INDEX).sum()
    extra = {k: batch[k] for k in OPTIONAL_KEYS if k in batch}
    if is_transformers_model(model):
        out = model(input_ids=batch["input_ids"], **extra)
        return summed_cross_entropy(out.logits, labels), count
    out = model(batch["input_ids"], labels, **extra)
    if isinstance(out, Mapping) or hasattr(out, "logits"):  # a ModelOutput-like result
        out = out["logits"] if isinstance(out, Mapping) else out.logits
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; it must return logits [B, T, V] or the mean cross-entropy (trainer/model_io.py)")
    if out.dim() == 0:
        # A mean over `count` tokens; with none it is NaN (0/0), and its gradients are zero: keep
        # the graph (DDP and FSDP need every rank's backward) but drop the value.
        return torch.where(count > 0, out.float() * count, torch.zeros((), device=out.device)), count
    if out.dim() == labels.dim() + 1:
        return summed_cross_entropy(out, labels), count
    raise ValueError(f"the model returned a tensor of shape {tuple(out.shape)}; it must return logits [B, T, V] or the mean cross-entropy (a scalar)")
