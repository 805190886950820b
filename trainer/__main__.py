"""`python -m trainer RUN_DIR`: what torchrun starts on every rank."""

import sys
from pathlib import Path

from trainer.main import main

sys.exit(main(Path(sys.argv[1])))
