"""`python -m trainer RUN_DIR`: what torchrun starts on every rank."""

import sys
from pathlib import Path

from launcher.errors import ConfigError
from trainer.main import main

try:
    code = main(Path(sys.argv[1]))
except ConfigError as exc:  # a broken SLURM/torchrun variable, named: one line, not a traceback
    print(f"ringleader: error: {exc}", file=sys.stderr)
    code = 2
sys.exit(code)
