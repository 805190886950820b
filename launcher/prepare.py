"""Composed config → resolved hardware, validated config, plan, and the text printed before a launch."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cluster.environment import describe_host
from launcher.compose import Composed
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
    run_dir = Path(cfg.train.output_dir).expanduser().resolve()
    cfg = dataclasses.replace(
        cfg,
        hw=resolve_hw(cfg.hw, host),
        train=dataclasses.replace(cfg.train, output_dir=str(run_dir), logging_dir=cfg.train.logging_dir or str(run_dir / "tensorboard")),
    )
    validate_hardware(cfg, host)
    if run_dir.exists() and not run_dir.is_dir():
        from launcher.errors import ConfigError

        raise ConfigError("train.output_dir", f"{run_dir} exists and is not a folder; choose another train.output_dir")
    plan = plan_run(cfg, host, run_dir)
    return Prepared(config=cfg, plan=plan, text=render_plan(plan, cfg))
