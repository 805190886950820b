"""A user's own evaluation metrics, as a user would write them, for tests of train.compute_metrics
(the contract: trainer/model_io.py)."""

from __future__ import annotations

import torch


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """Next-token accuracy over labelled tokens, as a (numerator, denominator) pair: must equal
    ringleader's own eval_accuracy whatever the sharding; and a plain sum (labelled tokens)."""
    labelled = labels != -100
    correct = ((logits.argmax(dim=-1) == labels) & labelled).sum()
    return {"token_acc": (correct, labelled.sum()), "labelled_tokens": labelled.sum()}
