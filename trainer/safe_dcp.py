"""torch.distributed.checkpoint without unsafe unpickling, and writing with checksums.

DCP pickles its `.metadata` file and loads non-tensor items with torch.load(weights_only=False);
a crafted checkpoint could run code on load. The reader here unpickles metadata with an allowlist
of DCP's own classes, and the planner loads byte items with weights_only=True. ringleader puts only
tensors in DCP (everything else goes to JSON), so no byte item is expected at all.

The writer side is ChecksummingFileSystem: every file fsynced as it is closed, its size and CRC32
taken as it is written. This module is imported only when a checkpoint is saved or loaded: DCP's
import (DTensor, sympy) costs each rank ~1.3 s of start-up.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from trainer.durable import ChecksummingWriter, FileInfo

ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.planner")
ALLOWED = {
    ("torch", "Size"),
    ("torch._utils", "_get_layout"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(ValueError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ALLOWED_MODULES or (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name}")


def load_metadata(data: bytes, source: str) -> Metadata:
    try:
        metadata = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{source}: {exc}; this file was not written by torch.distributed.checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source}: not a checkpoint metadata file")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


class ChecksummingFileSystem(FileSystem):
    """DCP's local file system, but every file it writes is fsynced when written and its size and
    CRC32 are recorded in `written` (absolute paths; a rename, as of `.metadata`, follows along)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[Path, FileInfo] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        with open(path, "wb") as f:
            stream = ChecksummingWriter(f)
            try:
                yield stream
                stream.sync()
            finally:
                if stream.flusher is not None:
                    stream.flusher.join()  # not closing the file under a running fdatasync
        self.written[path.absolute()] = stream.info

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        if (info := self.written.pop(Path(path).absolute(), None)) is not None:
            self.written[Path(new_path).absolute()] = info
