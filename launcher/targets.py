"""The one way a `_target_` (a dotted path in the config) becomes the object it names."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.errors import ConfigError


def load_target(dotted: str, key: str) -> Any:
    """The class or function at `dotted` (package.module.name); `key` names the config key in the
    one-line error when it cannot be imported. Imports the module: ranks only, never the launcher."""
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(key, f"cannot import '{dotted}' ({exc}); check the dotted path, and that its package is importable on every node") from exc
