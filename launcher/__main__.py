"""`python -m launcher [overrides]`: compose, validate, plan, write the run directory, launch.

Also `python -m launcher -m ...` for sweeps, and a few verbs that act on a run directory:
`status`, `logs`, `cancel`, `export`, `summary`.
"""

from __future__ import annotations

import gc
import sys

from typing import TYPE_CHECKING

from launcher.cli import USAGE, error, parse_args

if TYPE_CHECKING:
    from launcher.compose import Composed

VERBS = ("status", "logs", "cancel", "export", "summary")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] in VERBS:
        from launcher.verbs import run_verb

        return run_verb(args[0], args[1:])
    if args and args[0] == "--from-training-args":  # Hugging Face TrainingArguments JSON -> this command line
        from launcher.migrate import main_from_training_args
        return main_from_training_args(args[1:])
    if any(a in ("-m", "--multirun") for a in args):
        from launcher.sweep import run_sweep

        return run_sweep(args)
    try:
        overrides, config_dirs, config_name, show = parse_args(args)
    except SystemExit as exc:  # parse_args has printed the one-line error
        return int(exc.code or 2)
    # Importing Hydra, composing and planning allocate many container objects (OmegaConf nodes link
    # to their parents) and free few: the cyclic collector runs ~84 passes, ~20 ms of a dry run, for
    # nothing. It is back on before any backend starts (start()), and whenever main returns.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return compose_and_start(overrides, config_dirs, config_name, show)
    finally:
        if collecting:
            gc.enable()


def compose_and_start(overrides: list[str], config_dirs: list[str], config_name: str, show: bool) -> int:
    from cluster.backend import allocation_overrides
    from launcher.compose import ConfigError, compose

    try:
        overrides += allocation_overrides(overrides)  # `srun python -m launcher ...` inside an allocation
        composed = compose(overrides, config_dirs=config_dirs, config_name=config_name)
    except ConfigError as exc:
        return error(str(exc))
    if show:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(composed.resolved), end="")
        return 0
    return launch(composed)


def launch(composed: Composed) -> int:
    from launcher.errors import ConfigError
    from launcher.start import start

    try:
        return start(composed)
    except ConfigError as exc:
        return error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
