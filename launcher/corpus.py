"""Which bytes make up a built-in dataset, and how many samples they give, without torch.

The launcher counts samples from file sizes alone (no reading) to plan steps per epoch; every rank
reads the same files through the same functions, so the two always agree.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from launcher.files import atomic_write
from launcher.registry import TOKEN_BYTES
from launcher.schema import DataConfig



@dataclass(frozen=True, kw_only=True)
class Split:
    """A byte range [start, stop) of some files concatenated in order."""

    files: tuple[str, ...]  # paths (plain strings: the planner sizes ~1,800 of them on every dry run)
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def pystdlib_files() -> list[tuple[str, int]]:
    """The standard library's .py files (relative path, size), sorted: the same list on every rank.
    Walking and stat-ing ~2,000 files costs ~0.2 s, so the list is cached per Python install (the
    standard library does not change under it) to keep the launcher's dry run fast."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{root}|{sys.version}|{root.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ringleader" / f"pystdlib-{key}.json"
    try:
        return [(p, n) for p, n in json.loads(cache.read_text())]
    except (OSError, ValueError):
        pass
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    found.sort()
    _unsaved_listing[cache] = found
    return found


# Listings computed but not yet cached: the launcher saves them once its plan is valid
# (save_listing_cache), so a refused launch leaves nothing on disk, not even a cache.
_unsaved_listing: dict[Path, list[tuple[str, int]]] = {}


def save_listing_cache() -> None:
    while _unsaved_listing:
        cache, found = _unsaved_listing.popitem()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, json.dumps(found), durable=False)  # a cache: losing it costs a rescan
        except OSError:
            pass  # a read-only home: no cache, same answer


def text_files(patterns: list[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    return sorted(files)


def shuffled(files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """A fixed pseudo-random order (by a hash of each posix path; relative to the standard library
    for pystdlib): a cap on bytes then takes a mix of modules rather than the alphabet's first, the
    same on every machine and every rank."""
    return sorted(files, key=lambda f: (zlib.crc32(f[0].encode()), f[0]))


def file_splits(files: list[tuple[str, int]], data: DataConfig) -> dict[str, Split]:
    """The files' bytes in order, capped at `max_bytes`; validation is the last
    `validation_fraction` of them, training the rest. Sizes come from stat alone."""
    chosen: list[str] = []
    total = 0
    for path, size in files:
        if size == 0:
            continue
        chosen.append(path)
        total += size
        if data.max_bytes and total >= data.max_bytes:
            total = data.max_bytes
            break
    n_val = int(total * data.validation_fraction)
    return {
        "train": Split(files=tuple(chosen), start=0, stop=total - n_val),
        "validation": Split(files=tuple(chosen), start=total - n_val, stop=total),
    }


@functools.lru_cache(maxsize=1)
def pystdlib_order() -> tuple[tuple[str, int], ...]:
    """The standard library's files (absolute path, size) in their fixed order; computed once per
    process, as the planner asks for each split in turn."""
    root = Path(sysconfig.get_paths()["stdlib"]).as_posix()
    return tuple((f"{root}/{p}", n) for p, n in shuffled(pystdlib_files()))


def split_of(data: DataConfig, split: str) -> Split:
    if data.name == "pystdlib":
        return file_splits(list(pystdlib_order()), data)[split]
    if data.name == "text_files":
        return file_splits(shuffled([(p.as_posix(), p.stat().st_size) for p in text_files(data.paths)]), data)[split]
    raise ValueError(f"data {data.name} has no file splits")


def read_split(split: Split) -> bytes:
    """The split's bytes: the files concatenated, from start to stop."""
    parts, have = [], 0
    for path in split.files:
        if have >= split.stop:
            break
        with open(path, "rb") as f:
            parts.append(f.read())
        have += len(parts[-1])
    return b"".join(parts)[split.start : split.stop]


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
