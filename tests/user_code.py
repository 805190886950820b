"""A user's own model and dataset, as a user would write them, for tests of `_target_`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bigram(nn.Module):
    """The smallest language model: a table of next-token logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.table(input_ids)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1))


class Counting(torch.utils.data.Dataset):
    """Token t is followed by (t + 1) % period: a bigram model learns it exactly."""

    def __init__(self, n: int, seq_len: int, period: int, offset: int) -> None:
        self.n, self.seq_len, self.period, self.offset = n, seq_len, period, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        window = (torch.arange(self.seq_len + 1) + i + self.offset) % self.period
        return window[:-1], window[1:]


def counting_dataset(*, split: str, seq_len: int, period: int) -> Counting:
    return Counting(256 if split == "train" else 32, seq_len, period, 0 if split == "train" else 3)
