"""Sharded, atomic checkpoints: checkpoints/step-<N>/ counts only when its COMPLETE marker exists.

A save writes into step-<N>.tmp/: every rank its shards (through the strategy) and its RNG state;
rank 0 the loop's state. After a barrier rank 0 records every file's size and CRC32 in COMPLETE,
then renames the folder to step-<N>. A crash at any moment leaves either no step-<N> or a complete
one. Retention renames a folder to .deleting-* before removing it, so a half-deleted checkpoint is
never taken for a good one. Nothing here unpickles: JSON, safetensors, and DCP through safe_dcp.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

log = logging.getLogger("ringleader")
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def manifest_of(folder: Path) -> dict[str, dict[str, int]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "crc32": crc32_of(path)}
    return files


def verify(folder: Path) -> dict[str, Any]:
    """Check a checkpoint against its marker; raise CheckpointError naming the first bad file."""
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker}: missing; the checkpoint is incomplete")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{marker}: unreadable ({exc})") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: {size} bytes, expected {expected['size']} (truncated or overwritten)")
        if crc32_of(path) != expected["crc32"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupt)")
    return info


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointManager:
    def __init__(self, root: Path, *, rank: int, world_size: int, device: torch.device, save_total_limit: int, config_hash: str, process_group=None) -> None:
        self.root, self.rank, self.world_size, self.device = root, rank, world_size, device
        self.save_total_limit, self.config_hash = save_total_limit, config_hash
        # A process group of its own (gloo) lets an asynchronous save run its collectives in a
        # thread while training uses the default group.
        self.group = process_group
        self.pending: threading.Thread | None = None
        self.pending_error: BaseException | None = None

    # -- finding ---------------------------------------------------------------------------------

    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
        return sorted(found)

    def clean_incomplete(self) -> None:
        """Rank 0, at start, before any save: remove what crashed saves and deletions left."""
        if self.rank != 0 or not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.endswith(".tmp") or p.name.startswith(".deleting-") or (STEP_DIR.match(p.name) and not (p / MARKER).exists()):
                log.info("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, a path, or `auto` (newest complete one that verifies)."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            verify(path)
            return path
        for step, path in reversed(self.complete()):
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                log.warning("resume=auto: skipping checkpoint step %d: %s", step, exc)
        return None

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, strategy, loop_state: dict[str, Any], *, keep: set[int] = frozenset(), asynchronous: bool = False) -> None:
        """Save the state after `step`. Collective. With `asynchronous`, the state is copied now and
        written by a thread; the next save (or `wait`) waits for it."""
        self.wait()
        tmp = self.root / f"step-{step}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        rng = rng_state(self.device)
        if asynchronous and hasattr(strategy, "staged_state"):
            tensors, extra = strategy.staged_state()
            rng = {k: v.clone() for k, v in rng.items()}
            loop_state = json.loads(json.dumps(loop_state))

            def write() -> None:
                try:
                    self._write_native(tmp, tensors, extra)
                    self._commit(step, tmp, rng, loop_state, keep)
                except BaseException as exc:  # reported by the next wait()
                    self.pending_error = exc

            self.pending = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
            self.pending.start()
            return
        strategy.save_state(tmp, process_group=self.group)
        self._commit(step, tmp, rng, loop_state, keep)

    def _write_native(self, tmp: Path, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(tensors, checkpoint_id=str(tmp / "dcp"), process_group=self.group)
        if self.rank == 0:
            (tmp / "strategy.json").write_text(json.dumps(extra))

    def _commit(self, step: int, tmp: Path, rng: dict[str, torch.Tensor], loop_state: dict[str, Any], keep: set[int]) -> None:
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng-{self.rank}.safetensors"))
        self._barrier()
        if self.rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({"loop": loop_state, "config_hash": self.config_hash, "world_size": self.world_size}, indent=1))
            marker = {"step": step, "world_size": self.world_size, "files": manifest_of(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker))
            with open(tmp / MARKER, "rb") as f:
                os.fsync(f.fileno())
            final = self.root / f"step-{step}"
            if final.exists():  # a checkpoint of the same step from before a restart
                os.replace(final, self.root / f".deleting-step-{step}")
                shutil.rmtree(self.root / f".deleting-step-{step}", ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            log.info("checkpoint saved: %s", final)
            self.apply_retention(keep)
        self._barrier()

    def apply_retention(self, keep: set[int]) -> None:
        """Keep the newest `save_total_limit` checkpoints, and always the newest and those in `keep`
        (the best one, with load_best_model_at_end)."""
        if not self.save_total_limit:
            return
        done = self.complete()
        newest = done[-1][0] if done else None
        for step, path in done[: max(0, len(done) - self.save_total_limit)]:
            if step == newest or step in keep:
                continue
            doomed = path.with_name(f".deleting-{path.name}")
            os.replace(path, doomed)  # from here on it no longer counts as a checkpoint
            shutil.rmtree(doomed, ignore_errors=True)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        if self.pending_error is not None:
            error, self.pending_error = self.pending_error, None
            raise error

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    # -- loading ---------------------------------------------------------------------------------

    def load(self, path: Path, strategy) -> dict[str, Any]:
        """Restore strategy state and RNG from a verified checkpoint; return the loop's state."""
        verify(path)
        state = json.loads((path / "trainer_state.json").read_text())
        try:
            strategy.load_state(path)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load the model or optimizer state ({type(exc).__name__}: {exc})") from exc
        rng_file = path / f"rng-{self.rank}.safetensors"
        if state.get("world_size") == self.world_size and rng_file.exists():
            set_rng_state(load_file(str(rng_file)), self.device)
        if state.get("config_hash") != self.config_hash:
            log.warning("resuming from %s, written by a different config (hash %s, now %s)", path, state.get("config_hash"), self.config_hash)
        return state
