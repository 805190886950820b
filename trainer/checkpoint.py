"""Sharded, atomic checkpoints: checkpoints/step-<N>/ counts only when its COMPLETE marker exists.

A save writes into step-<N>.tmp/: every rank its shards (through the strategy) and its RNG state,
rank 0 the loop's state and the config. After a barrier the ranks share out the files to fsync and
checksum (each writes .manifest-<rank>.json); after a second barrier rank 0 merges them into
COMPLETE (every file's size and CRC32) and renames the folder to step-<N>. A crash at any moment
leaves either no step-<N> or a complete one. Retention renames a folder to .deleting-* before
removing it, so a half-deleted checkpoint is never taken for a good one. Loading checks every file
against the marker first (the ranks share that work too), so a truncated, missing or corrupt file
is named before any state is touched. Nothing here unpickles: JSON, safetensors, and DCP through
safe_dcp. The manager calls the strategy's save_state/load_state only, so DeepSpeed's own sharded
format goes through the same marker, retention and resume logic.
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
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from trainer.faults import fault_point

log = logging.getLogger("ringleader")
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = re.compile(r"^\.manifest-\d+\.json$")


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


def payload_files(folder: Path) -> list[str]:
    """The checkpoint's files, as sorted relative paths: all but the marker and the manifests."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER and not MANIFEST.match(p.name))


def describe(folder: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """fsync each file (it must be on disk before the marker is) and record its size and CRC32."""
    files = {}
    for name in names:
        path = folder / name
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = {"size": path.stat().st_size, "crc32": crc32_of(path)}
    return files


def read_marker(folder: Path) -> dict[str, Any]:
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker}: missing; the checkpoint is incomplete" if folder.is_dir() else f"{folder}: no such checkpoint folder")
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info["files"], dict):
            raise ValueError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable ({exc})") from None
    return info


def check_file(folder: Path, name: str, expected: dict[str, int]) -> None:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CheckpointError(f"{path}: {size} bytes, expected {expected['size']} (truncated or overwritten)")
    if crc32_of(path) != expected["crc32"]:
        raise CheckpointError(f"{path}: checksum mismatch (corrupt)")


def verify(folder: Path, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Check a checkpoint against its marker; raise CheckpointError naming the first bad file.
    With world_size > 1 this rank checks only its share of the files (see CheckpointManager)."""
    info = read_marker(folder)
    files = info["files"]
    for name in sorted(files)[rank::world_size]:
        check_file(folder, name, files[name])
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

    def restore(self, resume: str, strategy) -> tuple[Path, dict[str, Any]] | None:
        """Load the checkpoint `resume` names into the strategy; return it and its saved state.

        `none`: nothing. A path: that checkpoint, or a CheckpointError naming the bad file. `auto`:
        the newest complete checkpoint that loads, saying which ones were skipped and why."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            return path, self.load(path, strategy)
        candidates = list(reversed(self.complete()))
        problems = []
        for step, path in candidates:
            try:
                state = self.load(path, strategy)
            except CheckpointError as exc:
                problems.append(str(exc))
                log.warning("resume=auto: skipping checkpoint step %d, it cannot be used: %s; falling back to an older one", step, exc)
                continue
            if problems:
                log.warning("resume=auto: fell back to %s (%d newer checkpoint(s) unusable)", path, len(problems))
            return path, state
        if problems:
            raise CheckpointError(f"resume=auto: none of the {len(problems)} checkpoints in {self.root} can be used (newest: {problems[0]}); remove them, or set train.resume=none to start over")
        return None

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, strategy, loop_state: dict[str, Any], *, keep: set[int] = frozenset(), asynchronous: bool = False) -> None:
        """Save the state after `step`. Collective. With `asynchronous`, the state is copied now and
        written by a thread; the next save (or `wait`) waits for it."""
        self.wait()
        tmp = self.root / f"step-{step}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        rng = {k: v.clone() for k, v in rng_state(self.device).items()}
        loop_state = json.loads(json.dumps(loop_state))  # a copy: the loop goes on changing its own
        if asynchronous and hasattr(strategy, "staged_state"):
            tensors, extra = strategy.staged_state()  # a copy taken now (pytorch #144657)

            def write() -> None:
                try:
                    fault_point("save-async-write", step, self.rank)
                    self._write_native(tmp, tensors, extra)
                    self._commit(step, tmp, rng, loop_state, keep, strategy)
                except BaseException as exc:  # reported by the next wait()
                    self.pending_error = exc

            self.pending = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
            self.pending.start()
            return
        strategy.save_state(tmp, process_group=self.group)
        self._commit(step, tmp, rng, loop_state, keep, strategy)

    def _write_native(self, tmp: Path, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        from trainer.strategies.native import dcp_writer

        dcp.save(tensors, storage_writer=dcp_writer(tmp / "dcp"), process_group=self.group)
        if self.rank == 0:
            (tmp / "strategy.json").write_text(json.dumps(extra))

    def _commit(self, step: int, tmp: Path, rng: dict[str, torch.Tensor], loop_state: dict[str, Any], keep: set[int], strategy=None) -> None:
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng-{self.rank}.safetensors"))
        if self.rank == 0:
            state = {"loop": loop_state, "config_hash": self.config_hash, "world_size": self.world_size, "strategy": type(strategy).__name__ if strategy else None}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            config = self.root.parent / "config.yaml"
            if config.is_file():  # what `export` builds the model from, even after the run's config changed
                shutil.copyfile(config, tmp / "config.yaml")
        fault_point("save-shard", step, self.rank, before=lambda: self._truncate_own_shards(tmp))
        self._barrier()
        # Every rank fsyncs and checksums a share of the files, in parallel.
        names = payload_files(tmp)
        (tmp / f".manifest-{self.rank}.json").write_text(json.dumps(describe(tmp, names[self.rank :: self.world_size])))
        self._barrier()
        if self.rank == 0:
            files: dict[str, dict[str, int]] = {}
            for r in range(self.world_size):
                files.update(json.loads((tmp / f".manifest-{r}.json").read_text()))
            missing = set(names) - set(files)
            if missing:
                raise CheckpointError(f"{tmp}: no checksum for {sorted(missing)[0]}; a rank did not describe its files")
            fault_point("save-marker", step, self.rank)
            marker = {"step": step, "world_size": self.world_size, "files": files}
            with open(tmp / MARKER, "w") as f:
                f.write(json.dumps(marker))
                f.flush()
                os.fsync(f.fileno())
            for r in range(self.world_size):
                (tmp / f".manifest-{r}.json").unlink()
            for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                fsync_dir(folder)  # the files' names too are on disk before the marker counts
            fault_point("save-rename", step, self.rank)
            final = self.root / f"step-{step}"
            if final.exists():  # a checkpoint of the same step from before a restart
                os.replace(final, self.root / f".deleting-step-{step}")
                shutil.rmtree(self.root / f".deleting-step-{step}", ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            log.info("checkpoint saved: %s", final)
            self.apply_retention(keep, step)
        self._barrier()

    def _truncate_own_shards(self, tmp: Path) -> None:
        for path in list((tmp / "dcp").glob(f"__{self.rank}_*.distcp")) + [tmp / f"rng-{self.rank}.safetensors"]:
            if path.exists():
                os.truncate(path, path.stat().st_size // 2)

    def apply_retention(self, keep: set[int], step: int | None = None) -> None:
        """Keep the newest `save_total_limit` checkpoints, and always the newest and those in `keep`
        (the best one, with load_best_model_at_end)."""
        if not self.save_total_limit:
            return
        done = self.complete()
        newest = done[-1][0] if done else None
        for old, path in done[: max(0, len(done) - self.save_total_limit)]:
            if old == newest or old in keep:
                continue
            doomed = path.with_name(f".deleting-{path.name}")
            os.replace(path, doomed)  # from here on it no longer counts as a checkpoint
            fault_point("save-retention", step if step is not None else -1, self.rank, before=lambda: shutil.rmtree(doomed / "dcp", ignore_errors=True))
            shutil.rmtree(doomed, ignore_errors=True)
            log.info("checkpoint removed (save_total_limit %d): %s", self.save_total_limit, path)

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

    def verify_together(self, path: Path) -> dict[str, Any]:
        """verify(), the files shared out between the ranks: each reads 1/world of the checkpoint,
        then they agree on the first bad file (the same error on every rank, so all fall back or
        fail together). No rank reads the whole checkpoint to check it."""
        info = read_marker(path)
        names = sorted(info["files"])
        first_bad = len(names)
        for i in range(self.rank, len(names), self.world_size):
            try:
                check_file(path, names[i], info["files"][names[i]])
            except CheckpointError:
                first_bad = i
                break
        if dist.is_initialized():
            t = torch.tensor([first_bad], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
            first_bad = int(t)
        if first_bad < len(names):
            check_file(path, names[first_bad], info["files"][names[first_bad]])  # raises, naming it
            raise CheckpointError(f"{path / names[first_bad]}: failed verification on another rank")
        return info

    def load(self, path: Path, strategy) -> dict[str, Any]:
        """Restore strategy state and RNG from a verified checkpoint; return the saved state."""
        self.verify_together(path)
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            state["loop"]["step"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({exc})") from None
        try:
            strategy.load_state(path)
        except (Exception, DCPException) as exc:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{path}: cannot load the model or optimizer state ({type(exc).__name__}: {exc})") from exc
        rng_file = path / f"rng-{self.rank}.safetensors"
        if state.get("world_size") == self.world_size and rng_file.exists():
            set_rng_state(load_file(str(rng_file)), self.device)
        elif state.get("world_size") != self.world_size:
            log.info("checkpoint %s was written by %s rank(s), now %d: the data position maps by samples consumed; random streams start afresh", path, state.get("world_size"), self.world_size)
        if state.get("config_hash") != self.config_hash:
            log.warning("resuming from %s, written by a different config (hash %s, now %s)", path, state.get("config_hash"), self.config_hash)
        return state
