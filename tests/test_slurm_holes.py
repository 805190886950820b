"""The SLURM backend as an attacker and a careless user meet it (issue 12, items 3, 11 and 12).

Every bad input goes through the real command (`python -m launcher ... cluster=slurm dry_run=true`,
or a verb on a run directory) and must end with one line naming the key, exit code 2, and nothing
written anywhere under the test's folder (run directory, caches). Legitimate but awkward values
must reach bash literally. Crafted hw profiles with hostile keys live in a --config-dir written by
the test, as a user's own config folder would be.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.environment import EnvironmentVariableError, SlurmEnvironment, TorchrunEnvironment, expand_hostlist
from cluster.slurm_jobs import job_info
from launcher.rules import shell_special
from launcher.compose import compose
from launcher.prepare import prepare
from tests.conftest import ROOT, TINY, launcher_env

SENTINEL = "/tmp/ringleader-holes-SENTINEL"


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def launch(tmp_path: Path, *overrides: str, env: dict | None = None, output_dir: str | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher OVERRIDES` from tmp_path/work with that environment, caches in
    tmp_path/cache. In this process (the launcher's main(), its environment and current folder
    swapped in and restored): ~0.1 s a case instead of ~0.6 s for a new interpreter. Every case is
    a dry run or refused before anything starts; test_config.py's matrix runs the same way."""
    from launcher.__main__ import main

    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    out = output_dir if output_dir is not None else f"train.output_dir={work / 'run'}"
    environ = env or launcher_env()
    environ.setdefault("XDG_CACHE_HOME", str(tmp_path / "cache"))
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([*overrides, out])
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["python", "-m", "launcher", *overrides, out], code, stdout.getvalue(), stderr.getvalue())


def assert_refused(tmp_path: Path, proc: subprocess.CompletedProcess, key: str, before: set[Path] | None = None) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("ringleader: error: ") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    left = files_under(tmp_path) - (before or set()) - {tmp_path / "work"}
    assert not left, f"a refused launch wrote {sorted(left)}"


# -- item 3: keys and values that would change the script ---------------------------------------

SLURM = ["+hw=cpu", "cluster=slurm", "dry_run=true"]

BAD_SLURM_INPUTS = [
    # sbatch options ringleader owns, by name, short form and abbreviation
    (["+cluster.sbatch_extra.signal=USR1@1"], "cluster.sbatch_extra.signal", "cluster.signal_delay_s"),
    (["+cluster.sbatch_extra.sig=USR1@1"], "cluster.sbatch_extra.sig", "cluster.signal_delay_s"),
    (["+cluster.sbatch_extra.requeue=''"], "cluster.sbatch_extra.requeue", "cluster.max_requeues"),
    (["+cluster.sbatch_extra.no-requeue=''"], "cluster.sbatch_extra.no-requeue", "cluster.max_requeues"),
    (["+cluster.sbatch_extra.output=/tmp/elsewhere.log"], "cluster.sbatch_extra.output", "logs --slurm"),
    (["+cluster.sbatch_extra.o=/tmp/elsewhere.log"], "cluster.sbatch_extra.o", "--output"),
    (["+cluster.sbatch_extra.error=/tmp/e.log"], "cluster.sbatch_extra.error", "--error"),
    (["+cluster.sbatch_extra.nodes=64"], "cluster.sbatch_extra.nodes", "cluster.nodes"),
    (["+cluster.sbatch_extra.N=64"], "cluster.sbatch_extra.N", "cluster.nodes"),
    (["+cluster.sbatch_extra.n=64"], "cluster.sbatch_extra.n", "one task per node"),
    (["+cluster.sbatch_extra.t=5"], "cluster.sbatch_extra.t", "cluster.time_min"),
    (["+cluster.sbatch_extra.time=5"], "cluster.sbatch_extra.time", "cluster.time_min"),
    (["+cluster.sbatch_extra.partition=gpu"], "cluster.sbatch_extra.partition", "cluster.partition"),
    (["+cluster.sbatch_extra.p=gpu"], "cluster.sbatch_extra.p", "cluster.partition"),
    (["+cluster.sbatch_extra.J=other"], "cluster.sbatch_extra.J", "--job-name"),
    (["+cluster.sbatch_extra.mem=1G"], "cluster.sbatch_extra.mem", "cluster.mem_gb"),
    (["+cluster.sbatch_extra.open-mode=truncate"], "cluster.sbatch_extra.open-mode", "--open-mode"),
    (["+cluster.sbatch_extra.cpus-per-task=1"], "cluster.sbatch_extra.cpus-per-task", "cluster.cpus_per_task"),
    (["+cluster.sbatch_extra.array=0-99"], "cluster.sbatch_extra.array", "sweep"),
    (["+cluster.sbatch_extra.wrap=sh"], "cluster.sbatch_extra.wrap", "--wrap"),
    # values that would become options
    (["cluster.container='--privileged'"], "cluster.container", "option"),
    (["cluster.partition='-x'"], "cluster.partition", "begins with '-'"),
    (["cluster.account='--wrap=sh'"], "cluster.account", "begins with '-'"),
    # setup lines that are more than one simple command: refused, not mangled into quoted words
    ([f"cluster.setup=['echo a; touch {SENTINEL}']"], "cluster.setup.0", "source"),
    ([f"cluster.setup=['module load x', 'echo a | tee {SENTINEL}']"], "cluster.setup.1", "'|'"),
    ([f"cluster.setup=['true && touch {SENTINEL}']"], "cluster.setup.0", "'&'"),
    ([f"cluster.setup=['echo a > {SENTINEL}']"], "cluster.setup.0", "'>'"),
    (["cluster.setup=['cat < /etc/passwd']"], "cluster.setup.0", "'<'"),
    ([f"cluster.setup=['echo `touch {SENTINEL}`']"], "cluster.setup.0", "'`'"),
    ([f"cluster.setup=['echo \"$(touch {SENTINEL})\"']"], "cluster.setup.0", "'$'"),
    (["cluster.setup=['export PATH=$HOME/bin:$PATH']"], "cluster.setup.0", "'$'"),
    (["cluster.setup=['source ~/venv/bin/activate']"], "cluster.setup.0", "'~'"),
    # item 11: a time limit the stop signal eats
    (["cluster.time_min=1"], "cluster.signal_delay_s", "cluster.time_min"),
    (["cluster.time_min=3", "cluster.signal_delay_s=120"], "cluster.signal_delay_s", "raise cluster.time_min"),
    (["cluster.time_min=600", "cluster.signal_delay_s=0"], "cluster.signal_delay_s", ">= 1"),
    (["cluster.time_min=6000", "cluster.signal_delay_s=70000"], "cluster.signal_delay_s", "65535"),
]


@pytest.mark.parametrize("overrides, key, fix", BAD_SLURM_INPUTS, ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD_SLURM_INPUTS)])
def test_bad_slurm_input_is_one_line_exit_2_nothing_written(tmp_path: Path, overrides: list[str], key: str, fix: str) -> None:
    Path(SENTINEL).unlink(missing_ok=True)
    proc = launch(tmp_path, *SLURM, *overrides)
    assert_refused(tmp_path, proc, key)
    assert fix in proc.stderr, proc.stderr
    assert not Path(SENTINEL).exists()


@pytest.mark.parametrize(
    "folder, char, extra",
    [
        ("run%j", "%", []),  # sbatch expands it in --output
        ("run%%x", "%", []),
        ("run\\\\x", "\\", []),  # turns off sbatch's %j in --output
        ("a,b", ",", ["cluster.container='nvcr.io#org/img:1'"]),  # splits pyxis --container-mounts
        ("a:b", ":", ["cluster.container='nvcr.io#org/img:1'"]),
        ("a,b", ",", ["cluster.container=/images/x.sif", "cluster.container_runtime=apptainer"]),  # apptainer --bind
        ("a:b", ":", ["cluster.container=/images/x.sif", "cluster.container_runtime=apptainer"]),
    ],
)
def test_run_directory_that_sbatch_or_a_container_would_parse_is_refused(tmp_path: Path, folder: str, char: str, extra: list[str]) -> None:
    proc = launch(tmp_path, *SLURM, *extra, output_dir=f"train.output_dir='{tmp_path / 'work' / folder}'")
    assert_refused(tmp_path, proc, "train.output_dir")
    assert f"'{char}'" in proc.stderr


def write_profile(folder: Path, nccl_env: dict[str, str]) -> Path:
    """A user's config folder with a hw profile whose nccl_env has the given keys."""
    (folder / "hw").mkdir(parents=True)
    body = {"name": "evil", "accelerator": "cpu", "gpus_per_node": 0, "cpu_ranks": 2, "cpus_per_node": 2, "nccl_env": nccl_env}
    (folder / "hw" / "evil.yaml").write_text(json.dumps(body))  # JSON is YAML
    return folder


@pytest.mark.parametrize("cluster", ["slurm", "local"])
@pytest.mark.parametrize(
    "name",
    [f"X; touch {SENTINEL}", f"X|touch {SENTINEL}", "A B", f"X\ntouch {SENTINEL}", f"$(touch {SENTINEL})", "1X", "A-B", "A=B", ""],
)
def test_environment_variable_names_are_validated(tmp_path: Path, cluster: str, name: str) -> None:
    """hw.nccl_env keys become `export NAME=...` in the sbatch script and `NAME=... torchrun` in a
    local run's command: only variable names pass."""
    Path(SENTINEL).unlink(missing_ok=True)
    conf = write_profile(tmp_path / "conf", {name: "1", "NCCL_DEBUG": "INFO"})
    before = files_under(tmp_path)
    proc = launch(tmp_path, "--config-dir", str(conf), "+hw=evil", f"cluster={cluster}", "dry_run=true")
    assert_refused(tmp_path, proc, "hw.nccl_env", before)
    assert "environment variable name" in proc.stderr
    assert not Path(SENTINEL).exists()


@pytest.mark.parametrize("name", ["x\n#SBATCH --wrap=sh", "a;b", "-N", "--signal", "a b", "sig", "N", "requ", ""])
def test_sbatch_option_names_from_a_config_folder_are_validated(tmp_path: Path, name: str) -> None:
    """cluster.sbatch_extra keys become `#SBATCH --NAME=...`: a user's cluster file cannot slip in
    a line, a second option, or one that ringleader owns."""
    (tmp_path / "conf" / "cluster").mkdir(parents=True)
    (tmp_path / "conf" / "cluster" / "evil.yaml").write_text(json.dumps({"name": "slurm", "sbatch_extra": {"comment": "ok", name: "1"}}))
    before = files_under(tmp_path)
    proc = launch(tmp_path, "--config-dir", str(tmp_path / "conf"), "+hw=cpu", "cluster=evil", "dry_run=true")
    assert_refused(tmp_path, proc, "cluster.sbatch_extra", before)


def test_a_good_nccl_env_still_reaches_the_script(tmp_path: Path) -> None:
    conf = write_profile(tmp_path / "conf", {"NCCL_DEBUG": "INFO", "_X1": "a b"})
    proc = launch(tmp_path, "--config-dir", str(conf), "+hw=evil", "cluster=slurm", "dry_run=true")
    assert proc.returncode == 0, proc.stderr
    assert "export NCCL_DEBUG=INFO" in proc.stdout and "export _X1='a b'" in proc.stdout


# -- item 11: a SLURM plan needs the compute nodes' profile ----------------------------------------


def test_slurm_without_hw_is_refused_on_a_login_node(tmp_path: Path) -> None:
    proc = launch(tmp_path, "cluster=slurm", "dry_run=true")
    assert_refused(tmp_path, proc, "hw:")
    assert "+hw=PROFILE" in proc.stderr


def test_slurm_without_hw_is_fine_inside_an_allocation(tmp_path: Path) -> None:
    """`srun python -m launcher` inside an allocation: the auto profile describes its own node."""
    env = launcher_env(SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_NODEID="0",
                       SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="3", SLURM_JOB_NODELIST="n[1-2]")
    proc = launch(tmp_path, "dry_run=true", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "slurm: 2 node(s)" in proc.stdout


# -- item 12: no sbatch, damaged slurm.json, garbage in SLURM's variables ----------------------------


def test_no_sbatch_on_path_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    before = files_under(tmp_path)
    proc = launch(tmp_path, "+hw=cpu", "cluster=slurm", env=launcher_env(PATH=str(empty_bin)))
    assert_refused(tmp_path, proc, "cluster:", before)
    assert "sbatch is not on PATH" in proc.stderr and "dry_run=true" in proc.stderr
    # A dry run needs no SLURM at all.
    assert launch(tmp_path, "+hw=cpu", "cluster=slurm", "dry_run=true", env=launcher_env(PATH=str(empty_bin))).returncode == 0


def fake_tools(folder: Path, tools: dict[str, str]) -> Path:
    """Shell scripts named like SLURM's commands, first on PATH: each logs its call, then runs its body."""
    folder.mkdir(exist_ok=True)
    for tool, body in tools.items():
        path = folder / tool
        path.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {folder / 'calls'}\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def run_dir_with_job_file(tmp_path: Path, text: str) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train: {}\n")
    (run_dir / "slurm.json").write_text(text)
    return run_dir


@pytest.mark.parametrize("verb", [["status"], ["cancel"], ["logs", "--slurm"]])
@pytest.mark.parametrize(
    "text",
    ["not json {", "", "[]", "{}", '{"jobs": []}', '{"job_id": 12}', '{"job_id": null}', '{"job_id": "1; rm -rf /"}', '{"job_id": "-1"}', '{"job_id": "12 13"}', '{"job_id": "--signal=KILL"}'],
)
def test_damaged_slurm_json_is_one_line_naming_the_file(tmp_path: Path, verb: list[str], text: str) -> None:
    run_dir = run_dir_with_job_file(tmp_path, text)
    bin_dir = fake_tools(tmp_path / "bin", {"scancel": "exit 0", "scontrol": "exit 1", "squeue": "exit 1"})
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "launcher", verb[0], str(run_dir), *verb[1:]], capture_output=True, text=True,
                          env=launcher_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), cwd=ROOT, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert str(run_dir / "slurm.json") in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (bin_dir / "calls").exists(), (bin_dir / "calls").read_text()  # nothing reached scancel or scontrol
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_cancel_without_scancel_is_one_line(tmp_path: Path) -> None:
    run_dir = run_dir_with_job_file(tmp_path, '{"job_id": "42"}')
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    proc = subprocess.run([sys.executable, "-m", "launcher", "cancel", str(run_dir)], capture_output=True, text=True, env=launcher_env(PATH=str(empty_bin)), cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "scancel is not on PATH" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "output",
    ["", "garbage", "Reason=None Restarts=0", "JobState= RunTime=1", "JobState=$(x) Reason=y", "slurm_load_jobs error: Invalid job id specified"],
)
def test_job_info_survives_unexpected_scontrol_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    """Another SLURM version, a wrapper script, a controller in trouble: no state means {} (the
    verbs then say the controller does not know the job), never a KeyError."""
    bin_dir = fake_tools(tmp_path / "bin", {"scontrol": f"printf '%s\\n' '{output}'; exit 0"})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert job_info("42") == {}
    run_dir = run_dir_with_job_file(tmp_path, '{"job_id": "42"}')
    proc = subprocess.run([sys.executable, "-m", "launcher", "status", str(run_dir)], capture_output=True, text=True, env=launcher_env(PATH=os.environ["PATH"]), cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "42 (no longer known to slurmctld)" in proc.stdout, proc.stdout + proc.stderr


def test_job_info_reads_the_job_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = "JobId=42 JobName=x JobState=RUNNING Reason=None Restarts=1 RunTime=00:01:00 TimeLimit=01:00:00 NodeList=n[1-2]"
    bin_dir = fake_tools(tmp_path / "bin", {"scontrol": f"echo 'warning: something'; echo '{line}'"})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    info = job_info("42")
    assert info["JobState"] == "RUNNING" and info["Restarts"] == "1" and info["NodeList"] == "n[1-2]"


SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
              "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "3", "SLURM_JOB_NODELIST": "n[1-2]"}
GARBAGE = [
    ("SLURM_NNODES", "abc"), ("SLURM_NNODES", "0"), ("SLURM_PROCID", "-1"), ("SLURM_PROCID", "2"), ("SLURM_JOB_NODELIST", "n[1-"),
    ("SLURM_JOB_NODELIST", "n[a-b]"), ("SLURM_JOB_NODELIST", "n[5-1]"), ("SLURM_RESTART_COUNT", "x"), ("SLURM_STEP_NUM_TASKS", "junk"),
    ("SLURM_JOB_ID", "1,2"), ("SLURM_JOB_ID", ""), ("SLURM_STEP_ID", "0 train.max_steps=1"), ("SLURM_NTASKS", "1e3"), ("SLURM_STEP_NODELIST", "n[1,,]"),
]


@pytest.mark.parametrize("variable, value", GARBAGE)
def test_garbage_in_slurm_variables_stops_the_launcher_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    """The launcher inside an allocation (`srun python -m launcher`): one line naming the variable."""
    proc = launch(tmp_path, "+hw=cpu", "dry_run=true", env=launcher_env(**{**SLURM_TASK, variable: value}))
    assert_refused(tmp_path, proc, f"{variable}:")


@pytest.mark.parametrize("variable, value", GARBAGE)
def test_garbage_in_slurm_variables_is_named_for_the_trainer(variable: str, value: str) -> None:
    """The environment classes the ranks use raise one error naming the variable (a ConfigError)."""
    with pytest.raises(EnvironmentVariableError) as raised:
        SlurmEnvironment.detect({**SLURM_TASK, variable: value})
    assert str(raised.value).startswith(f"{variable}: ") and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "variable, value",
    [("SLURM_RESTART_COUNT", "x"), ("SLURM_RESTART_COUNT", "-1"), ("RANK", "abc"), ("RANK", "4"), ("WORLD_SIZE", "0"), ("SLURM_JOB_ID", "$(id)")],
)
def test_garbage_reaches_a_torchrun_worker_as_one_named_error(variable: str, value: str) -> None:
    """A rank inside a SLURM job reads SLURM_RESTART_COUNT and SLURM_JOB_ID beside torchrun's own."""
    environ = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
               "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1", variable: value}
    with pytest.raises(EnvironmentVariableError) as raised:
        TorchrunEnvironment.detect(environ)
    assert str(raised.value).startswith(f"{variable}: ") and "\n" not in str(raised.value)


def test_good_slurm_variables_still_detect() -> None:
    env = SlurmEnvironment.detect({**SLURM_TASK, "SLURM_RESTART_COUNT": "2", "SLURM_STEP_NODELIST": "gpu[01-02]"})
    assert (env.job_id, env.step_id, env.nnodes, env.step_tasks, env.requeue_count) == ("77", "3", 2, 2, 2)
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("a-b.c,n[9-10]x") == ["a-b.c", "n9x", "n10x"]


# -- awkward but legitimate values reach bash literally ---------------------------------------------

AWKWARD = "it's a \"$HOME\" `x` ; dir"


def test_awkward_values_arrive_literally_in_bash(tmp_path: Path) -> None:
    """Spaces, both quotes, `$`, backticks and `;` in values: the script parses (bash -n), and the
    part before srun, run by a real bash, sets every value to exactly the text given."""
    run_dir = tmp_path / AWKWARD
    conf = write_profile(tmp_path / "conf", {"NCCL_SOCKET_IFNAME": AWKWARD})
    composed = compose(
        ["+hw=evil", "cluster=slurm", f"train.output_dir='{str(run_dir).replace(chr(39), chr(92) + chr(39))}'",
         "cluster.setup=[\"export X='a b $HOME'\", 'export Y=\"double quoted\"', \"CC='c c' export Z=1\"]",
         "cluster.partition='gpu a'", "+cluster.sbatch_extra.comment='$HOME `id` \"q\"'"],
        config_dirs=[str(conf)],
    )
    script = prepare(composed).plan.script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    prelude = script.split("# sbatch runs this script")[0]
    show = 'printf "%s\\n" "$run_dir" "$X" "$Y" "$Z" "$NCCL_SOCKET_IFNAME"'
    proc = subprocess.run(["bash", "-c", prelude + show], capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": "/home/someone"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(run_dir), "a b $HOME", "double quoted", "1", AWKWARD]
    # #SBATCH lines: sbatch splits them into words as a shell does; each value is one literal word.
    import shlex

    directives = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --") and "=" in line)
    assert shlex.split(directives["partition"]) == ["gpu a"]
    assert shlex.split(directives["comment"]) == ['$HOME `id` "q"']
    assert shlex.split(directives["output"]) == [f"{run_dir}/logs/slurm-%j.log"]


@pytest.mark.parametrize(
    "line, special",
    [("module load cuda/12.4", None), ("export X='a b $HOME'", None), ("echo 'a;b|c'", None), ("echo x#y", None),
     ('echo "\\$x"', "$"), ("echo a;b", ";"), ("echo #c", "#"), ("ls *.py", "*"), ("echo {a,b}", "{")],
)
def test_shell_special_reads_quotes_as_bash(line: str, special: str | None) -> None:
    assert shell_special(line) == special


def test_a_rank_with_a_broken_slurm_variable_fails_in_one_line(tmp_path: Path) -> None:
    """`python -m trainer RUN_DIR` as torchrun starts it inside a job whose SLURM_RESTART_COUNT is
    garbage: one line naming the variable and exit 2, not a traceback."""
    from launcher.rundir import write_run_dir

    prepared = prepare(compose([*TINY, f"train.output_dir={tmp_path / 'run'}"]))
    write_run_dir(Path(prepared.plan.run_dir), prepared.resolved, prepared.plan.to_dict())
    env = {**launcher_env(), "TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "x"}
    proc = subprocess.run([sys.executable, "-m", "trainer", prepared.plan.run_dir], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ringleader: error: SLURM_RESTART_COUNT: is 'x'"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_garbage_in_slurm_variables_through_the_real_command(tmp_path: Path) -> None:
    """The cases above call the launcher's main() in this process; this one is `python -m launcher`."""
    env = launcher_env(SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_NNODES="abc", SLURM_STEP_NUM_TASKS="2", XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "launcher", "+hw=cpu", "dry_run=true"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ringleader: error: SLURM_NNODES: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(tmp_path.iterdir()) == []
