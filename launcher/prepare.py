"""Composed config → resolved hardware, validated config, plan, and the text printed before a launch."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cluster.environment import describe_host
from launcher.compose import Composed
from launcher.errors import ConfigError
from launcher.plan import Plan, plan_run, render_plan, resolve_hw
from launcher.schema import RunConfig
from launcher.validate import validate_config, validate_hardware


@dataclass(frozen=True, kw_only=True)
class Prepared:
    config: RunConfig  # hardware resolved, output_dir absolute: what every rank reads
    plan: Plan
    text: str

    @functools.cached_property
    def resolved(self) -> DictConfig:
        """The config as written to config.yaml; built only when a run directory is (a dry run
        skips it: ~40 ms)."""
        return OmegaConf.structured(self.config)


def prepare(composed: Composed) -> Prepared:
    cfg = composed.config
    validate_config(cfg)
    host = describe_host()
    run_dir = absolute(cfg.train.output_dir)
    # Every path the ranks open is made absolute here, against the folder the user typed the
    # command in: a rank's (or a SLURM job's) current folder need not be that one.
    cfg = dataclasses.replace(
        cfg,
        hw=resolve_hw(cfg.hw, host),
        train=dataclasses.replace(
            cfg.train,
            output_dir=str(run_dir),
            logging_dir=str(absolute(cfg.train.logging_dir)) if cfg.train.logging_dir else str(run_dir / "tensorboard"),
            resume=cfg.train.resume if cfg.train.resume in ("auto", "none") else str(absolute(cfg.train.resume)),
        ),
        model=dataclasses.replace(cfg.model, init_from=str(absolute(cfg.model.init_from)) if cfg.model.init_from else ""),
        data=dataclasses.replace(cfg.data, paths=[os.path.abspath(os.path.expanduser(p)) for p in cfg.data.paths]),
    )
    validate_hardware(cfg, host)
    check_not_foreign(run_dir)
    if not cfg.dry_run:  # a dry run may plan for a cluster's paths that do not exist here
        check_writable(run_dir, "train.output_dir")
        check_writable(Path(cfg.train.logging_dir), "train.logging_dir")
    plan = plan_run(cfg, host, run_dir)
    return Prepared(config=cfg, plan=plan, text=render_plan(plan, cfg))


def absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


# What may be in a folder before ringleader first writes it as a run directory: Hydra's record of
# a sweep trial (its job folder), nothing else.
BEFORE_A_RUN = {".hydra"}


def check_not_foreign(run_dir: Path) -> None:
    """A run directory is ringleader's (plan.json), or new, or empty: `train.output_dir=.` in a
    project folder would overwrite its config.yaml and fill it with logs."""
    if run_dir.is_dir() and not (run_dir / "plan.json").is_file():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in BEFORE_A_RUN)
        if foreign:
            raise ConfigError("train.output_dir", f"{run_dir} holds files that are not a ringleader run (e.g. {foreign[0]}; no plan.json); choose a new or empty folder")


def check_writable(folder: Path, key: str) -> None:
    """The run can create `folder` (or write into it): a one-line error now, not a traceback after
    the plan was printed. Looks only; creates nothing."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(key, f"{folder} exists and is not a folder; choose another {key}")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{folder} would be inside {existing}, which is a file; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK) or read_only_filesystem(existing) or existing.is_relative_to("/proc") or existing.is_relative_to("/sys"):
        raise ConfigError(key, f"cannot write in {existing} (permission denied or read-only); choose another {key}")


def read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return True
