"""Datasets and the resumable distributed sampler.

The sampler's whole state is (epoch, samples consumed in the epoch, counted over all ranks): a
resume restores it directly, in O(1), on any world size, instead of replaying the loader. How an
epoch falls into steps and micro-batches (Trainer's count, the last smaller ones included) is
launcher/steps.py's StepLayout; MicroBatches cuts this rank's share out of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from launcher.schema import DataConfig
from launcher.steps import StepLayout
from launcher.targets import load_target
from launcher import corpus
from trainer.model_io import IGNORE_INDEX, Batch, as_batch, collate

# The key of a filler micro-batch: a rank whose share of a last, smaller micro-batch is empty gets
# one row without labels instead (launcher/steps.py). The loop pops it before the model sees the
# batch and counts no input tokens for that row.
FILLER = "filler"


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
    """Whether an epoch of `usable` samples at position `consumed` has no step of at least
    `step_samples` left (the smallest step the layout allows: StepLayout.smallest, one sample, or
    one whole micro-batch with dataloader_drop_last). A resume with a larger micro-batch or smaller
    data can land past the last one: the epoch is over there."""
    return consumed + step_samples > usable


def start_position(epoch: int, consumed: int, *, step_samples: int, usable: int) -> tuple[int, int]:
    """Where training continues from a saved (epoch, consumed): the same place, or the start of
    the next epoch when the saved one has no step of at least `step_samples` left."""
    return (epoch + 1, 0) if epoch_ends(consumed, step_samples=step_samples, usable=usable) else (epoch, consumed)


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order (rank r takes every world_size-th index of one permutation) from
    a given position. The permutation depends on (seed, epoch) only, not on the world size, so
    every step sees the same samples on any world size: global micro-batch k is
    perm[k*B*W : (k+1)*B*W].

    It stops where no step of `step_samples` is left after `consumed` (whole steps when given the
    effective batch). The loop takes its micro-batches from MicroBatches, which uses its order."""

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


class WithFiller(Dataset):
    """The dataset indexed by (index, filler) pairs, for MicroBatches: a filler row is sample
    `index` again, to be collated without labels."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Any, bool]:
        index, filler = key
        return self.dataset[index], filler


class FillerCollate:
    """The dataset's collator on the samples; a filler micro-batch (one row) gets all labels -100
    and the FILLER key: it adds nothing to the loss or the label count, and its forward and
    backward still take part in every collective of the step (DDP, FSDP, ZeRO)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, bool]]) -> Batch:
        batch = as_batch(self.collate_fn([sample for sample, _ in items]))
        if any(filler for _, filler in items):
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            batch[FILLER] = torch.ones((), dtype=torch.bool)
        return batch


class MicroBatches(Sampler[list[tuple[int, bool]]]):
    """This rank's micro-batches of one epoch from position `consumed` on, as a DataLoader's
    batch sampler: the steps of `layout` (launcher/steps.py) cut from `consumed`, each step's
    micro-batches of layout.micro_batch samples, rank r taking every world_size-th one from r.
    Every rank yields the same number of micro-batches; a rank with no sample in a last, smaller
    micro-batch gets a filler row (the first sample of that micro-batch, without labels)."""

    def __init__(self, layout: StepLayout, order: torch.Tensor, *, consumed: int, rank: int, world_size: int) -> None:
        self.layout, self.order, self.consumed, self.rank, self.world_size = layout, order, consumed, rank, world_size

    def spans(self) -> Iterator[tuple[int, int]]:
        """[start, stop) of each global micro-batch in the epoch's order."""
        position, micro = self.consumed, self.layout.micro_batch
        while n := self.layout.step_samples(position):
            for start in range(position, position + n, micro):
                yield start, min(start + micro, position + n)
            position += n

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for start, stop in self.spans():
            mine = self.order[start + self.rank : stop : self.world_size].tolist()
            yield [(i, False) for i in mine] if mine else [(int(self.order[start]), True)]

    def __len__(self) -> int:
        return sum(1 for _ in self.spans())


def train_batches(
    dataset: Any, state, *, usable: int, step_samples: int, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int, pin_memory: bool,
    drop_last: bool = False, prefetch_factor: int | None = None,
) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, each epoch starting from the state's position as it
    is when the epoch's first batch is asked for (the loop advances the state after each step,
    and starts a new epoch where the layout says so). `usable`: the samples of an epoch,
    `step_samples`: the effective batch; the layout (launcher/steps.py) says how many micro-batches
    each step has, the last smaller ones included."""
    micro = batch_size * world_size
    layout = StepLayout(samples=min(usable, len(dataset)), micro_batch=micro, accumulation=max(1, step_samples // micro), drop_last=drop_last)
    while True:
        order = ResumableSampler(len(dataset), usable=layout.samples, epoch=state.epoch, consumed=state.consumed, rank=rank, world_size=world_size, seed=seed).order()
        sampler = MicroBatches(layout, order, consumed=state.consumed, rank=rank, world_size=world_size)
        if layout.epoch_ends(state.consumed):  # an empty epoch would make this loop spin forever, with no collective to time out
            raise RuntimeError(
                f"no training samples left at epoch {state.epoch}, position {state.consumed} of {layout.samples} (dataset of {len(dataset)} samples, "
                f"{step_samples} per optimizer step); the data changed under the run, or the position is past the epoch's end"
            )
        # A generator of its own: a DataLoader draws its workers' base seed from the global RNG
        # otherwise, each time it starts, and a resume (which starts one mid-epoch) would shift the
        # dropout stream and break bit-identical resume.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + state.epoch)
        loader = DataLoader(
            WithFiller(dataset), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, prefetch_factor=prefetch_factor,
            generator=generator, collate_fn=FillerCollate(collate_fn_of(dataset)),
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
