"""Small file helpers every layer uses: the one atomic write, fsync of a folder, reading a JSON file
that may be missing or half-written, following a growing log. Imports nothing heavy."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the folder's entry, not the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace `path` with `text`: readers see the old file or the new one, never a part. The
    temporary name carries this process's id, so two writers of one file never share it.
    durable (the default): the file is fsynced before the rename and the folder after it, so a
    crash or a power loss also leaves the old file or the new one, never an empty one. Caches that
    may be lost pass durable=False."""
    tmp = path.with_name(f".{os.getpid()}.{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def read_json(path: Path) -> dict | None:
    """A JSON file of the run directory, or None while it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def print_appended(path: Path, offset: int) -> int:
    """Print what a log file gained since `offset`; return the new offset (logs' follow mode)."""
    if not path.exists():
        return offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)
