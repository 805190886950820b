"""The SLURM backend: `render_job` turns a plan into an sbatch script (pure), `submit` hands it to sbatch.

The job: one task per node (srun), each running torchrun for its node; torchrun's c10d rendezvous
runs on the first node of the allocation and `--rdzv_id` is the job id, so a requeued job (same id)
rendezvouses again by itself and resumes from the newest complete checkpoint in the same run
directory (`train.resume=auto`).

Why the script is ours and not submitit's: submitit's executor writes its own sbatch script around
a pickled function (`python -m submitit.core._submit FOLDER`), so a dry run could not print what
really runs, and its checkpoint/requeue hook runs in that one Python task per node, not in
torchrun's workers, which are the processes that must stop at a step boundary. So the script is
rendered here, printed by the dry run, saved in the run directory, and that exact file is what
`sbatch --parsable` receives. (Reusing submitit for the submission itself would mean its private
`_submit_command`; the 10 lines here are simpler than depending on that.)

Stopping: SLURM sends USR2 (`--signal=USR2@signal_delay_s`) before the time limit to every process
of the job step: torchrun's workers and torchrun itself. USR2 and not USR1, as submitit: NCCL may
catch USR1. torchrun does not handle USR2 (its default action would kill the agent and orphan the
workers), so each node's task ignores it before exec'ing torchrun (`trap '' USR2` in the small
`bash -c` wrapper: an ignored signal stays ignored across exec, and the workers install their own
handler). Workers stop together at the next step boundary, save a checkpoint, and rank 0 writes
result.json with `"requeue": true` while fewer than `cluster.max_requeues` restarts happened
(SLURM_RESTART_COUNT); the batch script then runs `scontrol requeue`. At the cap, result.json says
`"status": "requeue_limit"` and the job ends. SIGTERM (scancel, or preemption) also stops the ranks
at a step boundary with a checkpoint, but is not requeued by ringleader: `scancel` means stop, and
a cluster that preempts with PreemptMode=REQUEUE requeues the job itself (`--requeue` allows it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from launcher.errors import ConfigError
from launcher.rules import setup_words
from launcher.files import atomic_write
from launcher.schema import RunConfig

SCRIPT_NAME = "job.sbatch"
JOB_FILE = "slurm.json"  # the job id(s) of this run directory, for status/logs/cancel
# States after which a job will not run again (a requeued job passes REQUEUED/PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
JOB_ID = re.compile(r"[0-9]+")  # what sbatch --parsable prints; nothing else reaches scancel or a file name


def q(value: object) -> str:
    """Quote one value for the script. sbatch's own #SBATCH parser understands these quotes too."""
    text = str(value)
    # Validation already refused these; a value that reaches here with one would be a bug.
    assert not any(c in text for c in "\n\r\0"), f"newline or NUL in a script value: {text!r}"
    return shlex.quote(text)


def directives(cfg: RunConfig, plan) -> list[tuple[str, str | None]]:
    """The #SBATCH options, from the plan, the hw profile and the cluster group."""
    c, hw = cfg.cluster, cfg.hw
    gpus = c.gpus_per_node if c.gpus_per_node >= 0 else (hw.gpus_per_node if hw.accelerator == "cuda" else 0)
    opts: list[tuple[str, str | None]] = [
        ("job-name", f"ringleader-{Path(plan.run_dir).name}"),
        ("nodes", str(plan.nodes)),
        ("ntasks-per-node", "1"),  # one torchrun per node; it starts nproc_per_node ranks
        ("cpus-per-task", str(c.cpus_per_task or hw.cpus_per_node or 1)),
    ]
    if gpus > 0:
        opts.append(("gpus-per-node", str(gpus)))
    if c.mem_gb > 0:
        opts.append(("mem", f"{c.mem_gb}G"))
    opts.append(("time", str(c.time_min)))
    for key in ("partition", "account", "qos", "constraint"):
        if value := getattr(c, key):
            opts.append((key, value))
    if c.exclusive:
        opts.append(("exclusive", None))
    opts += [
        ("output", f"{plan.run_dir}/logs/slurm-%j.log"),  # the batch script's own output; ranks log to logs/rank-N.log
        ("open-mode", "append"),  # a requeued job keeps its id: append, do not truncate
        ("signal", f"USR2@{c.signal_delay_s}"),  # to every process of the job steps, signal_delay_s before the time limit
        ("requeue", None),
    ]
    for key, value in c.sbatch_extra.items():  # checked: launcher/schema.py ClusterConfig.check_slurm
        opts.append((str(key), str(value) if value not in (None, "") else None))
    return opts


def check_can_submit(cfg: RunConfig, environ=None) -> None:
    """Before anything is written: a cluster=slurm run that submits a job needs sbatch here. Not a
    dry run (it must work on a laptop without SLURM), nor a task of `srun python -m launcher`
    (it runs torchrun on its node and submits nothing)."""
    if cfg.cluster.name != "slurm" or cfg.dry_run or allocation_task(environ) is not None:
        return
    if shutil.which("sbatch", path=(os.environ if environ is None else environ).get("PATH")) is None:
        raise ConfigError("cluster", "sbatch is not on PATH, so this machine cannot submit a SLURM job; run on a login node of the cluster, or use dry_run=true to print the script")


ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*=)(.*)", re.DOTALL)


def setup_word(word: str) -> str:
    """One word of a setup line, quoted. `NAME=value` keeps its name outside the quotes, so a leading
    assignment (`CC=gcc make`) stays an assignment and `export NAME=value` reads as typed."""
    if match := ASSIGNMENT.fullmatch(word):
        return match.group(1) + shlex.quote(match.group(2))
    return shlex.quote(word)


def setup_line(line: str, index: int) -> str:
    """A setup line is one simple command (`module load cuda/12.4`, `source /path/venv/bin/activate`,
    `export HF_HOME=/scratch/hf`): split into words as a shell would, and each word quoted, so no
    `$(...)`, backtick, `;` or `|` in it ever runs. A line that uses any of them is refused
    (launcher/rules.py setup_words) rather than run as literal words."""
    return " ".join(setup_word(w) for w in setup_words(line, index))


def node_command(cfg: RunConfig, plan, python: str) -> list[str]:
    """What srun starts on each node: the container (if any), the USR2 guard, torchrun."""
    c = cfg.cluster
    if c.container:
        python = "python"  # the image's interpreter; the submitting machine's path means nothing inside it
    torchrun = [
        python, "-m", "torch.distributed.run",
        f"--nnodes={plan.nodes}",
        f"--nproc_per_node={plan.nproc_per_node}",
        "--rdzv_backend=c10d",
        Shell(f'--rdzv_endpoint="${{head_host}}:{int(c.rdzv_port)}"'),
        Shell('--rdzv_id="${SLURM_JOB_ID}"'),
        f"--max_restarts={c.max_restarts}",
        f"--monitor_interval={c.monitor_interval:g}",
        "--module", "trainer",
        plan.run_dir,
    ]
    guard = ["bash", "-c", 'trap "" USR2; exec "$@"', "ringleader-node"]
    if c.container and c.container_runtime == "apptainer":
        nv = ["--nv"] if cfg.hw.accelerator == "cuda" else []
        return ["apptainer", "exec", *nv, "--bind", plan.run_dir, c.container, *guard, *torchrun]
    return [*guard, *torchrun]


def srun_options(cfg: RunConfig, plan) -> list[str]:
    c = cfg.cluster
    opts = [
        f"--nodes={plan.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={c.cpus_per_task or cfg.hw.cpus_per_node or 1}",  # srun does not inherit it since SLURM 22.05
        "--kill-on-bad-exit=1",  # one node's torchrun failing ends the others
    ]
    if c.container and c.container_runtime == "pyxis":
        opts += [f"--container-image={c.container}", f"--container-mounts={plan.run_dir}", "--no-container-mount-home"]
    return opts


class Shell(str):
    """A word of the script's own shell text (a `${VAR}` of the job), written unquoted. Never a value
    from the config: those always go through `q`."""


def words(argv: list[str]) -> str:
    return " ".join(w if isinstance(w, Shell) else q(w) for w in argv)


def render_sbatch(cfg: RunConfig, plan, *, python: str) -> str:
    c = cfg.cluster
    run_dir = plan.run_dir
    lines = [
        "#!/bin/bash",
        f"# ringleader: the SLURM job of run directory {run_dir}",
        "# Made by cluster/slurm.py render_sbatch; `dry_run=true` prints it, and sbatch gets exactly this file.",
    ]
    lines += [f"#SBATCH --{key}" + ("" if value is None else f"={q(value)}") for key, value in directives(cfg, plan)]
    lines += [
        "",
        "set -uo pipefail",
        f"run_dir={q(run_dir)}",
        *(f"export {key}={q(value)}" for key, value in sorted(plan.env.items())),
    ]
    if c.setup:
        lines += ["", "# setup (cluster.setup), one simple command a line"]
        lines += [setup_line(line, i) for i, line in enumerate(c.setup)]
    srun = ["srun", *srun_options(cfg, plan), *node_command(cfg, plan, python)]
    lines += [
        "",
        "# sbatch runs this script on the first node of the allocation: torchrun on this host hosts",
        "# the c10d store, and every node's torchrun reaches it under this name.",
        'head_host=$(hostname)',
        'echo "ringleader: job ${SLURM_JOB_ID} start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}; rendezvous ${head_host}:' + str(c.rdzv_port) + '"',
        "# One job at a time in a run directory: the lock launcher/rundir.py checks, held on fd 9 while",
        "# this script (and srun, which inherits it) runs; a requeued start takes it again.",
        'exec 9<>"${run_dir}/.lock"',
        'if ! flock -w 60 9; then echo "ringleader: error: train.output_dir: ${run_dir} is in use by $(cat "${run_dir}/.lock"); this job stops" >&2; exit 2; fi',
        'echo "SLURM job ${SLURM_JOB_ID} on $(hostname), batch script pid $$" > "${run_dir}/.lock"',
        'rm -f "${run_dir}/result.json"  # rank 0 writes it again at the end of this start',
        "",
        "# The batch shell outlives its signals: TERM or USR2 (scancel --full) reach the ranks too, and",
        "# the ranks need time to save a checkpoint before srun returns.",
        "trap 'echo \"ringleader: the batch script received a signal; waiting for the ranks to stop\"' TERM USR2",
        words(srun) + " &",
        "srun_pid=$!",
        "while true; do",
        '  wait "${srun_pid}"; code=$?',
        '  kill -0 "${srun_pid}" 2>/dev/null || break  # a trapped signal interrupted wait: keep waiting',
        "done",
        "",
        "# Rank 0 asks for a requeue after USR2 while restarts < cluster.max_requeues (trainer/main.py).",
        'if grep -q \'"requeue": true\' "${run_dir}/result.json" 2>/dev/null; then',
        '  echo "ringleader: stopped before the time limit; requeueing job ${SLURM_JOB_ID}"',
        '  scontrol requeue "${SLURM_JOB_ID}"',
        "  exit 0",
        "fi",
        'echo "ringleader: srun exited with ${code}"',
        'exit "${code}"',
    ]
    return "\n".join(lines) + "\n"


def render_job(cfg: RunConfig, plan, *, python: str) -> tuple[list[str], str]:
    """The submission command and the sbatch script. Pure: no file, no process, no sbatch/sinfo call.
    The config was checked before (launcher/schema.py, launcher/validate.py)."""
    return ["sbatch", "--parsable", f"{plan.run_dir}/{SCRIPT_NAME}"], render_sbatch(cfg, plan, python=python)


# -- the side effects: submit, follow -------------------------------------------------------------


def submit(cfg: RunConfig, plan) -> int:
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
    if not cfg.cluster.wait:
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
    from launcher.files import print_appended

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


# -- `srun python -m launcher ...` by hand, inside an allocation ----------------------------------


def allocation_task(environ=None):
    """The SlurmEnvironment of this process when it is one of several tasks of an srun step (a user
    typed `srun python -m launcher ...` inside an allocation), else None. The batch script itself
    is no such task: it has no SLURM_STEP_NUM_TASKS."""
    from cluster.environment import SlurmEnvironment, detect_environment

    env = detect_environment(environ)
    if isinstance(env, SlurmEnvironment) and env.step_tasks > 1:
        return env
    return None


def allocation_overrides(overrides: list[str], environ=None) -> list[str]:
    """Inside an srun step, each task is one node of one run: the run is a SLURM run of the step's
    nodes, and every task must agree on its directory, so the default (a timestamp) becomes the
    job and step id."""
    task = allocation_task(environ)
    if task is None:
        return []
    extra = ["cluster.name=slurm", f"cluster.nodes={task.nnodes}"]
    if not any(o.lstrip("+").startswith("train.output_dir=") for o in overrides):
        extra.append(f"train.output_dir=runs/slurm-{task.job_id}.{task.step_id or '0'}")  # both digits (SlurmEnvironment)
    return extra


def head_address(nodelist: str) -> str:
    """The address of the step's first node, as slurmctld reaches it (NodeAddr): node names need
    not resolve (on the loopback test cluster they do not)."""
    from cluster.environment import expand_hostlist

    first = expand_hostlist(nodelist)[0]
    import subprocess
    proc = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True)
    found = re.search(r"(?:^|\s)NodeAddr=(\S+)", proc.stdout)
    return found.group(1) if found else first


def run_task(cfg: RunConfig, plan, task, *, child: bool = False) -> int:
    """This task's node of the run: torchrun with the step's nodes, c10d on the step's first node,
    the job and step id as the rendezvous id. Task 0 has written the run directory; the others
    need not wait for it, since no worker starts before node 0's torchrun joins the rendezvous.
    By hand (`srun python -m launcher`) the task becomes torchrun (exec); a sweep's trial run by
    hydra-submitit-launcher (child=True) must outlive it to read result.json and return the
    objective to submitit, so torchrun runs as its child and its exit code is returned."""
    step = task.step_id or "0"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={plan.nodes}", f"--nproc_per_node={plan.nproc_per_node}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={head_address(task.step_nodelist or task.nodelist)}:{cfg.cluster.rdzv_port}",
        f"--rdzv_id={task.job_id}.{step}", f"--max_restarts={cfg.cluster.max_restarts}",
        f"--monitor_interval={cfg.cluster.monitor_interval:g}", "--module", "trainer", plan.run_dir,
    ]
    print(f"ringleader: task {task.rank} of {task.step_tasks} (node {task.node_rank}): {shlex.join(command)}", flush=True)
    # As in the batch job: USR2 is for the workers; torchrun would die of it (see the module's doc).
    import signal

    env = {**os.environ, **plan.env}
    if child:
        # The same guard as the batch job's: torchrun ignores USR2; this process keeps submitit's handler.
        import subprocess
        return subprocess.run(["bash", "-c", 'trap "" USR2; exec "$@"', "ringleader-node", *command], env=env).returncode
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)
