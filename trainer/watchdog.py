"""Hangs: name the rank that stopped answering, and make sure a stalled rank exits.

A collective that waits longer than train.ddp_timeout raises on the ranks that wait (gloo and NCCL
both). Those ranks then meet in torch.distributed.monitored_barrier on the gloo checkpoint group:
rank 0 learns which ranks do not arrive and says so (pytorch #118369: a bare timeout names no one).

A rank stalled outside a collective (a deadlock, a wedged data loader, a step slowed to a crawl)
never sees that timeout. When the others fail, torchrun sends it SIGTERM, whose handler only asks
the loop to stop at the next step boundary, which a stalled rank never reaches; torchrun's SIGKILL
follows 30 s later. The Watchdog thread notices the request; if the loop makes no step within a
grace period it logs every thread's stack (where the rank was stuck) and exits the process.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("ringleader")


class StalledRankError(RuntimeError):
    """A collective timed out; the message names the ranks that did not answer, when known."""


def is_collective_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and not isinstance(exc, StalledRankError) and bool(re.search(r"timed out|timeout", text, re.IGNORECASE))


def name_stalled_ranks(exc: BaseException, *, rank: int, group, timeout_s: float) -> StalledRankError:
    """After a collective timed out: find which ranks do not answer, with a monitored barrier."""
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        found = "every rank answered a barrier afterwards (a rank was slow, not gone)"
    except RuntimeError as barrier_error:
        text = str(barrier_error)
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if missing:
            found = f"rank(s) {missing.group(1).strip()} stalled: they did not reach a barrier within {timeout_s:g} s"
        elif rank != 0 and "from rank 0" in text:
            found = "rank 0 did not confirm a barrier; rank 0's log names the stalled rank(s), or rank 0 is the one stalled"
        else:
            found = f"a barrier to find the stalled rank failed too: {text.splitlines()[0]}"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StalledRankError(f"a collective timed out on rank {rank} (train.ddp_timeout): {found}. ({first})")


@dataclass
class Activity:
    """What the loop does between steps, for the watchdog: evaluation batches done (a heartbeat),
    and whether a checkpoint is being written."""

    beats: int = 0
    saving: bool = False


class Watchdog:
    """Ends this rank if it makes no progress within `grace` seconds of SIGTERM or SIGINT.

    Progress is a training step (the loop's step counter), an evaluation batch, or a checkpoint
    being written (`Activity`): a rank in a long evaluation or save when the signal comes is doing
    what the stop needs (the evaluation ends at its next batch, the save is the stop checkpoint),
    and is left alone. The grace is 3x the slowest step seen, at least 5 s and at most 25 s
    (torchrun and SLURM kill after 30 s anyway); before the first step it is 25 s. A rank that does
    step after the signal is stopping as asked, and is left alone to save its checkpoint.
    """

    POLL_S = 0.2

    def __init__(self, stop, state, *, rank: int, log_file: Path, activity: Activity | None = None) -> None:
        self.stop, self.state, self.rank, self.log_file = stop, state, rank, log_file
        self.activity = activity or Activity()
        self.thread = threading.Thread(target=self.run, name="ringleader-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def grace(self, slowest_step: float | None) -> float:
        return 25.0 if slowest_step is None else min(25.0, max(5.0, 3 * slowest_step))

    def run(self) -> None:
        last_step, last_step_time, slowest = self.state.step, time.monotonic(), None
        beats, alive_at = self.activity.beats, last_step_time
        asked_at = None
        while True:  # a daemon thread: it ends with the process
            time.sleep(self.POLL_S)
            now, step = time.monotonic(), self.state.step
            if step != last_step:
                slowest = max(slowest or 0.0, (now - last_step_time) / max(1, step - last_step))
                last_step, last_step_time, alive_at = step, now, now
                if asked_at is not None:
                    return  # stepping after the signal: the loop stops by itself
            if self.activity.saving or self.activity.beats != beats:
                beats, alive_at = self.activity.beats, now
            if asked_at is None and self.stop.signum and self.stop.name in ("SIGTERM", "SIGINT"):
                asked_at = now
            if asked_at is not None and now - max(asked_at, alive_at) > self.grace(slowest):
                self.expire(now - asked_at)

    def expire(self, waited: float) -> None:
        with open(self.log_file, "a") as f:
            f.write(f"--- rank {self.rank}: stacks of every thread, {waited:.1f} s after {self.stop.name} with no training step\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.error("rank %d stalled (error: no training step within %.0f s of %s, at step %d); exiting, its stack is in %s", self.rank, waited, self.stop.name, self.state.step, self.log_file)
        for handler in logging.getLogger("ringleader").handlers:
            handler.flush()
        os._exit(124)
