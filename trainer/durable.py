"""Files on disk with their size and CRC32: fsync, checksums, and a writer that records both as
it writes (trainer/safe_dcp.py gives it to DCP), so a checkpoint's files need not be read back to
describe them. No torch import: the trainer starts without torch.distributed.checkpoint.

The CRC32 of a checkpoint file is taken from the bytes handed to the file as they are written: a
read-back right after writing would come from the page cache, not the disk, so it checks nothing
more; it only costs a second pass over every byte. The CRC32 itself is ISA-L's
(isal), the same checksum as zlib's at about four times the speed (carry-less multiplication);
zlib's where isal is missing.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

try:
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal's wheels: the same values, slower
    from zlib import crc32

FileInfo = dict[str, int]  # {"size": bytes, "crc32": CRC32}: what the COMPLETE marker holds per file
FLUSH_EVERY = 1 << 24  # bytes: how often ChecksummingWriter starts pushing a file to disk


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = crc32(chunk, crc)
    return crc


def describe(folder: Path, names: list[str]) -> dict[str, FileInfo]:
    """fsync each file (it must be on disk before the marker is) and record its size and CRC32,
    reading it back: for files written by others (DeepSpeed's)."""
    files = {}
    for name in names:
        path = folder / name
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = {"size": path.stat().st_size, "crc32": crc32_of(path)}
    return files


def write_file(path: Path, data: bytes) -> FileInfo:
    """Write `data` to `path` and fsync it; return its size and CRC32."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "crc32": crc32(data)}


class ChecksummingWriter(io.RawIOBase):
    """A file being written, with the CRC32 and size of everything written so far.

    Every FLUSH_EVERY bytes a background fdatasync starts pushing what is written to disk, so the
    disk works while the writer serialises the rest and the final fsync (sync) has only the tail
    left: a 230 MB save took ~0.05 s less here. close() leaves the file open:
    ChecksummingFileSystem syncs and closes it."""

    def __init__(self, file: io.BufferedWriter) -> None:
        super().__init__()
        self.file = file
        self.info: FileInfo = {"size": 0, "crc32": 0}
        self.flushed = 0  # bytes handed to a background fdatasync
        self.flusher: threading.Thread | None = None
        self.flush_error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # crc32 releases the GIL on large buffers
        n = self.file.write(data)
        self.info["crc32"] = crc32(data, self.info["crc32"])
        self.info["size"] += n
        if self.info["size"] - self.flushed >= FLUSH_EVERY and (self.flusher is None or not self.flusher.is_alive()):
            self.file.flush()
            self.flushed = self.info["size"]
            self.flusher = threading.Thread(target=self._fdatasync, name="checkpoint-flush", daemon=True)
            self.flusher.start()
        return n

    def _fdatasync(self) -> None:
        try:
            os.fdatasync(self.file.fileno())
        except OSError as exc:  # an I/O error is reported once per open file: keep it for sync()
            self.flush_error = exc

    def sync(self) -> None:
        """Everything written is on disk when this returns."""
        self.file.flush()
        if self.flusher is not None:
            self.flusher.join()
        if self.flush_error is not None:
            raise self.flush_error
        os.fsync(self.file.fileno())

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.closed:
            self.file.flush()
        super().close()
