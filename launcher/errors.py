"""ConfigError: bad input, reported as one line naming the key and the fix. Imports nothing, so
every module (and every rank) may raise it without loading Hydra."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input: the message names the key and the fix, on one line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
