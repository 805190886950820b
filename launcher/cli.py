"""The command line's words: usage, the one-line error, and argv split into Hydra overrides.
Used by the single-run path (launcher/__main__.py), sweeps and verbs; imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: python -m launcher [KEY=VALUE ...] [+hw=PROFILE] [--config-dir DIR] [-m]
       python -m launcher {status|logs|cancel} RUN_DIR
       python -m launcher export CHECKPOINT_DIR [OUT_DIR] [--merge]
       python -m launcher summary SWEEP_DIR

Overrides are Hydra's: group=option (strategy=zero3), key=value (train.max_steps=100),
+hw=8xA100 to pick a hardware profile. dry_run=true prints the plan and starts nothing.
-m runs a sweep: optimizer.learning_rate=1e-4,3e-4 scheduler=cosine,linear.
--cfg prints the composed config. Groups and keys: conf/ and launcher/schema.py."""

def error(message: str) -> int:
    print(f"ringleader: error: {message}", file=sys.stderr)
    return 2


def parse_args(args: list[str]) -> tuple[list[str], list[str], str, bool]:
    """Split argv into overrides, extra config folders, the config name, and whether to print it."""
    overrides: list[str] = []
    config_dirs: list[str] = []
    config_name = "config"
    show = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-dir", "-cd", "--config-name", "-cn"):
            if i + 1 >= len(args):
                raise SystemExit(error(f"{arg} needs a value"))
            value = args[i + 1]
            if arg in ("--config-dir", "-cd"):
                config_dirs.append(str(Path(value).resolve()))
            else:
                config_name = value
            i += 2
            continue
        if arg.startswith("--config-dir="):
            config_dirs.append(str(Path(arg.split("=", 1)[1]).resolve()))
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in ("--cfg", "-c"):
            show = True
            if i + 1 < len(args) and args[i + 1] in ("job", "all", "hydra"):
                i += 1
        elif arg.startswith("-"):
            raise SystemExit(error(f"unknown option {arg}; overrides are KEY=VALUE (see --help)"))
        elif "=" not in arg:
            raise SystemExit(error(f"'{arg}' is not an override; write KEY=VALUE, e.g. train.max_steps=100"))
        elif any(c in arg for c in "\n\r\0"):
            key = arg.split("=", 1)[0].lstrip("+~")
            raise SystemExit(error(f"{key}: contains a newline or NUL character; remove it (values go into scripts)"))
        else:
            overrides.append(arg)
        i += 1
    return overrides, config_dirs, config_name, show
