"""TrainingArguments fields with Trainer's meaning, each tested to change what it claims."""

from __future__ import annotations

from functools import partial

from launcher.trajectory import changed_keys
from tests.conftest import ONE_RANK, run_launcher, side_by_side


def train_losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics() if "loss" in m]


def test_data_seed_orders_the_data_and_seed_alone_follows_it(shared_runs, tmp_path):
    """data_seed (Trainer's: the data samplers' seed) changes which samples come first while the
    initial weights (seed) stay: the first step's loss differs. Unset, it is train.seed."""
    job = ONE_RANK  # tests/conftest.py: 1 rank, 3 steps, train.seed=42; shared_runs["one_rank"] is it run as it is
    default = train_losses(shared_runs["one_rank"])
    runs = side_by_side(**{seed: partial(run_launcher, tmp_path / seed, *job, f"train.data_seed={seed}") for seed in ("42", "7")})
    same, other = train_losses(runs["42"]), train_losses(runs["7"])
    assert same == default
    assert other[0] != default[0]


def test_run_name_does_not_count_as_a_trajectory_change():
    """Renaming the tracker run on a resume is not refused; a new data_seed is."""
    old = {"train": {"run_name": "a", "data_seed": None}}
    assert changed_keys(old, 2, {"train": {"run_name": "b", "data_seed": None}}, 2) == {}
    assert list(changed_keys(old, 2, {"train": {"run_name": "a", "data_seed": 3}}, 2)) == ["train.data_seed"]
