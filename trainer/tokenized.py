"""Tokenized data cached by content: tokenize once, before any rank starts, and let every rank
read the same files through a memory map (one copy in the page cache per node, not one per rank).

The cache key is a SHA-256 of: the bytes of every local data file (or a hub dataset's id,
configuration, revision and the `datasets` fingerprint of the loaded split), the tokenizer
(the bytes of its files when it comes from a folder, as the launcher's pre-step passes it, so the
launcher computes the same key without transformers: launcher/hf_config.py cache_key; else its
serialisation, special tokens and chat template), every setting of TextDataSpec, and
ENCODING_VERSION (bumped when the code that turns records into tokens changes). A changed byte
in any of them gives a new folder; a rerun, a requeue or another run with the same inputs finds
the folder and tokenizes nothing.

Layout of <cache_dir>/<key>/ (a folder appears whole: it is written under a temporary name and
renamed, so a crash leaves no half entry and two writers agree on one result):
  {split}.tokens.npy   all samples' input_ids end to end (uint16 when the vocabulary fits, else int32)
  {split}.labels.npy   the aligned labels, int32 (-100 = no loss)
  {split}.offsets.npy  int64, n + 1 entries: sample i is [offsets[i], offsets[i + 1])
  meta.json            the key's inputs, sample, token and labelled-token counts

    python -m trainer.tokenized --cache-dir DIR --tokenizer PATH --spec '{"paths": [...], ...}'
prints the folder and counts as JSON: the launcher's pre-step, after validation and before
planning, for every backend (never inside the ranks' collective timeouts). Imports no torch.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.hf_config import ENCODING_VERSION, TextDataSpec, cache_key, file_digest, local_data_identity, source_folder, tokenizer_identity_of_files

__all__ = ["ENCODING_VERSION", "Prepared", "TokenizedDataset", "cache_key", "file_digest", "pack_bins", "prepare"]
SPLITS = ("train", "validation")


@dataclass(kw_only=True)
class Prepared:
    folder: Path
    hit: bool  # found in the cache: nothing was tokenized
    seconds: float
    samples: dict[str, int]
    tokens: dict[str, int]
    packed_samples: dict[str, int]


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What decides the tokenizer's output: its full serialisation (vocabulary, merges,
    normalisation, pre-tokenisation, post-processing), its special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError("model.tokenizer: ringleader needs a fast (Rust) tokenizer; set model.tokenizer to a folder with a tokenizer.json")
    # Truncation and padding are state a call leaves on the Rust tokenizer (tokenizer(...,
    # truncation=True) sets them); ringleader never uses them, so they are no part of the key.
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return {
        "tokenizer_json": hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest(),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": hashlib.sha256(str(getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest(),
        "class": type(tokenizer).__name__,
    }


def data_identity(spec: TextDataSpec, splits: dict[str, Any] | None) -> dict[str, Any]:
    """Local files: their bytes. Hub datasets: id, config, revision and each split's fingerprint."""
    if spec.paths:
        return local_data_identity(spec)
    assert splits is not None
    return {"dataset": spec.dataset, "config": spec.dataset_config, "revision": spec.revision, "fingerprints": {k: v._fingerprint for k, v in splits.items()}}


def _flat(ds, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of a datasets.Dataset as (values, offsets) numpy arrays, without a Python loop."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ds) == 0:  # an empty split (validation_fraction=0): map() leaves its columns as they were
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    col = ds.data.column(column)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], type=pa.list_(pa.int64()))
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return arr.flatten().to_numpy(zero_copy_only=False), offsets


def _write(folder: Path, tokenized: dict[str, Any], vocab_size: int, meta: dict[str, Any], *, max_length: int) -> dict[str, dict[str, int]]:
    token_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    counts: dict[str, dict[str, int]] = {"samples": {}, "tokens": {}, "labelled": {}, "packed_samples": {}}
    for split, ds in tokenized.items():
        tokens, offsets = _flat(ds, "input_ids")
        labels, label_offsets = _flat(ds, "labels")
        if not np.array_equal(offsets, label_offsets):
            raise AssertionError("tokenized: input_ids and labels differ in length")
        np.save(folder / f"{split}.tokens.npy", tokens.astype(token_dtype, copy=False))
        np.save(folder / f"{split}.labels.npy", labels.astype(np.int32, copy=False))
        np.save(folder / f"{split}.offsets.npy", offsets)
        counts["samples"][split] = len(offsets) - 1
        counts["tokens"][split] = int(offsets[-1])
        # Tokens that carry a loss: the plan's real tokens a step (its tokens_per_step, batch x
        # seq_len, is an upper bound for padded data).
        counts["labelled"][split] = int(np.count_nonzero(labels != -100))
        # Rows once packed to max_length (collate.pack_bins, deterministic): the plan's sample
        # count when data.packing is on.
        counts["packed_samples"][split] = len(pack_bins(np.diff(offsets).tolist(), max_length))
    (folder / "meta.json").write_text(json.dumps({**meta, **counts}, indent=2, sort_keys=True) + "\n")
    return counts


def prepare(spec: TextDataSpec, *, tokenizer, cache_dir: str | os.PathLike, num_proc: int = 1, datasets_cache: str | None = None, tokenizer_folder: str | os.PathLike | None = None) -> Prepared:
    """Tokenize spec's data with `tokenizer` into the cache, unless an entry with the same key is
    there already; returns its folder. Run by one process (the pre-step), never by the ranks.
    `tokenizer_folder`: the folder `tokenizer` was loaded from; its files' bytes then key the
    tokenizer (the launcher computes that key too), else the loaded tokenizer's state does."""
    started = time.perf_counter()
    from trainer import text_data

    spec.check()
    root = Path(cache_dir)
    splits = None if spec.paths else text_data.load_splits(spec, cache_dir=datasets_cache)
    if spec.format == "messages":
        text_data.chat_template_of(tokenizer, spec)  # no template: the one-line error before any work
    tok_identity = tokenizer_identity_of_files(Path(tokenizer_folder)) if tokenizer_folder is not None else tokenizer_identity(tokenizer)
    identity = {"data": data_identity(spec, splits), "tokenizer": tok_identity}
    key = cache_key(identity["data"], identity["tokenizer"], spec)
    folder = root / key
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        return Prepared(folder=folder, hit=True, seconds=time.perf_counter() - started, samples=meta["samples"], tokens=meta["tokens"], packed_samples=meta["packed_samples"])
    if splits is None:
        splits = text_data.load_splits(spec, cache_dir=datasets_cache)
    tokenized = text_data.tokenize_splits(splits, tokenizer=tokenizer, spec=spec, num_proc=num_proc)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        counts = _write(tmp, tokenized, len(tokenizer), {"key": key, "settings": spec.key(), **identity, "encoding_version": ENCODING_VERSION, "pad_token_id": pad_id(tokenizer)}, max_length=spec.max_length)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same key first: same content, keep theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(folder=folder, hit=False, seconds=time.perf_counter() - started, samples=counts["samples"], tokens=counts["tokens"], packed_samples=counts["packed_samples"])


def pad_id(tokenizer) -> int:
    """What batches are padded with (the ranks read it from meta.json, without the tokenizer):
    the pad token, else eos, else 0. Padded positions carry no label and no attention."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / "meta.json").read_text())


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Sample indices grouped into bins of at most `max_length` tokens, best-fit decreasing (the
    longest sample first into the fullest bin it fits): deterministic, a few percent of padding
    at most on typical data. Each bin lists its samples in index order. A sample longer than
    max_length is an error: truncate first (text_data does)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin number), sorted
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"pack_bins: sample {i} has {n} tokens > max_length {max_length}")
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            if space - n:
                bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if max_length - n:
                bisect.insort(free, (max_length - n, len(bins) - 1))
    for members in bins:
        members.sort()
    bins.sort(key=lambda b: b[0])
    return bins


class TokenizedDataset:
    """One split of a cache folder as a map-style dataset of (input_ids, labels) int64 tensors of
    varying length. The arrays are memory-mapped read-only: ranks and loader workers share the
    page cache; a pickled copy (spawned workers) carries the path only and maps again."""

    def __init__(self, folder: str | os.PathLike, split: str) -> None:
        self.folder, self.split = Path(folder), split
        self._open()

    def _open(self) -> None:
        load = lambda part: np.load(self.folder / f"{self.split}.{part}.npy", mmap_mode="r")  # noqa: E731
        self.tokens, self.labels, self.offsets = load("tokens"), load("labels"), load("offsets")

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int):
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return torch.from_numpy(self.tokens[a:b].astype(np.int64)), torch.from_numpy(self.labels[a:b].astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tokenized", description="Tokenize a dataset into ringleader's cache; print its folder.")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder or hub id")
    parser.add_argument("--spec", required=True, help="TextDataSpec fields as JSON")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--revision", default="")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from trainer.text_data import load_tokenizer

    try:
        spec = TextDataSpec(**json.loads(args.spec))
        folder = source_folder(args.tokenizer, revision=args.revision)
        tok = load_tokenizer(args.tokenizer, revision=args.revision, trust_remote_code=args.trust_remote_code)
        got = prepare(spec, tokenizer=tok, cache_dir=args.cache_dir, num_proc=args.num_proc, tokenizer_folder=folder)
    except (ValueError, OSError) as e:
        print(f"ringleader: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"folder": str(got.folder), "hit": got.hit, "seconds": round(got.seconds, 3), "samples": got.samples, "tokens": got.tokens, "packed_samples": got.packed_samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
