"""torch.distributed.checkpoint without unsafe unpickling, and writing with checksums.

DCP pickles its `.metadata` file and loads non-tensor items with torch.load(weights_only=False);
a crafted checkpoint could run code on load. The reader here unpickles metadata with an allowlist
of exact (module, name) pairs of DCP's own classes, checks that every storage record points at a
shard file of the folder, and the planner refuses byte items: ringleader puts only tensors in DCP
(everything else goes to JSON), so none is expected at all.

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

# Exactly the globals torch 2.13's DCP pickles into `.metadata` for a state dict of tensors
# (enumerated from the find_class calls on the metadata of a model + AdamW save, plain and FSDP):
# (module, name) pairs, never a whole module. Protocol 4 resolves a dotted name inside a module
# ("torch.distributed.checkpoint.filesystem", "os.system") to whatever that module imported, so a
# module-wide allowance is an allowance for everything. BytesStorageMetadata is left out on
# purpose: ringleader puts only tensors in DCP, and a byte item is what DCP would torch.load.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # looks a layout up by its name, in a dict
        ("torch", "Size"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    }
)
# torch.float32, torch.strided, torch.contiguous_format...: values, not callables. Taken from the
# module's own namespace (vars), so no lazy import runs to find them.
TORCH_CONSTANTS: dict[str, Any] = {k: v for k, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))}


class UnsafeCheckpointError(ValueError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED pairs and torch's dtypes, layouts and memory formats; anything else
    (a dotted name, another module, another torch attribute) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and name in TORCH_CONSTANTS:
                return TORCH_CONSTANTS[name]
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing a persistent id")


def load_metadata(data: bytes, source: str) -> Metadata:
    """Unpickle DCP metadata with the allowlist; any failure is an UnsafeCheckpointError naming
    `source` in one line (a crafted file can raise anything while it is being unpickled)."""
    try:
        metadata = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{source}: {exc}; this file was not written by torch.distributed.checkpoint") from None
    except Exception as exc:  # truncated, or an allowed class called with wrong arguments
        raise UnsafeCheckpointError(f"{source}: not a checkpoint metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source}: not a checkpoint metadata file")
    return metadata


def check_storage(metadata: Metadata, folder: Path, source: str) -> None:
    """Every storage record must point into a shard file of this folder, untransformed: DCP joins
    relative_path to the folder as it is, so "../../etc/passwd" would be read into a tensor."""
    for index, info in (metadata.storage_data or {}).items():
        path = getattr(info, "relative_path", None)
        if not isinstance(path, str) or "/" in path or "\\" in path or path.startswith(".") or not path.endswith(".distcp") or not (folder / path).is_file():
            raise UnsafeCheckpointError(f"{source}: storage record {getattr(index, 'fqn', index)!s} names '{path}', not a shard file of {folder}")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{source}: storage record {getattr(index, 'fqn', index)!s} asks for transforms {info.transform_descriptors!r}; ringleader writes none")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f.read(), str(path))
        check_storage(metadata, Path(self.path), str(path))
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        """Never reached for a checkpoint ringleader wrote (only tensors go to DCP, and the
        unpickler refuses byte-item metadata): a byte item is refused, not torch.load-ed."""
        raise UnsafeCheckpointError(f"{read_item.dest_index.fqn}: a non-tensor item in the checkpoint; ringleader writes only tensors to DCP")


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
