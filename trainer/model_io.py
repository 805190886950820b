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
  - Logits when ringleader needs them (train.label_smoothing_factor, eval_accuracy, a user's
    train.compute_metrics): a model whose forward gives `labels` a default (the built-in GPT's
    `labels=None`) is called without labels and must then return logits. A model that needs its
    labels returns only its own mean loss: those settings are refused for it when the run starts.
  - Optional, on any model: `transformer_blocks` (the modules FSDP shards one by one),
    `gradient_checkpointing_enable()` or a `gradient_checkpointing` attribute, and
    `flops_per_token(seq_len=...)` for MFU (else 6 x the parameter count is used).
train.compute_metrics (a user's evaluation metrics, by dotted path): fn(logits, labels) is called on
every evaluation batch of every rank (logits [B, T, V] of that batch, labels aligned as above, both
on the rank's device; under ZeRO-3 and FSDP every rank runs its own batches, the forward being
collective) and returns {name: value} with additive values: a number (summed over batches and
ranks) or a (numerator, denominator) pair (each summed; the metric is their ratio). Tensors are
fine; the sums stay on the device and cross ranks in one all-reduce per evaluation. Each is logged
as eval_<name>, may be train.metric_for_best_model, and must come back with the same names on
every batch. Example: exact match per sample, {"exact_match": (all_correct.sum(), len(labels))}.
A dataset with a `collate_fn` attribute has its batches made by it (padding, packing); else
`collate` stacks equal-length samples.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
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
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(inner, peft.PeftModel):  # LoRA (trainer/lora.py): called as the model it adapts
        inner = inner.get_base_model()
    return isinstance(inner, transformers.PreTrainedModel)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of per-token cross-entropy (in fp32) over positions whose label is not -100. With
    label_smoothing eps: (1 - eps) * NLL + eps * the mean over the vocabulary of -log p, per
    labelled token: Trainer's LabelSmoother (summed here, so the step's loss stays token-exact)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP's or DeepSpeed's wrapper (FSDP2 shards it in place)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def gives_logits(model: nn.Module) -> bool:
    """Whether ringleader can get logits from the model: a transformers model, or one whose
    forward's `labels` has a default (then called without labels, it returns logits)."""
    if is_transformers_model(model):
        return True
    try:
        labels = inspect.signature(unwrap(model).forward).parameters.get("labels")
    except (TypeError, ValueError):
        return False
    return labels is not None and labels.default is not inspect.Parameter.empty


def logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits [B, T, V] for one batch, without labels (see gives_logits)."""
    extra = {k: batch[k] for k in OPTIONAL_KEYS if k in batch}
    if is_transformers_model(model):
        return model(input_ids=batch["input_ids"], **extra).logits
    out = model(batch["input_ids"], **extra)
    if isinstance(out, Mapping) or hasattr(out, "logits"):
        out = out["logits"] if isinstance(out, Mapping) else out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != batch["labels"].dim() + 1:
        raise ValueError(f"the model called without labels returned {getattr(out, 'shape', type(out).__name__)}; it must return logits [B, T, V] (trainer/model_io.py)")
    return out


def loss_sum_and_count(model: nn.Module, batch: Batch, *, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the model on one micro-batch (see the module's docstring); return the summed
    cross-entropy over its labelled tokens and their number (an int64 tensor on the batch's device).
    Label smoothing needs logits (the run refused it at the start for a model that gives none)."""
    labels = batch["labels"]
    count = (labels != IGNORE_INDEX).sum()
    extra = {k: batch[k] for k in OPTIONAL_KEYS if k in batch}
    if is_transformers_model(model) or (label_smoothing and gives_logits(model)):
        return summed_cross_entropy(logits_of(model, batch), labels, label_smoothing=label_smoothing), count
    out = model(batch["input_ids"], labels, **extra)
    if isinstance(out, Mapping) or hasattr(out, "logits"):  # a ModelOutput-like result
        out = out["logits"] if isinstance(out, Mapping) else out.logits
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; it must return logits [B, T, V] or the mean cross-entropy (trainer/model_io.py)")
    if out.dim() == 0:
        if label_smoothing:
            raise ValueError("train.label_smoothing_factor: the model returned its own mean loss; it needs a forward(input_ids, labels=None) that returns logits without labels")
        # A mean over `count` tokens; with none it is NaN (0/0), and its gradients are zero: keep
        # the graph (DDP and FSDP need every rank's backward) but drop the value.
        return torch.where(count > 0, out.float() * count, torch.zeros((), device=out.device)), count
    if out.dim() == labels.dim() + 1:
        return summed_cross_entropy(out, labels, label_smoothing=label_smoothing), count
    raise ValueError(f"the model returned a tensor of shape {tuple(out.shape)}; it must return logits [B, T, V] or the mean cross-entropy (a scalar)")


# -- evaluation ----------------------------------------------------------------------------------

RESERVED_METRICS = ("loss", "perplexity", "accuracy", "samples")
MetricFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]


class EvalStatistics:
    """Additive statistics of an evaluation, summed on the device over batches, then over ranks in
    one all-reduce: the loss sum and labelled-token count (eval_loss, eval_perplexity), the correct
    next-token predictions (eval_accuracy, when the model gives logits), and a user's
    train.compute_metrics values (see the module's docstring)."""

    def __init__(self, *, with_logits: bool, metric_fn: MetricFn | None = None) -> None:
        self.with_logits, self.metric_fn = with_logits, metric_fn
        self.sums: dict[str, torch.Tensor] = {}
        self.ratios: list[str] = []  # user metrics given as (numerator, denominator)

    def add(self, name: str, value: Any, device: torch.device) -> None:
        value = torch.as_tensor(value, dtype=torch.float64, device=device).detach().reshape(())
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def update(self, model: nn.Module, batch: Batch) -> None:
        """One batch's forward (no labels to the model when logits are wanted) and its statistics."""
        labels = batch["labels"]
        device = labels.device
        if not self.with_logits:
            loss_sum, count = loss_sum_and_count(model, batch)
            self.add("loss_sum", loss_sum, device)
            self.add("labelled", count, device)
            return
        logits = logits_of(model, batch)
        labelled = labels != IGNORE_INDEX
        self.add("loss_sum", summed_cross_entropy(logits, labels), device)
        self.add("labelled", labelled.sum(), device)
        self.add("correct", ((logits.argmax(dim=-1) == labels) & labelled).sum(), device)
        if self.metric_fn is None:
            return
        for name, value in self.metric_fn(logits, labels).items():
            if name in RESERVED_METRICS:
                raise ValueError(f"train.compute_metrics returned '{name}', which ringleader reports itself (eval_{name}); rename it")
            if isinstance(value, tuple):
                if name not in self.ratios:
                    self.ratios.append(name)
                numerator, denominator = value
                self.add(f"user:{name}:num", numerator, device)
                self.add(f"user:{name}:den", denominator, device)
            else:
                self.add(f"user:{name}", value, device)

    def metrics(self, reduce: Callable[[list[str], torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """eval_loss, eval_perplexity, eval_accuracy and the user's metrics over all ranks; `reduce`
        sums a vector over ranks (it is given the names, so ranks can check they agree)."""
        names = sorted(self.sums)
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        totals = reduce(names, torch.stack([self.sums[n] for n in names]) if names else torch.zeros(0, dtype=torch.float64, device=device))
        total = dict(zip(names, totals.tolist()))
        loss = total.get("loss_sum", 0.0) / max(total.get("labelled", 0.0), 1.0)
        out = {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 709 else math.inf, "eval_samples": total.get("samples", 0.0)}
        if "correct" in total:
            out["eval_accuracy"] = total["correct"] / max(total["labelled"], 1.0)
        for name in names:
            if name.startswith("user:") and not name.endswith((":num", ":den")):
                out[f"eval_{name[5:]}"] = total[name]
        for name in self.ratios:
            out[f"eval_{name}"] = total[f"user:{name}:num"] / total[f"user:{name}:den"] if total[f"user:{name}:den"] else math.nan
        return out
