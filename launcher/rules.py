"""The small helpers the schema's checks share: `require`, the walk over every value, variable
names, and the shell and sbatch rules a SLURM job's values must follow. Pure; imports nothing heavy."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Iterator, Mapping

from launcher.errors import ConfigError

DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# What the shell (and os.environ) accept as a variable's name: anything else in an `export KEY=...`
# line of a script is a command, and in a process environment an error.
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def leaves(node: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every value of the config with its dotted key, dataclasses, dicts and lists walked through."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from leaves(getattr(node, f.name), f"{prefix}{f.name}.")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), node


def check_values(cfg: object) -> None:
    """No string may hold a newline or NUL (they end up in scripts, sbatch directives and logs), and
    no float may be inf or NaN (`optimizer.learning_rate=inf` would pass every range check and fail
    on the ranks, or never)."""
    for key, value in leaves(cfg):
        if isinstance(value, str) and ("\n" in value or "\r" in value or "\0" in value):
            raise ConfigError(key, "contains a newline or NUL character; remove it (values go into scripts)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")


def key_label(key: str, name: str) -> str:
    """`key.name` for an error message, or `key['na\\nme']` when the name would break the one line."""
    return f"{key}.{name}" if name.isprintable() and name.strip() == name and name else f"{key}[{name!r}]"


def check_variable_names(variables: Mapping[str, str], key: str) -> None:
    """Every name of a dict that becomes environment variables (hw.nccl_env) is a variable name:
    `export NAME=...` in the sbatch script, `NAME=... torchrun` in the printed command."""
    for name in variables:
        if not VARIABLE_NAME.fullmatch(str(name)):
            raise ConfigError(key_label(key, str(name)), f"{str(name)!r} is not an environment variable name; use letters, digits and _ (not first a digit), e.g. {key}.NCCL_DEBUG=INFO")


# -- a SLURM job's values ------------------------------------------------------------------------

EXTRA_KEY = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
# sbatch options the script sets itself, and the key that sets each. cluster.sbatch_extra may not
# set them (nor their one-letter forms, nor an abbreviation: sbatch's getopt_long takes any
# unambiguous prefix of a long option, so `--sig` is `--signal`).
OWNED_OPTIONS = {
    "nodes": "cluster.nodes",
    "ntasks": "nothing: ringleader runs one task per node, and cluster.nproc_per_node ranks in it",
    "ntasks-per-node": "nothing: ringleader runs one task per node, and cluster.nproc_per_node ranks in it",
    "cpus-per-task": "cluster.cpus_per_task",
    "gpus": "cluster.gpus_per_node",
    "gpus-per-node": "cluster.gpus_per_node",
    "time": "cluster.time_min",
    "output": "nothing: the batch log is <run dir>/logs/slurm-<job>.log, which `logs --slurm` reads",
    "error": "nothing: the batch log is <run dir>/logs/slurm-<job>.log, which `logs --slurm` reads",
    "open-mode": "nothing: a requeued job appends to its log",
    "signal": "cluster.signal_delay_s",
    "requeue": "cluster.max_requeues",
    "no-requeue": "cluster.max_requeues (0: never requeued by ringleader)",
    "job-name": "train.output_dir (the job is named after the run directory)",
    "partition": "cluster.partition",
    "account": "cluster.account",
    "qos": "cluster.qos",
    "constraint": "cluster.constraint",
    "mem": "cluster.mem_gb",
    "exclusive": "cluster.exclusive",
    "array": "a sweep (python -m launcher -m ...): one run directory per job",
    "wrap": "nothing: sbatch runs ringleader's script",
}
SHORT_OPTIONS = {"N": "nodes", "n": "ntasks", "c": "cpus-per-task", "G": "gpus", "t": "time", "o": "output", "e": "error",
                 "J": "job-name", "p": "partition", "A": "account", "q": "qos", "C": "constraint", "a": "array"}


def check_extra_option(key: str) -> None:
    """A cluster.sbatch_extra key is an sbatch option name that ringleader does not set itself."""
    where = key_label("cluster.sbatch_extra", key)
    if not EXTRA_KEY.fullmatch(key):
        raise ConfigError(where, "is not an sbatch option name; write it without dashes, e.g. cluster.sbatch_extra.mail-type=END")
    option = SHORT_OPTIONS.get(key) or next((o for o in OWNED_OPTIONS if o.startswith(key)), None)
    if option is not None:
        instead = OWNED_OPTIONS[option]
        fix = f"set {instead}" if not instead.startswith("nothing") else f"remove it ({instead.removeprefix('nothing: ')})"
        if instead.startswith("a sweep"):
            fix = f"remove it; use {instead}"
        raise ConfigError(where, f"is sbatch's --{option}, which ringleader's script sets itself; {fix}")


# Outside quotes, these make a setup line more than one simple command, or make the shell expand a
# word (`#` only where a word begins: there it starts a comment); inside double quotes, `$` and
# backticks still expand. The script quotes each word of a setup line, so any of them would be run
# as literal text: refused instead, naming the character.
SHELL_SPECIAL = set(";|&<>()`$*?[]{}~!")


def shell_special(line: str) -> str | None:
    """The first character of `line` that bash would treat specially, where quoting each word of
    the line would change its meaning; None when there is none."""
    quote = ""
    escaped = False
    previous = " "
    for char in line:
        if quote == '"' and char in "$`":
            return char
        if escaped:
            escaped = False
        elif quote == "'":
            quote = "" if char == "'" else quote
        elif quote == '"':
            if char == "\\":
                escaped = True
            elif char == '"':
                quote = ""
        elif char == "\\":
            escaped = True
        elif char in "'\"":
            quote = char
        elif char in SHELL_SPECIAL or (char == "#" and previous.isspace()):
            return char
        previous = char
    return None


def setup_words(line: str, index: int) -> list[str]:
    """A setup line (cluster.setup.N) as the words of one simple command; a line whose meaning
    would change when each word is quoted, or whose quotes do not balance, is refused."""
    if (char := shell_special(line)) is not None:
        raise ConfigError(
            f"cluster.setup.{index}",
            f"'{line}' uses the shell's {char!r}; a setup line is one simple command whose words are passed as written "
            "(no ; | & > < $ ` ~ * # or $(...)). Put more complex setup in a script and `source /path/to/it.sh` instead",
        )
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise ConfigError(f"cluster.setup.{index}", f"cannot split '{line}' into words ({exc}); balance its quotes") from exc


def check_signal_delay(delay_s: int, time_min: int) -> None:
    """The stop signal must leave each start time to train. SLURM may send it up to 60 s early; if
    it comes before half the time limit, every requeued start spends more time starting and saving
    than training, and at delay >= the limit it comes at once: a requeue loop with no progress."""
    limit_s = time_min * 60
    if delay_s < 1:
        raise ConfigError("cluster.signal_delay_s", f"must be >= 1 second, got {delay_s}: the ranks need time between the stop signal and the time limit to save a checkpoint")
    if delay_s > 65535:
        raise ConfigError("cluster.signal_delay_s", f"must be <= 65535 seconds (sbatch's limit), got {delay_s}")
    if 2 * (delay_s + 60) > limit_s:
        raise ConfigError(
            "cluster.signal_delay_s",
            f"{delay_s} s (SLURM may signal up to 60 s earlier) leaves less than half of cluster.time_min={time_min} ({limit_s} s) "
            f"to train before each stop and requeue; lower cluster.signal_delay_s or raise cluster.time_min to at least {-(-2 * (delay_s + 60) // 60)}",
        )
