"""Which bytes make up a built-in dataset, and how many samples they give, without torch.

The launcher counts samples from file sizes alone (no reading) to plan steps per epoch; every rank
reads the same files through the same functions, so the two always agree.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from launcher.schema import DataConfig

BUILTIN = ("pystdlib", "text_files", "tokens_bin", "synthetic")
TOKEN_BYTES = {"uint8": 1, "uint16": 2, "int32": 4}


@dataclass(frozen=True, kw_only=True)
class Split:
    """The files of one split, in order, and their total size in bytes."""

    files: tuple[Path, ...]
    nbytes: int


def pystdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path: the same list on every rank."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def text_files(patterns: list[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    return sorted(files)


def is_validation(path: Path, fraction: float) -> bool:
    """A file belongs to the validation split by a hash of its name: stable across machines and runs."""
    return zlib.crc32(path.name.encode() + str(path.parent.name).encode()) % 10_000 < fraction * 10_000


def file_splits(files: list[Path], data: DataConfig) -> dict[str, Split]:
    """Take files in order until `max_bytes`, then split them into train and validation."""
    chosen: list[tuple[Path, int]] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append((path, size))
        total += size
        if data.max_bytes and total >= data.max_bytes:
            break
    out: dict[str, list[tuple[Path, int]]] = {"train": [], "validation": []}
    for path, size in chosen:
        out["validation" if is_validation(path, data.validation_fraction) else "train"].append((path, size))
    return {k: Split(files=tuple(p for p, _ in v), nbytes=sum(s for _, s in v)) for k, v in out.items()}


def split_of(data: DataConfig, split: str) -> Split:
    if data.name == "pystdlib":
        return file_splits(pystdlib_files(), data)[split]
    if data.name == "text_files":
        return file_splits(text_files(data.paths), data)[split]
    raise ValueError(f"data {data.name} has no file splits")


def token_range(data: DataConfig, split: str) -> tuple[Path, int, int]:
    """tokens_bin: the file, and the [start, stop) token range of the split (validation at the end)."""
    path = Path(os.path.expanduser(data.paths[0]))
    n = path.stat().st_size // TOKEN_BYTES[data.token_dtype]
    n_val = int(n * data.validation_fraction)
    return (path, 0, n - n_val) if split == "train" else (path, n - n_val, n)


def num_tokens(data: DataConfig, split: str) -> int:
    if data.name in ("pystdlib", "text_files"):
        return split_of(data, split).nbytes
    if data.name == "tokens_bin":
        _, start, stop = token_range(data, split)
        return stop - start
    raise ValueError(f"data {data.name} is not token-based")


def num_samples(data: DataConfig, split: str) -> int:
    """Samples of a split: windows of seq_len inputs (labels shifted by one), stride seq_len."""
    if data.name == "synthetic":
        n_val = max(1, int(data.num_samples * data.validation_fraction)) if data.validation_fraction else 0
        return data.num_samples if split == "train" else n_val
    if data.name in ("pystdlib", "text_files", "tokens_bin"):
        return max(0, (num_tokens(data, split) - 1) // data.seq_len)
    return data.num_samples if split == "train" else 0
