"""Datasets and the resumable distributed sampler.

The sampler's whole state is (epoch, samples consumed in the epoch, counted over all ranks): a
resume restores it directly, in O(1), on any world size, instead of replaying the loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from launcher.schema import DataConfig
from launcher.targets import load_target
from launcher import corpus
from trainer.model_io import collate


def collate_fn_of(dataset: Any) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    """The dataset's own collator (`collate_fn`: padding, packing), else stacking equal-length
    samples; either gives the batch dict of trainer/model_io.py."""
    return getattr(dataset, "collate_fn", None) or collate


class TokenWindows(Dataset):
    """Windows of seq_len tokens from one flat token array; labels are the inputs shifted by one."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return window[:-1], window[1:]


class SyntheticTokens(Dataset):
    """Random tokens, the same for a given (seed, index) on every rank and every run."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        window = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        return window[:-1], window[1:]


def read_bytes(split: corpus.Split) -> np.ndarray:
    return np.frombuffer(corpus.read_split(split), dtype=np.uint8)


class TextSamples(Dataset):
    """A split of the tokenized cache (trainer/tokenized.py, memory-mapped), packed into rows of
    seq_len tokens when data.packing, batched by padding to the longest sample with an attention
    mask (packed rows: position ids instead). Samples vary in length; the sampler only sees indices."""

    def __init__(self, folder: str, split: str, *, seq_len: int, packing: bool, pad_token_id: int) -> None:
        from functools import partial

        from trainer.collate import PackedDataset, pad_collate
        from trainer.tokenized import TokenizedDataset

        samples: Any = TokenizedDataset(folder, split)  # map-style, not a torch Dataset subclass
        self.samples: Any = PackedDataset(samples, samples.lengths.tolist(), seq_len) if packing else samples
        self.collate_fn = partial(pad_collate, pad_token_id=pad_token_id)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        return self.samples[i]


def build_dataset(data: DataConfig, split: str, *, vocab_size: int, seed: int, data_cache: str = "", pad_token_id: int = 0) -> Dataset:
    """`data_cache`: the tokenized folder the plan holds (text data for a transformers model)."""
    if data.is_text:
        if not data_cache:
            raise ValueError(f"data={data.name}: the plan holds no tokenized cache folder; start the run with python -m launcher, which tokenizes first")
        return TextSamples(data_cache, split, seq_len=data.seq_len, packing=data.packing, pad_token_id=pad_token_id)
    if data._target_:
        factory = load_target(data._target_, "data._target_")
        return factory(split=split, seq_len=data.seq_len, **data.kwargs)
    if data.name in ("pystdlib", "text_files"):
        return TokenWindows(read_bytes(corpus.split_of(data, split)), data.seq_len)
    if data.name == "tokens_bin":
        path, start, stop = corpus.token_range(data, split)
        return TokenWindows(np.memmap(path, dtype=np.dtype(data.token_dtype), mode="r")[start:stop], data.seq_len)
    if data.name == "synthetic":
        n = corpus.num_samples(data, split)
        return SyntheticTokens(n, data.seq_len, vocab_size, seed + (0 if split == "train" else 1))
    raise ValueError(f"unknown dataset {data.name}")


def epoch_ends(consumed: int, *, step_samples: int, usable: int) -> bool:
    """Whether an epoch at position `consumed` has no whole optimizer step left. A resume with a
    larger effective batch (more ranks, a bigger batch or more accumulation) or smaller data can
    land past the last whole step: the epoch is over there, as for the tail every epoch drops."""
    return consumed + step_samples > usable


def start_position(epoch: int, consumed: int, *, step_samples: int, usable: int) -> tuple[int, int]:
    """Where training continues from a saved (epoch, consumed): the same place, or the start of
    the next epoch when the saved one has no whole optimizer step left."""
    return (epoch + 1, 0) if epoch_ends(consumed, step_samples=step_samples, usable=usable) else (epoch, consumed)


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order (rank r takes every world_size-th index of one permutation) from
    a given position. The permutation depends on (seed, epoch) only, not on the world size, and the
    tail that does not fill an optimizer step is dropped, so every step sees the same samples on
    any world size: global micro-batch k is perm[k*B*W : (k+1)*B*W].

    It stops at the last whole optimizer step (`step_samples` = the effective batch) after
    `consumed`: whatever the position, every step gets all its micro-batches, and the loader never
    runs dry in the middle of one."""

    def __init__(self, num_samples: int, *, usable: int, epoch: int, consumed: int, rank: int, world_size: int, seed: int, step_samples: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.usable, self.epoch, self.consumed = num_samples, min(usable, num_samples), epoch, consumed
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        step = step_samples or world_size
        self.end = consumed + max(0, self.usable - consumed) // step * step

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.usable)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)[: self.usable]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.consumed + self.rank : self.end : self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.consumed + self.rank, self.end, self.world_size))


def train_batches(dataset: Any, state, *, usable: int, step_samples: int, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int, pin_memory: bool) -> Iterator:
    """Micro-batches forever, epoch after epoch, each epoch starting from the state's position as it
    is when the epoch's first batch is asked for (the loop advances the state after each step,
    and starts a new epoch where epoch_ends says so)."""
    while True:
        sampler = ResumableSampler(len(dataset), usable=usable, epoch=state.epoch, consumed=state.consumed, rank=rank, world_size=world_size, seed=seed, step_samples=step_samples)
        if len(sampler) == 0:  # an empty epoch would make this loop spin forever, with no collective to time out
            raise RuntimeError(
                f"no training samples left at epoch {state.epoch}, position {state.consumed} of {usable} (dataset of {len(dataset)} samples, "
                f"{step_samples} per optimizer step); the data changed under the run, or the position is past the epoch's end"
            )
        # A generator of its own: a DataLoader draws its workers' base seed from the global RNG
        # otherwise, each time it starts, and a resume (which starts one mid-epoch) would shift the
        # dropout stream and break bit-identical resume.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + state.epoch)
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory, drop_last=False, persistent_workers=False,
            generator=generator, collate_fn=collate_fn_of(dataset),
        )
        yield from loader


def eval_batches(dataset: Any, *, batch_size: int, rank: int, world_size: int, max_batches: int) -> DataLoader:
    """The validation split, every rank the same number of samples (sharded strategies need every
    rank in every forward), at most world_size - 1 samples left out."""
    per_rank = len(dataset) // world_size
    if max_batches:
        per_rank = min(per_rank, max_batches * batch_size)
    indices = list(range(rank, per_rank * world_size, world_size))
    # Its own generator, as train_batches: an evaluation leaves the training RNG streams untouched.
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0), collate_fn=collate_fn_of(dataset))
