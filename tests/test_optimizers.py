"""Each optimizer choice builds what its name says (Trainer's meaning), optim_args change what they
claim, and the new ones train under DDP and under DeepSpeed (which takes trainer/optim.py's
optimizer as a client optimizer)."""

from __future__ import annotations

import pytest
import torch

from launcher.schema import OptimizerConfig
from tests.conftest import TINY, TRAINS, run_launcher, share
from trainer.optim import build_optimizer


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def one_step(opt: torch.optim.Optimizer, net: torch.nn.Module) -> None:
    net(torch.randn(4, 6, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    opt.step()


def test_adamw_torch_fused_is_the_fused_kernel_and_matches_foreach():
    fused_net, foreach_net = model(), model()
    fused = build_optimizer(fused_net, OptimizerConfig(name="adamw_torch_fused", learning_rate=1e-2, weight_decay=0.1))
    foreach = build_optimizer(foreach_net, OptimizerConfig(name="adamw_torch", learning_rate=1e-2, weight_decay=0.1))
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True and not fused.defaults["foreach"]
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]
    for _ in range(3):
        one_step(fused, fused_net)
        one_step(foreach, foreach_net)
    for a, b in zip(fused_net.parameters(), foreach_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    adamw = build_optimizer(model(), OptimizerConfig(name="adamw"))
    assert adamw.defaults["foreach"] is True  # adamw is adamw_torch under its older name


def test_adafactor_has_trainers_arguments_and_factored_state():
    from transformers.optimization import Adafactor

    net = model()
    opt = build_optimizer(net, OptimizerConfig(name="adafactor", learning_rate=1e-3, weight_decay=0.01))
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert (group["lr"], group["scale_parameter"], group["relative_step"], group["warmup_init"], group["weight_decay"]) == (1e-3, False, False, False, 0.01)
    one_step(opt, net)
    state = opt.state[net[0].weight]
    assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= set(state) and "exp_avg" not in state  # factored, no first moment: not AdamW's state

    with_momentum = build_optimizer(net2 := model(), OptimizerConfig(name="adafactor", optim_args="beta1=0.9, clip_threshold=2.0"))
    one_step(with_momentum, net2)
    assert "exp_avg" in with_momentum.state[net2[0].weight] and with_momentum.param_groups[0]["clip_threshold"] == 2.0


def test_optim_args_reach_the_optimizer():
    net = model()
    amsgrad = build_optimizer(net, OptimizerConfig(name="adamw_torch_fused", optim_args="amsgrad=true"))
    one_step(amsgrad, net)
    assert amsgrad.param_groups[0]["amsgrad"] and "max_exp_avg_sq" in amsgrad.state[net[0].weight]
    sgd = build_optimizer(model(), OptimizerConfig(name="sgd", momentum=0.9, optim_args="nesterov=true,dampening=0"))
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optimizer=adamw_torch", "optimizer.optim_args='amsgrad=perhaps'"], "optimizer.optim_args.amsgrad"),
        (["optimizer=adamw_torch_fused", "optimizer.optim_args='foo=1'"], "optimizer.optim_args.foo"),
        (["optimizer=adafactor", "optimizer.adam_epsilon=1e-6"], "optimizer.adam_epsilon"),
        (["optimizer=adamw_8bit"], "optimizer"),  # bitsandbytes on a CPU profile
        (["optimizer=adafactor", "strategy=zero3_offload"], "optimizer"),
    ],
)
def test_bad_optimizer_choices_are_refused_at_plan_time(overrides, key, tmp_path):
    run = run_launcher(tmp_path / "run", *overrides, "dry_run=true", check=False)
    assert run.code == 2 and run.proc.stderr.startswith(f"ringleader: error: {key}:"), run.output
    assert not (tmp_path / "run").exists()


# Made once, beside the session's other shared runs (tests/conftest.py).
ADAFACTOR_ZERO2 = share("adafactor_zero2", *TINY, "strategy=zero2", "optimizer=adafactor", "optimizer.learning_rate=1e-2", "train.max_steps=12", "scheduler=constant", "train.report_to=[]")


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_new_optimizers_train_for_real(strategy, shared_runs):
    """A real 2-rank run per strategy: adamw_torch_fused under DDP (torch's own fused kernel), and
    Adafactor as DeepSpeed's client optimizer under ZeRO-2. The loss goes down."""
    assert "optimizer=adamw_torch_fused" in TRAINS  # tests/conftest.py TRAINS: ddp, 30 steps, learning rate 3e-3
    run = shared_runs["trains" if strategy == "ddp" else ADAFACTOR_ZERO2]
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    assert run.result()["status"] == "completed" and losses[-1] < losses[0], losses


def test_a_changed_config_resume_keeps_adafactors_own_eps_and_applies_optim_args():
    """train.resume_with_changed_config writes the new optimizer.* values into the restored
    groups, optim_args included; Adafactor's eps is a pair of its own, not optimizer.adam_epsilon."""
    from types import SimpleNamespace

    from launcher.schema import RunConfig, SchedulerConfig
    from trainer.checkpoint import apply_new_config
    from trainer.optim import build_scheduler

    net = model()
    cfg = RunConfig(optimizer=OptimizerConfig(name="adafactor", learning_rate=1e-3), scheduler=SchedulerConfig(name="constant"))
    opt = build_optimizer(net, cfg.optimizer)
    strategy = SimpleNamespace(optimizer=opt, scheduler=build_scheduler(opt, cfg.scheduler, total_steps=10, warmup_steps=0))
    apply_new_config(strategy, RunConfig(optimizer=OptimizerConfig(name="adafactor", learning_rate=2e-3, optim_args="clip_threshold=3.0"), scheduler=cfg.scheduler))
    assert opt.param_groups[0]["eps"] == (1e-30, 1e-3) and opt.param_groups[0]["lr"] == 2e-3
    assert opt.param_groups[0]["clip_threshold"] == 3.0  # a new optim_args value applies too
    one_step(opt, net)
