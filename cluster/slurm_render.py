"""The SLURM job as text, from a plan: the sbatch script and the command that submits it. Pure:
no file, no process, no SLURM command. Every value of the config goes through `q`.

The job: one task per node (srun), each running torchrun for its node (cluster/torchrun.py);
torchrun's c10d rendezvous runs on the first node of the allocation and `--rdzv_id` is the job id,
so a requeued job (same id) rendezvouses again by itself and resumes from the newest complete
checkpoint in the same run directory (`train.resume=auto`). After USR2, rank 0 asks for a requeue in
result.json (trainer/requeue.py) and the script runs `scontrol requeue`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.torchrun import HEAD_ADDRESS_SH, USR2_GUARD, c10d, torchrun_argv
from launcher.rules import setup_words
from launcher.schema import RunConfig

if TYPE_CHECKING:
    from launcher.plan import Plan

SCRIPT_NAME = "job.sbatch"


def q(value: object) -> str:
    """Quote one value for the script. sbatch's own #SBATCH parser understands these quotes too."""
    text = str(value)
    # Validation already refused these; a value that reaches here with one would be a bug.
    assert not any(c in text for c in "\n\r\0"), f"newline or NUL in a script value: {text!r}"
    return shlex.quote(text)


def directives(cfg: RunConfig, plan: Plan) -> list[tuple[str, str | None]]:
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


def node_command(cfg: RunConfig, plan: Plan, python: str) -> list[str]:
    """What srun starts on each node: the container (if any), the USR2 guard, torchrun."""
    c = cfg.cluster
    if c.container:
        python = "python"  # the image's interpreter; the submitting machine's path means nothing inside it
    # The endpoint and id are the job's shell variables, so written unquoted (Shell).
    rendezvous = [Shell(w) if "${" in w else w for w in c10d(f'"${{head_host}}:{int(c.rdzv_port)}"', '"${SLURM_JOB_ID}"')]
    torchrun = torchrun_argv(python=python, nnodes=plan.nodes, nproc_per_node=plan.nproc_per_node, rendezvous=rendezvous,
                             max_restarts=c.max_restarts, monitor_interval=c.monitor_interval, run_dir=plan.run_dir)
    if c.container and c.container_runtime == "apptainer":
        nv = ["--nv"] if cfg.hw.accelerator == "cuda" else []
        return ["apptainer", "exec", *nv, "--bind", plan.run_dir, c.container, *USR2_GUARD, *torchrun]
    return [*USR2_GUARD, *torchrun]


def srun_options(cfg: RunConfig, plan: Plan) -> list[str]:
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


def render_sbatch(cfg: RunConfig, plan: Plan, *, python: str) -> str:
    c = cfg.cluster
    run_dir = plan.run_dir
    lines = [
        "#!/bin/bash",
        f"# ringleader: the SLURM job of run directory {run_dir}",
        "# Made by cluster/slurm_render.py render_sbatch; `dry_run=true` prints it, and sbatch gets exactly this file.",
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
        "# sbatch runs this script on the first node of the allocation; its torchrun hosts the c10d store,",
        "# reached under the address slurmctld has for the node (NodeAddr: node names need not resolve).",
        f'head_host=$(bash -c {q(HEAD_ADDRESS_SH)} ringleader-head "${{SLURM_JOB_NODELIST}}")',
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


def render_job(cfg: RunConfig, plan: Plan, *, python: str) -> tuple[list[str], str]:
    """The submission command and the sbatch script. Pure: no file, no process, no sbatch/sinfo call.
    The config was checked before (launcher/schema.py, launcher/validate.py)."""
    return ["sbatch", "--parsable", f"{plan.run_dir}/{SCRIPT_NAME}"], render_sbatch(cfg, plan, python=python)
