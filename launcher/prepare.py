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
from launcher.hf_config import looks_local, package_path
from launcher.plan import Plan
from launcher.planner import plan_run, render_plan, resolve_hw
from launcher.schema import RunConfig
from launcher.tokenize_step import cached, pretokenize
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
        model=dataclasses.replace(
            cfg.model,
            init_from=str(absolute(cfg.model.init_from)) if cfg.model.init_from else "",
            config=local_path(package_path(cfg.model.config)),
            name_or_path=local_path(cfg.model.name_or_path),
            tokenizer=local_path(cfg.model.tokenizer),
        ),
        data=dataclasses.replace(
            cfg.data,
            paths=[os.path.abspath(os.path.expanduser(p)) for p in cfg.data.paths],
            validation_paths=[os.path.abspath(os.path.expanduser(p)) for p in cfg.data.validation_paths],
            cache_dir=str(absolute(cfg.data.cache_dir)) if cfg.data.cache_dir else "",
        ),
    )
    check_environment(cfg, host)
    tokenized = None
    if cfg.data.is_text:  # after every check, before planning: the plan holds the cache folder and counts
        tokenized = cached(cfg) if cfg.dry_run else pretokenize(cfg)
    plan = plan_run(cfg, host, run_dir, tokenized=tokenized)
    return Prepared(config=cfg, plan=plan, text=render_plan(plan, cfg))


def local_path(value: str) -> str:
    """A model or tokenizer given as a local path, made absolute; a hub id (or "") as it is."""
    return str(absolute(value)) if value and looks_local(value) else value


def absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()
