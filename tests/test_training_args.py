"""TrainingArguments fields with Trainer's meaning, each tested to change what it claims."""

from __future__ import annotations

from launcher.trajectory import changed_keys
from tests.conftest import TINY, run_launcher


def train_losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics() if "loss" in m]


def test_data_seed_orders_the_data_and_seed_alone_follows_it(tmp_path):
    """data_seed (Trainer's: the data samplers' seed) changes which samples come first while the
    initial weights (seed) stay: the first step's loss differs. Unset, it is train.seed."""
    job = [*TINY, "cluster.nproc_per_node=1", "train.max_steps=3", "train.report_to=[]", "train.seed=42"]
    default = train_losses(run_launcher(tmp_path / "default", *job))
    same = train_losses(run_launcher(tmp_path / "same", *job, "train.data_seed=42"))
    other = train_losses(run_launcher(tmp_path / "other", *job, "train.data_seed=7"))
    assert same == default
    assert other[0] != default[0]


def test_run_name_does_not_count_as_a_trajectory_change():
    """Renaming the tracker run on a resume is not refused; a new data_seed is."""
    old = {"train": {"run_name": "a", "data_seed": None}}
    assert changed_keys(old, 2, {"train": {"run_name": "b", "data_seed": None}}, 2) == {}
    assert list(changed_keys(old, 2, {"train": {"run_name": "a", "data_seed": 3}}, 2)) == ["train.data_seed"]
