"""Compose the run's config with Hydra from conf/ plus the user's overrides, typed once at the edge.

Single runs use Hydra's compose API: no Hydra output folder appears, errors become one line with
exit code 2, and a dry run stays fast. Sweeps (-m) go through Hydra's app (launcher.sweep).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.paths import config_dir
from launcher.schema import RunConfig


def register_schema() -> None:
    """The schema at the root of conf/config.yaml's defaults: Hydra merges every group into it, so
    an unknown key or a wrong type fails composition with the key's full name."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)


@dataclass(frozen=True, kw_only=True)
class Composed:
    config: RunConfig
    resolved: DictConfig  # the same values, for config.yaml
    overrides: tuple[str, ...]


def compose(overrides: list[str], *, config_dirs: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Composed:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    extra = [f"hydra.searchpath=[{','.join('file://' + d for d in config_dirs)}]"] if config_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=[*overrides, *extra])
    except Exception as exc:  # Hydra and OmegaConf raise many kinds; each becomes one line here
        raise composition_error(exc) from exc
    finally:
        GlobalHydra.instance().clear()
    return typed(cfg, tuple(overrides))


def typed(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> Composed:
    """Resolve interpolations and convert to the dataclasses; code below this never sees DictConfig."""
    try:
        OmegaConf.resolve(cfg)
        run = OmegaConf.to_object(cfg)
    except Exception as exc:
        raise composition_error(exc) from exc
    assert isinstance(run, RunConfig), type(run)
    return Composed(config=run, resolved=cfg, overrides=overrides)


def composition_error(exc: BaseException) -> ConfigError:
    """Turn Hydra's and OmegaConf's multi-line messages into one line naming the key and the fix."""
    causes = [exc]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    text = " ".join(str(c) for c in causes)
    full_key = ""
    for c in causes:
        full_key = getattr(c, "full_key", None) or full_key
    found = re.search(r"full_key: ([\w.\[\]]+)", text)
    if found and not full_key:
        full_key = found.group(1)
    if m := re.search(r"Could not override '([^']+)'", text):
        full_key = full_key or m.group(1)
    if m := re.search(r"Could not (?:find|load) '([^'/]+)/([^']+)'", text) or re.search(
        r"In '[^']*': Could not find '([^'/]+)/([^']+)'", text
    ):
        group, option = m.groups()
        options = re.search(r"Available options in '[^']*':\s*(.*?)\s*(?:Config search path|$)", text, re.S)
        choices = ", ".join(options.group(1).split()) if options else "see conf/" + group
        return ConfigError(group, f"no option '{option}'; choose one of: {choices}")
    if "not in" in text and ("Key '" in text or "ConfigKeyError" in type(causes[-1]).__name__):
        key = full_key or "config"
        return ConfigError(key, "no such key; check its spelling against launcher/schema.py (or add it with + only where a group allows)")
    if m := re.search(r"Value '([^']*)' (?:of type '[^']*' )?could not be converted to (\w+)", text):
        return ConfigError(full_key or "config", f"'{m.group(1)}' is not a valid {m.group(2).lower()}; give a {m.group(2).lower()}")
    if m := re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text):
        return ConfigError(full_key or "config", f"'{m.group(1)}' is not one of {m.group(2)}")
    if "Missing mandatory value" in text:
        return ConfigError(full_key or "config", "is required; set it on the command line")
    if m := re.search(r"LexerNoViableAltException: ([^=\s]+)=", text):
        key = m.group(1).lstrip("+~")
        return ConfigError(key, f"cannot parse its value (a character Hydra's grammar does not take unquoted, such as non-ASCII); quote it: {key}='...'")
    if "mismatched input" in text or "no viable alternative" in text or "extraneous input" in text:
        return ConfigError("overrides", f"cannot parse an override ({first_line(text)}); write key=value, quoting values with spaces")
    return ConfigError(full_key, first_line(text))


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid configuration"
