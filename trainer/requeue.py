"""The trainer's side of a SLURM requeue: whether rank 0's result asks the batch script for one.

The batch script (cluster/slurm_render.py) requeues the job when result.json says `"requeue": true`;
this is the only place that decides it. No torch: tests call it directly."""

from __future__ import annotations


def stop_status(result: dict, *, signal_name: str, job_id: str, restarts: int, max_requeues: int) -> dict:
    """Rank 0, at the end of a SLURM job's start: after USR2, ask the batch script for a requeue
    while the job has been restarted (SLURM_RESTART_COUNT) fewer than max_requeues times; at the
    cap, say so in the status."""
    if result.get("status") != "stopped" or signal_name != "SIGUSR2" or not job_id:
        return result
    if restarts < max_requeues:
        return {**result, "requeue": True, "restarts": restarts}
    return {**result, "status": "requeue_limit", "requeue": False, "restarts": restarts,
            "message": f"stopped by the time limit signal after {restarts} requeue(s), cluster.max_requeues={max_requeues}; rerun the same command to continue"}
