"""SLURM's side effects for a run directory: submit the rendered script with sbatch, record the job
id (slurm.json), ask the controller about the job, follow it, cancel it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.slurm_render import SCRIPT_NAME
from launcher.errors import ConfigError
from launcher.files import atomic_write, print_appended

if TYPE_CHECKING:
    from launcher.plan import Plan

JOB_FILE = "slurm.json"  # the job id(s) of this run directory, for status/logs/cancel
# States after which a job will not run again (a requeued job passes REQUEUED/PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
JOB_ID = re.compile(r"[0-9]+")  # what sbatch --parsable prints; nothing else reaches scancel or a file name


def check_sbatch(environ: Mapping[str, str] | None = None) -> None:
    """A run that submits a job needs sbatch on this machine."""
    if shutil.which("sbatch", path=(os.environ if environ is None else environ).get("PATH")) is None:
        raise ConfigError("cluster", "sbatch is not on PATH, so this machine cannot submit a SLURM job; run on a login node of the cluster, or use dry_run=true to print the script")


def submit(plan: Plan, *, wait: bool) -> int:
    """Write the script into the run directory, sbatch it, record the job id; follow it if cluster.wait."""
    run_dir = Path(plan.run_dir)
    atomic_write(run_dir / SCRIPT_NAME, plan.script)
    # The plan prints `ENV=... sbatch ...`: submit exactly that (sbatch passes the environment on).
    import subprocess  # here, not at the top: it costs a dry run ~15 ms
    proc = subprocess.run(plan.command, capture_output=True, text=True, env={**os.environ, **plan.env})
    if proc.returncode != 0:
        print(f"ringleader: error: sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}", file=sys.stderr)
        return 1
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "ID" or "ID;CLUSTER"
    if not JOB_ID.fullmatch(job_id):
        print(f"ringleader: error: sbatch printed {proc.stdout.strip()!r}, not a job id; check the job with squeue", file=sys.stderr)
        return 1
    record_job(run_dir, job_id)
    print(f"ringleader: submitted job {job_id}\nringleader: run directory {run_dir}\nringleader: logs {run_dir}/logs/rank-0.log (and slurm-{job_id}.log)", flush=True)
    print(f"ringleader: python -m launcher status|logs|cancel {shlex.quote(str(run_dir))}", flush=True)
    if not wait:
        return 0
    return follow(run_dir, job_id)


def record_job(run_dir: Path, job_id: str) -> None:
    path = run_dir / JOB_FILE
    try:  # the job is submitted already: a damaged history of earlier jobs must not fail it
        previous = json.loads(path.read_text()) if path.exists() else {}
        history = [j for j in previous.get("jobs", []) if isinstance(j, dict)] if isinstance(previous, dict) and isinstance(previous.get("jobs"), list) else []
    except (OSError, ValueError):
        history = []
    jobs = [*history, {"job_id": job_id, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}]
    atomic_write(path, json.dumps({"job_id": job_id, "jobs": jobs}, indent=2) + "\n")  # fsynced: status/cancel and reruns rely on it


def read_job(run_dir: Path) -> str | None:
    """The run's last job id from slurm.json, None when there is none. A damaged file (not JSON, no
    job_id, an id that is not digits) is a ConfigError naming the file: its id goes to scancel."""
    path = run_dir / JOB_FILE
    if not path.exists():
        return None
    fix = "it is written by the launcher at submission; find the job with squeue and delete the file, or submit again"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"cannot read it as JSON ({' '.join(str(exc).split())}); {fix}") from exc
    job_id = data.get("job_id") if isinstance(data, dict) else None
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise ConfigError(str(path), f"job_id is {job_id!r}, not a SLURM job id (digits); {fix}")
    return job_id


def job_info(job_id: str) -> dict[str, str]:
    """The controller's view of a job (`scontrol show job`), {} once it has forgotten the job."""
    import subprocess
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no scontrol here, or a controller that does not answer
        return {}
    if proc.returncode != 0:
        return {}
    line = next((text for text in proc.stdout.splitlines() if "JobState=" in text), "")
    info = {}
    for key in ("JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "NodeList", "ExitCode", "Requeue", "BatchHost"):
        if m := re.search(rf"(?:^|\s){key}=(\S*)", line):
            info[key] = m.group(1)
    # Output without a state (another SLURM's format, a wrapper's message) says nothing about the job.
    return info if re.fullmatch(r"[A-Z_]+", info.get("JobState", "")) else {}


def follow(run_dir: Path, job_id: str, *, poll_s: float = 1.0) -> int:
    """Print rank 0's log as it grows until the job is over (requeues included). Exit code: 0 when
    result.json says completed (or early_stopped)."""
    log = run_dir / "logs" / "rank-0.log"
    offset = 0
    state = ""
    try:
        while True:
            offset = print_appended(log, offset)
            info = job_info(job_id)
            if info.get("JobState") != state and info:
                state = info["JobState"]
                print(f"ringleader: job {job_id} {state}" + (f" ({info['Reason']})" if info.get("Reason") not in (None, "None") else ""), flush=True)
            if not info or state in FINAL_STATES:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nringleader: stopped following; job {job_id} keeps running. python -m launcher cancel {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 130
    result_path = run_dir / "result.json"
    status = json.loads(result_path.read_text()).get("status") if result_path.exists() else None
    print(f"ringleader: job {job_id} ended {state or 'gone'}; result {status or 'missing'}; run directory {run_dir}", flush=True)
    return 0 if status in ("completed", "early_stopped") else 1
