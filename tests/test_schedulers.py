"""Every learning-rate schedule equals transformers.get_scheduler step by step (transformers is
imported here only: ranks run ringleader's own formulas), and bad lr_scheduler_kwargs are refused
naming the key."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trainer.optim import OptionError, build_scheduler, schedule_kwargs

transformers = pytest.importorskip("transformers")

LR = 0.01
# (total steps, warmup steps): no warmup, short and long warmups, warmup one short of the end,
# a one-step run, and an odd length.
GRID = [(10, 0), (10, 3), (100, 10), (37, 36), (1, 0), (53, 7)]
CASES: list[tuple[str, dict[str, Any], float]] = [
    ("linear", {}, 0.5),
    ("cosine", {}, 0.5),
    ("cosine", {}, 1.75),
    ("cosine_with_restarts", {}, 1),
    ("cosine_with_restarts", {}, 3),
    ("constant", {}, 0.5),
    ("constant_with_warmup", {}, 0.5),
    ("polynomial", {}, 0.5),
    ("polynomial", {"lr_end": 1e-4, "power": 2.0}, 0.5),
    ("polynomial", {"lr_end": 0.0, "power": 0.5}, 0.5),
    ("inverse_sqrt", {}, 0.5),
    ("inverse_sqrt", {"timescale": 4}, 0.5),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}, 0.5),
    ("cosine_with_min_lr", {"min_lr": 1e-3}, 0.5),
    ("cosine_with_min_lr", {"min_lr_rate": 0.05}, 2.0),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}, 0.5),
    ("cosine_warmup_with_min_lr", {"min_lr": 2e-3, "warmup_lr_rate": 0.2}, 0.5),
    *[("warmup_stable_decay", {"num_decay_steps": -3, "warmup_type": w, "decay_type": d, "min_lr_ratio": 0.1}, 0.5) for w in ("linear", "cosine", "1-sqrt") for d in ("linear", "cosine", "1-sqrt")],
    ("warmup_stable_decay", {"num_decay_steps": -2, "num_stable_steps": 2}, 0.5),
    ("warmup_stable_decay", {"num_decay_steps": -3}, 1.5),
]


def transformers_kwargs(name: str, kwargs: dict[str, Any], num_cycles: float) -> dict[str, Any]:
    """The same schedule's scheduler_specific_kwargs for transformers (num_cycles included)."""
    if name in ("cosine", "cosine_with_restarts", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"):
        return {**kwargs, "num_cycles": num_cycles}
    return dict(kwargs)


def rates(scheduler: Any, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("total", "warmup"), GRID)
@pytest.mark.parametrize(("name", "kwargs", "num_cycles"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_schedule_equals_transformers_step_by_step(name, kwargs, num_cycles, total, warmup):
    kwargs = dict(kwargs)
    if kwargs.get("num_decay_steps", 0) < 0:  # a share of the run: -3 means a third of it
        kwargs["num_decay_steps"] = total // -kwargs["num_decay_steps"]
    if name == "polynomial" and total == warmup:
        pytest.skip("transformers divides by zero when the warmup covers the whole run")
    param = torch.nn.Parameter(torch.zeros(1))
    ours_opt, theirs_opt = torch.optim.SGD([param], lr=LR), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    cfg = SimpleNamespace(name=name, lr_scheduler_kwargs=kwargs, num_cycles=num_cycles)
    ours = build_scheduler(ours_opt, cfg, total_steps=total, warmup_steps=warmup)
    theirs = transformers.get_scheduler(name, theirs_opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=transformers_kwargs(name, kwargs, num_cycles))
    # Past the end too: the rate logged after the last step, and what a longer resumed run would see.
    want, got = rates(theirs, theirs_opt, total + 3), rates(ours, ours_opt, total + 3)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300), f"{name} step {step} of {total} (warmup {warmup}): {a!r} != {b!r}"


def test_schedules_are_not_all_the_same():
    """A guard on the test above: the schedules really differ (a table wired to one formula would pass it)."""
    seen = set()
    for name, kwargs, cycles in CASES:
        if name == "warmup_stable_decay":
            kwargs = {**kwargs, "num_decay_steps": 20}
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        sched = build_scheduler(opt, SimpleNamespace(name=name, lr_scheduler_kwargs=kwargs, num_cycles=cycles), total_steps=100, warmup_steps=10)
        seen.add(tuple(round(r, 12) for r in rates(sched, opt, 100)))
    assert len(seen) >= 20


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("linear", {"lr_end": 0.1}, "lr_scheduler_kwargs.lr_end"),
        ("cosine", {"num_cycles": 2}, "lr_scheduler_kwargs.num_cycles"),
        ("cosine_with_min_lr", {}, "lr_scheduler_kwargs"),
        ("cosine_with_min_lr", {"min_lr": 1e-4, "min_lr_rate": 0.1}, "lr_scheduler_kwargs.min_lr"),
        ("cosine_with_min_lr", {"min_lr_rate": 1.5}, "lr_scheduler_kwargs.min_lr_rate"),
        ("cosine_with_min_lr", {"min_lr": "low"}, "lr_scheduler_kwargs.min_lr"),
        ("polynomial", {"lr_end": 0.5}, "lr_scheduler_kwargs.lr_end"),
        ("polynomial", {"power": 0}, "lr_scheduler_kwargs.power"),
        ("inverse_sqrt", {"timescale": 2.5}, "lr_scheduler_kwargs.timescale"),
        ("warmup_stable_decay", {}, "lr_scheduler_kwargs.num_decay_steps"),
        ("warmup_stable_decay", {"num_decay_steps": 5, "decay_type": "exp"}, "lr_scheduler_kwargs.decay_type"),
        ("warmup_stable_decay", {"num_decay_steps": 5, "min_lr_ratio": True}, "lr_scheduler_kwargs.min_lr_ratio"),
        ("reduce_lr_on_plateau", {}, "name"),
        ("cosine_schedule", {}, "name"),
    ],
)
def test_bad_schedule_arguments_are_refused_naming_the_key(name, kwargs, key):
    with pytest.raises(OptionError) as info:
        schedule_kwargs(name, kwargs, learning_rate=LR)
    assert info.value.key == key, str(info.value)


def test_schedule_tables_import_no_torch():
    """The launcher checks lr_scheduler_kwargs and optim_args with these tables, without torch."""
    import subprocess
    import sys

    from tests.conftest import ROOT, launcher_env

    code = "import sys, trainer.optim as o; o.schedule_kwargs('polynomial', {'power': 2}, learning_rate=1.0); o.parse_optim_args('sgd', 'nesterov=true'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=launcher_env())


def test_every_registered_schedule_has_its_arguments_table():
    from launcher.options import SCHEDULE_KWARGS
    from launcher.registry import SCHEDULERS

    assert set(SCHEDULE_KWARGS) == set(SCHEDULERS)
    assert {c[0] for c in CASES} == set(SCHEDULERS)  # and each is compared with transformers above
