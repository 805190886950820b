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


class MaskedPrompts(torch.utils.data.Dataset):
    """Padded samples of varied length with a masked prompt: labels are -100 over the prompt and
    the padding, so the labelled tokens per sample vary from 1 to seq_len - 1 (tests/test_loss.py).
    Every 4th sample is long (many labelled tokens), the others short: micro-batches and ranks get
    deliberately uneven shares of the step's labelled tokens."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int) -> None:
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        tokens = torch.randint(1, self.vocab, (self.seq_len + 1,), generator=g)
        length = self.seq_len if i % 4 == 0 else int(torch.randint(2, 5, (), generator=g))  # real tokens, the rest padding
        prompt = int(torch.randint(0, length - 1, (), generator=g)) if i % 4 == 0 else length - 2
        input_ids, labels = tokens[:-1].clone(), tokens[1:].clone()
        input_ids[length:] = 0
        labels[length - 1 :] = -100  # no target past the last real token
        labels[:prompt] = -100
        return input_ids, labels


def masked_prompts(*, split: str, seq_len: int, vocab: int = 256) -> MaskedPrompts:
    return MaskedPrompts(64 if split == "train" else 16, seq_len, vocab, 0 if split == "train" else 1)
