"""Where ringleader's own config folder is: conf/ at the top of a clone, launcher/conf in a wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ringleader's conf/ folder is missing next to {here}; reinstall ringleader")
