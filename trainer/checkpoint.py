"""Sharded, atomic checkpoints: checkpoints/step-<N>/ counts only when its COMPLETE marker exists.

A save writes into step-<N>.tmp/: every rank its shards (through the strategy) and its RNG state,
rank 0 the loop's state and the config; every file is fsynced as it is closed, its size and CRC32
taken from the bytes as they are written (trainer/durable.py). Each rank lists its own files in
.manifest-<rank>.json; for a strategy that cannot tell which files it wrote (DeepSpeed), the ranks
share out all the files to fsync and read back instead. After a barrier rank 0 merges the
manifests into COMPLETE (every file's size and CRC32, and a save counter: retention and
resume=auto order checkpoints by when they were saved, not by step number) and renames the folder
to step-<N>. A crash at any moment leaves either no step-<N> or a complete one. Re-saving a step
that exists (after a restart) renames the old folder to .replaced-step-<N> first, puts the new one
in place, and only then removes the old one; a crash between the renames is repaired at the next
start by putting the old one back. Rank 0 tells the other ranks whether its part of the commit
worked, so a failure there ends every rank at once with the same error, not at a barrier's timeout.
Retention renames a folder to .deleting-* before removing it, so a half-deleted checkpoint is never
taken for a good one, and never removes the checkpoint just written.
Loading checks every file against the marker first (the ranks share that work too), so a
truncated, missing or corrupt file is named before any state is touched. Nothing here unpickles:
JSON, safetensors, and DCP through safe_dcp. The manager calls the strategy's save_state and
load_state (staged_state and write_state for an asynchronous save, where the strategy can stage), so DeepSpeed's own sharded
format goes through the same marker, retention and resume logic.

train.save_only_model (Trainer's): a checkpoint holds the model's weights, trainer_state.json (the
loop's position, and the schedule's step) and the config; no optimizer, scaler or RNG state.
Loading one for the best model at the end loads the weights. Resuming from one (train.resume, an
elastic restart, a requeue) cannot be the exact resume a full checkpoint gives, and says so: one
warning line in the log and a note in metrics.jsonl's resume event. It loads the weights, the
data position and the schedule's step; the optimizer starts afresh, as in Trainer, which resumes
such a checkpoint quietly with a new optimizer and a schedule from its first step again. It is not
refused: ringleader resumes by itself after a crash or a requeue, and losing the run's progress
there would be worse than a fresh optimizer. The checkpoint a stop writes (Ctrl-C, SIGTERM,
SLURM's USR2 before a requeue) is a full one all the same (`save(full=True)`): the job is about to
be resumed from it, so that resume stays exact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from launcher.files import fsync_dir
from launcher.options import parse_optim_args
from trainer.durable import FileInfo, crc32_of, describe, write_file
from trainer.faults import fault_point

log = logging.getLogger("ringleader")
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")
REPLACED = re.compile(r"^\.replaced-(step-\d+)$")  # an older save of a step, while a new one replaces it
MANIFEST = re.compile(r"^\.manifest-\d+\.json$")
SAVE_SWITCH_INTERVAL_S = 5e-5  # sys.setswitchinterval while an asynchronous save runs (see save)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class ConfigChangedError(RuntimeError):
    """A checkpoint written with a config that changes the trajectory, without
    train.resume_with_changed_config. Not a CheckpointError: resume=auto must not fall back past it."""


def save_seq(folder: Path) -> int:
    """The save counter in a checkpoint's marker; -1 for one written before the counter existed."""
    try:
        seq = json.loads((folder / MARKER).read_text()).get("save_seq", -1)
    except (OSError, ValueError, AttributeError):
        return -1
    return seq if isinstance(seq, int) else -1


def payload_files(folder: Path) -> list[str]:
    """The checkpoint's files, as sorted relative paths: all but the marker and the manifests."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER and not MANIFEST.match(p.name))


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
    def __init__(self, root: Path, *, rank: int, world_size: int, device: torch.device, save_total_limit: int, config_hash: str, process_group=None, config: dict[str, Any] | None = None, allow_config_change: bool = False) -> None:
        self.root, self.rank, self.world_size, self.device = root, rank, world_size, device
        self.save_total_limit, self.config_hash = save_total_limit, config_hash
        # The run's config (as config.yaml holds it): a checkpoint written with one that changes the
        # trajectory is refused unless allow_config_change (train.resume_with_changed_config).
        self.config, self.allow_config_change = config, allow_config_change
        self.last_seq: int | None = None  # rank 0: the newest save counter on disk, read once
        # A process group of its own (gloo) lets an asynchronous save run its collectives in a
        # thread while training uses the default group.
        self.group = process_group
        # train.save_only_model: checkpoints of the model only (see the module's docstring).
        self.model_only = bool(((config or {}).get("train") or {}).get("save_only_model", False))
        self.pending: threading.Thread | None = None
        self.pending_error: BaseException | None = None
        self._base: dict[str, Any] | None = None  # a LoRA run's base weights: base_identity, taken once

    # -- finding ---------------------------------------------------------------------------------

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest save first: by the marker's save counter, then by step (a
        restart that falls back re-saves lower steps after higher ones: step number is not age)."""
        if not self.root.is_dir():
            return []
        found = [(save_seq(p), int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
        return [(step, p) for _, step, p in sorted(found)]

    def clean_incomplete(self) -> None:
        """Rank 0, at start, before any save: remove what crashed saves and deletions left. A
        .replaced-step-N whose step-N is missing is the old copy of a re-save that crashed between
        its two renames: it goes back in place (the new copy, step-N.tmp, is removed as unfinished)."""
        if self.rank != 0 or not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if (m := REPLACED.match(p.name)) and not (self.root / m.group(1)).exists() and (p / MARKER).is_file():
                os.replace(p, self.root / m.group(1))
                fsync_dir(self.root)
                log.warning("a re-save of %s was interrupted: the earlier %s is back in place", m.group(1), m.group(1))
        for p in self.root.iterdir():
            if p.name.endswith(".tmp") or p.name.startswith((".deleting-", ".replaced-")) or (STEP_DIR.match(p.name) and not (p / MARKER).exists()):
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
            return path, self.noted(path, self.load(path, strategy))
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
            return path, self.noted(path, state)
        if problems:
            raise CheckpointError(f"resume=auto: none of the {len(problems)} checkpoints in {self.root} can be used (newest: {problems[0]}); remove them, or set train.resume=none to start over")
        return None

    @staticmethod
    def noted(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """A resume from a model-only checkpoint says so, in one warning line; state["note"] is the
        same line for metrics.jsonl's resume event."""
        if state.get("save_only_model"):
            state["note"] = (
                f"resumed from {path}, a train.save_only_model checkpoint: weights, data position and schedule step restored, "
                "optimizer state and random streams started afresh, so this is not an exact resume; train.save_only_model=false keeps exact resumes"
            )
            log.warning("%s", state["note"])
        return state

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, strategy, loop_state: dict[str, Any], *, keep: AbstractSet[int] = frozenset(), asynchronous: bool = False, full: bool = False) -> None:
        """Save the state after `step`. Collective. With `asynchronous`, a thread copies the state
        and writes it; this returns at once, and the strategy's next step() waits for the copy
        only (see NativeStrategy.staged_state). The next save (or `wait`) waits for the whole.
        `full`: a whole checkpoint even with train.save_only_model (a stop's, resumed next)."""
        self.wait()
        tmp = self.root / f"step-{step}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        model_only = self.model_only and not full
        rng = None if model_only else {k: v.clone() for k, v in rng_state(self.device).items()}
        loop_state = json.loads(json.dumps(loop_state))  # a copy: the loop goes on changing its own
        if model_only:  # the schedule's step, taken now: an asynchronous save commits steps later
            loop_state["schedule_position"] = schedule_position(strategy)
        staged = threading.Event()
        # A strategy that cannot stage its state (DeepSpeed) saves synchronously.
        parts = strategy.staged_state(staged, model_only=model_only) if asynchronous else None
        if parts is not None:
            tensors, extra, copy = parts
            # CPython passes the GIL on after 5 ms by default: while the writer runs Python (DCP
            # serialises tensor by tensor), training then waits up to 5 ms for it after every
            # operator (the convoy effect, CPython issue 7946); a busy thread made training
            # steps ~3x slower here. A short interval while the save runs lets them interleave.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, SAVE_SWITCH_INTERVAL_S))

            def write() -> None:
                try:
                    try:
                        fault_point("save-async-copy", step, self.rank)
                        copy()
                    finally:
                        staged.set()  # training may change the state from here on
                    fault_point("save-async-write", step, self.rank)
                    written = strategy.write_state(tmp, tensors, extra, process_group=self.group)
                    self._commit(step, tmp, rng, loop_state, keep, strategy, written)
                except BaseException as exc:  # reported by the next wait()
                    self.pending_error = exc
                finally:
                    sys.setswitchinterval(interval)

            self.pending = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
            try:
                self.pending.start()
            except BaseException:
                staged.set()  # no thread: training must not wait for it forever
                sys.setswitchinterval(interval)
                self.pending = None
                raise
            return
        written = strategy.save_state(tmp, process_group=self.group, model_only=model_only)
        self._commit(step, tmp, rng, loop_state, keep, strategy, written)

    def _commit(self, step: int, tmp: Path, rng: dict[str, torch.Tensor] | None, loop_state: dict[str, Any], keep: AbstractSet[int], strategy, written: dict[str, FileInfo] | None) -> None:
        """Write this rank's RNG state (rank 0: the loop's state and the config), describe the files
        and, on rank 0, write the marker and rename. `written`: the files the strategy wrote on this
        rank, fsynced, with size and CRC32; None when it cannot tell (DeepSpeed), and then the ranks
        share out all the files to fsync and read back. `rng` None: a model-only checkpoint."""
        own = {} if rng is None else {f"rng-{self.rank}.safetensors": write_file(tmp / f"rng-{self.rank}.safetensors", safetensors_bytes({k: v.contiguous() for k, v in rng.items()}))}
        if self.rank == 0:
            loop_state = dict(loop_state)
            position = loop_state.pop("schedule_position", None)  # not the loop's: beside it
            state = {"loop": loop_state, "config_hash": self.config_hash, "world_size": self.world_size, "strategy": type(strategy).__name__ if strategy else None}
            if rng is None:  # train.save_only_model: what the checkpoint is, and where the schedule stood
                state.update(save_only_model=True, schedule_position=position)
            if (base := self.peft_base()) is not None:  # the adapter's checkpoint holds no base weights: say which it needs
                state["peft_base"] = base
            own["trainer_state.json"] = write_file(tmp / "trainer_state.json", json.dumps(state, indent=1).encode())
            config = self.root.parent / "config.yaml"
            if config.is_file():  # what `export` builds the model from, even after the run's config changed
                own["config.yaml"] = write_file(tmp / "config.yaml", config.read_bytes())
        fault_point("save-shard", step, self.rank, before=lambda: self._truncate_own_shards(tmp))
        self._barrier()
        names = payload_files(tmp)
        mine = {**written, **own} if written is not None else describe(tmp, names[self.rank :: self.world_size])
        (tmp / f".manifest-{self.rank}.json").write_text(json.dumps(mine))
        self._barrier()
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._finish(step, tmp, names, keep)
            except Exception as exc:  # every rank learns of it below, and raises
                error = exc
        self._agree(step, error)

    def _agree(self, step: int, error: BaseException | None) -> None:
        """In place of a bare barrier: rank 0 says whether its part of the commit worked. On a
        failure every rank raises (rank 0 its own error), rather than the others waiting at the
        next collective until ddp_timeout."""
        failed = error is not None
        if dist.is_initialized():
            flag = torch.tensor([int(failed)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            failed = bool(flag.item())
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(f"{self.root / f'step-{step}'}: rank 0 could not commit the checkpoint (its error is in logs/rank-0.log)")

    def _finish(self, step: int, tmp: Path, names: list[str], keep: AbstractSet[int]) -> None:
        """Rank 0: merge the manifests into the marker, rename the folder into place, apply retention."""
        files: dict[str, FileInfo] = {}
        for r in range(self.world_size):
            files.update(json.loads((tmp / f".manifest-{r}.json").read_text()))
        missing = set(names) - set(files)
        if missing:
            raise CheckpointError(f"{tmp}: no checksum for {sorted(missing)[0]}; a rank did not describe its files")
        changed = [name for name, info in files.items() if (tmp / name).stat().st_size != info["size"]]
        if changed:  # written to after it was described: its checksum would not hold
            raise CheckpointError(f"{tmp / changed[0]}: {(tmp / changed[0]).stat().st_size} bytes, described with {files[changed[0]]['size']}")
        fault_point("save-marker", step, self.rank)
        if self.last_seq is None:
            self.last_seq = max((save_seq(p) for _, p in self.complete()), default=-1)
        self.last_seq += 1
        marker = {"step": step, "world_size": self.world_size, "save_seq": self.last_seq, "files": files}
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
        replaced = self.root / f".replaced-step-{step}"
        if final.exists():  # a checkpoint of the same step from before a restart: kept until the new one is in place
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            fault_point("save-replace", step, self.rank)
        os.replace(tmp, final)
        fsync_dir(self.root)
        if replaced.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
        self.apply_retention(keep, step)

    def _truncate_own_shards(self, tmp: Path) -> None:
        for path in list((tmp / "dcp").glob(f"__{self.rank}_*.distcp")) + [tmp / f"rng-{self.rank}.safetensors"]:
            if path.exists():
                os.truncate(path, path.stat().st_size // 2)

    def apply_retention(self, keep: AbstractSet[int], step: int | None = None) -> None:
        """Keep the `save_total_limit` most recently saved checkpoints, and always the one just
        written (`step`), the most recent and those in `keep` (the best one, with
        load_best_model_at_end). Recent by save order, not step number: after a fallback to an
        older checkpoint, the higher steps on disk are the older saves (and may be corrupt)."""
        if not self.save_total_limit:
            return
        done = self.complete()
        newest = done[-1][0] if done else None
        for old, path in done[: max(0, len(done) - self.save_total_limit)]:
            if old in (newest, step) or old in keep:
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
        self.check_config(path, state)
        self.check_base(path, state)
        from torch.distributed.checkpoint.api import CheckpointException as DCPException

        try:
            strategy.load_state(path)
        except (Exception, DCPException) as exc:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{path}: cannot load the model or optimizer state ({type(exc).__name__}: {exc})") from exc
        if state.get("save_only_model") and isinstance(state.get("schedule_position"), int):
            seek_schedule(strategy, state["schedule_position"])
        rng_file = path / f"rng-{self.rank}.safetensors"
        if state.get("world_size") == self.world_size and rng_file.exists():
            set_rng_state(load_file(str(rng_file)), self.device)
        elif state.get("world_size") != self.world_size:
            log.info("checkpoint %s was written by %s rank(s), now %d: the data position maps by samples consumed; random streams start afresh", path, state.get("world_size"), self.world_size)
        return state

    def peft_base(self) -> dict[str, Any] | None:
        """For a LoRA run (peft.method lora or qlora), the identity of its base weights
        (trainer/lora.py base_identity: the folder, config.json's hash, the weight files' sizes and
        times); None for full training."""
        config = self.config or {}
        peft, model = config.get("peft") or {}, config.get("model") or {}
        if peft.get("method", "none") == "none":
            return None
        if self._base is None:
            from trainer.lora import base_identity

            self._base = base_identity(str(model.get("name_or_path", "")), str(model.get("revision", "") or ""))
        return self._base

    def check_base(self, path: Path, state: dict[str, Any]) -> None:
        """A LoRA checkpoint resumes on the base weights it was trained on: they are not in it, they
        load from model.name_or_path. A base that changed since is refused (not a CheckpointError:
        resume=auto must not fall back past it, every checkpoint of the run needs that base)."""
        saved, now = state.get("peft_base"), self.peft_base()
        if saved is None or now is None:
            return
        from trainer.lora import base_difference

        if why := base_difference(saved, now):
            raise ConfigChangedError(
                f"{path} holds a LoRA adapter of the base {saved.get('folder') or saved.get('name_or_path')}, not its weights, and that base changed since ({why}); "
                "resume with the base it was trained on, or start over with train.resume=none"
            )

    def check_config(self, path: Path, state: dict[str, Any]) -> None:
        """The ranks' safety net behind the launcher's check (launcher/rundir.py): a checkpoint
        written with a config that changes the trajectory is refused unless allowed. Same keys,
        same rules (launcher/trajectory.py); before any state is touched."""
        if state.get("config_hash") == self.config_hash:
            return
        saved = path / "config.yaml"
        if self.config is None or not saved.is_file():  # nothing to compare with: say so
            log.warning("resuming from %s, written by a different config (hash %s, now %s)", path, state.get("config_hash"), self.config_hash)
            return
        from omegaconf import OmegaConf

        from launcher.trajectory import changed_keys, describe

        old = OmegaConf.to_container(OmegaConf.load(saved))
        assert isinstance(old, dict)  # a config.yaml is a mapping
        diff = changed_keys({str(k): v for k, v in old.items()}, state.get("world_size"), self.config, self.world_size)
        if not diff:
            return
        if not self.allow_config_change:
            raise ConfigChangedError(f"{path} was written with another config: {describe(diff)}; set train.resume_with_changed_config=true to continue with the new values, or resume with the old ones")
        log.warning("resuming from %s with a changed config (train.resume_with_changed_config): %s", path, describe(diff))


def schedule_position(strategy) -> int:
    """The learning-rate schedule's step: optimizer steps applied (an update skipped by the fp16
    scaler or train.nonfinite=skip does not advance it, as in Trainer)."""
    return int(strategy.scheduler.last_epoch)


def seek_schedule(strategy, position: int) -> None:
    """Place the strategy's fresh schedule at `position` (a model-only checkpoint's step): the
    learning rate the restored step would have had, not the first step's warmup again. Every
    schedule is a LambdaLR (trainer/optim.py); its own optimizer's groups are the ones it sets."""
    scheduler = strategy.scheduler
    scheduler.last_epoch = position
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(position)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def apply_new_config(strategy, cfg) -> None:
    """train.resume_with_changed_config, after a checkpoint was loaded: the optimizer's
    hyperparameters come from the new config (cfg: the RunConfig), and the schedule is rebuilt from
    it at the restored step. The strategy built its schedule from the new config and plan
    (scheduler.*, total and warmup steps); loading restored only its position and the old base
    learning rate, which is replaced here. Group 0 is the weight-decay group (trainer/optim.py)."""
    o = cfg.optimizer
    optimizer, scheduler = strategy.optimizer, strategy.scheduler
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = o.learning_rate
        if i == 0 and "weight_decay" in group:
            group["weight_decay"] = o.weight_decay
        if "betas" in group:
            group["betas"] = (o.adam_beta1, o.adam_beta2)
        if "eps" in group and not isinstance(group["eps"], tuple):  # Adafactor's eps is its own (eps1, eps2)
            group["eps"] = o.adam_epsilon
        if "momentum" in group:
            group["momentum"] = o.momentum
        group.update((k, v) for k, v in parse_optim_args(o.name, o.optim_args).items() if k in group)  # optimizer.optim_args
    scheduler.base_lrs = [o.learning_rate] * len(optimizer.param_groups)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    log.info("train.resume_with_changed_config: learning rate %.4g at step %d of the new schedule", optimizer.param_groups[0]["lr"], scheduler.last_epoch)
