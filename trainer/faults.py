"""Fault injection for the reliability tests: crash, stall or slow one rank at a named point.

    RINGLEADER_FAULT="POINT:RANK:STEP[:ACTION][@ATTEMPT]"     several joined by ","

ACTION is `kill` (the default: the rank SIGKILLs itself, as the OOM killer or a lost node would),
`stall` (the rank sleeps for an hour, as a deadlocked or wedged rank would) or `delay` (it sleeps
2 s and goes on, as a slow disk would) or `error` (it raises OSError there). A fault fires only in torchrun's attempt ATTEMPT
(TORCHELASTIC_RESTART_COUNT; 0 by default), so elastic restarts run clean, or crash elsewhere.
Never set outside tests: unset, it costs one environment lookup at import.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger("ringleader")
ENV = "RINGLEADER_FAULT"

POINTS = {
    "step": "after optimizer step STEP, before that step's collective (trainer/loop.py)",
    "save-shard": "saving step STEP: this rank's shard is half written (trainer/checkpoint.py)",
    "save-marker": "saving step STEP: all files in, before the COMPLETE marker (rank 0)",
    "save-rename": "saving step STEP: marker written, before step-N.tmp becomes step-N (rank 0)",
    "save-retention": "saving step STEP: an old checkpoint renamed and partly deleted (rank 0)",
    "save-replace": "re-saving step STEP over an existing step-N: the old one renamed aside, the new one not yet in place (rank 0)",
    "save-async-copy": "saving step STEP asynchronously: in the writer thread, before it copies the state",
    "save-async-write": "saving step STEP asynchronously: in the writer thread, state copied, before it writes",
    "eval": "evaluating after step STEP: before each evaluation batch (trainer/loop.py)",
    "overflow": "optimizer step STEP: this rank's gradients become inf (an fp16 overflow, or a non-finite step); no ACTION",
    "oom": "optimizer step STEP: torch.OutOfMemoryError after the first micro-batch's backward, once (train.auto_find_batch_size: trainer/autobatch.py); no ACTION",
}


def parse(spec: str, attempt: int) -> list[tuple[str, int, int, str]]:
    """The faults of `spec` planned for this attempt."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        fault, _, when = item.partition("@")
        point, rank, step, *action = fault.split(":")
        if point not in POINTS or (action and action[0] not in ("kill", "stall", "delay", "error")) or (when and not when.isdigit()):
            raise ValueError(f"{ENV}: bad fault '{item}'; write POINT:RANK:STEP[:kill|stall|delay|error][@ATTEMPT], POINT one of {', '.join(POINTS)}")
        if int(when or 0) == attempt:
            faults.append((point, int(rank), int(step), action[0] if action else "kill"))
    return faults


FAULTS = parse(os.environ.get(ENV, ""), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def planned(point: str, step: int, rank: int) -> bool:
    """Whether a fault that changes a value rather than the process (overflow) is planned here."""
    return any((p, r, s) == (point, rank, step) for p, r, s, _ in FAULTS)


def fault_point(point: str, step: int, rank: int, before: Callable[[], None] | None = None) -> None:
    """Fire the fault planned for (point, rank, step), if any; `before` leaves what a crash at that
    moment would leave on disk (half a file, a half-deleted folder)."""
    for p, r, s, action in FAULTS:
        if (p, r, s) != (point, rank, step):
            continue
        if before is not None:
            before()
        log.warning("fault injection (%s): %s at %s, step %d", ENV, action, point, step)
        for handler in logging.getLogger("ringleader").handlers:
            handler.flush()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "error":  # as a full disk or a failed rename would: an exception, the process lives on
            raise OSError(f"fault injection ({ENV}): error at {point}, step {step}")
        time.sleep(3600 if action == "stall" else 2)
