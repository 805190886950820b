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
from launcher.plan import Plan
from launcher.planner import plan_run, render_plan, resolve_hw
from launcher.schema import RunConfig
from launcher.validate import check_environment


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
    cfg.check()
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
    check_environment(cfg, host)
    plan = plan_run(cfg, host, run_dir)
    return Prepared(config=cfg, plan=plan, text=render_plan(plan, cfg))


def absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()
