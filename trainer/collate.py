"""Batches from variable-length samples: padding with an attention mask, and packing several
samples into one sequence with restarting position ids. Pure tensor functions (no model).

Samples are (input_ids, labels) pairs of 1-D int tensors of one length each, labels already
aligned (labels[i] is the target of position i, -100 = no loss), or dicts with those keys and
optionally `position_ids`. Batches follow trainer/model_io.py's contract.

Packing and attention isolation (transformers 5.24, checked in tests/test_hf_data.py): a causal
LM that builds its mask with `transformers.masking_utils.create_causal_mask` (Llama, Mistral,
Qwen2/3, Gemma, GPT-2 and most current models) detects packed rows from `position_ids` (a step
other than +1 starts a new sample: `find_packed_sequence_indices`) and makes the mask
block-diagonal, for every mask interface: `eager`, `sdpa`, `flex_attention`; the flash-attention
kernels read the same position ids as varlen boundaries. It does so ONLY when `attention_mask`
is None and there is no KV cache, so a packed batch must not carry an attention mask: the packing
collator below leaves it out, and padding at the end of a packed row becomes one more "sample"
of its own (positions from 0, labels -100) that nothing else attends to. A model whose modelling
code does not use create_causal_mask (older remote code) would let samples see each other:
trainer.hf_model.packing_refusal names that case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from trainer.tokenized import pack_bins  # torch-free, so the tokenizing pre-step counts packed rows without torch

__all__ = ["IGNORE_INDEX", "PackedDataset", "flatten_collate", "pack_bins", "pack_samples", "pad_collate"]

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


def _fields(sample: Any) -> dict[str, torch.Tensor]:
    if isinstance(sample, Mapping):
        return {k: torch.as_tensor(v) for k, v in sample.items()}
    input_ids, labels = sample
    return {"input_ids": torch.as_tensor(input_ids), "labels": torch.as_tensor(labels)}


def pad_collate(samples: Sequence[Any], *, pad_token_id: int = 0, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad to the longest sample of the batch (rounded up to `pad_to_multiple_of`):
    input_ids padded with `pad_token_id`, labels with -100, attention_mask 1 on real tokens.
    Samples that carry position_ids (packed ones) keep them and get NO attention mask, since a
    mask would switch off transformers' packed-sequence detection (module docstring); their
    padding continues as a separate run of positions from 0."""
    rows = [_fields(s) for s in samples]
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    packed = "position_ids" in rows[0]
    if any(("position_ids" in r) != packed for r in rows):
        raise ValueError("pad_collate: some samples have position_ids and some do not")
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        if len(r["labels"]) != n:
            raise ValueError(f"pad_collate: sample {b} has {n} input_ids but {len(r['labels'])} labels")
        input_ids[b, :n] = r["input_ids"]
        labels[b, :n] = r["labels"]
        mask[b, :n] = 1
        if packed:
            positions[b, :n] = r["position_ids"]
            positions[b, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


def flatten_collate(samples: Sequence[Any]) -> Batch:
    """Padding-free batch (transformers' DataCollatorWithFlattening): all samples side by side in
    one row [1, total tokens], position_ids restarting per sample, no attention mask, no padding."""
    rows = [_fields(s) for s in samples]
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows]).unsqueeze(0).long(),
        "labels": torch.cat([r["labels"] for r in rows]).unsqueeze(0).long(),
        "position_ids": torch.cat([torch.arange(len(r["input_ids"])) for r in rows]).unsqueeze(0),
    }


def pack_samples(samples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Several samples as one: tokens and labels concatenated, position_ids restarting at 0 for
    each. The last label of each sample is its own (aligned labels never reach the next sample)."""
    rows = [_fields(s) for s in samples]
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows]).long(),
        "labels": torch.cat([r["labels"] for r in rows]).long(),
        "position_ids": torch.cat([torch.arange(len(r["input_ids"])) for r in rows]),
    }


class PackedDataset(Dataset):
    """A dataset of variable-length samples seen as packed sequences of at most max_length tokens
    (bins from pack_bins over the samples' lengths); batch them with pad_collate."""

    def __init__(self, dataset: Dataset, lengths: Sequence[int], max_length: int) -> None:
        self.dataset = dataset
        self.bins = pack_bins(lengths, max_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return pack_samples([self.dataset[j] for j in self.bins[i]])
