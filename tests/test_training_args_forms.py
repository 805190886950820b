"""transformers 5's forms of the TrainingArguments fields (issue 15 item 2), and the fields of item 6
that change numerics or flow (eval_delay, label smoothing, tf32, full determinism), each checked
against transformers itself where it has the rule, and each tested to change what it claims."""

from __future__ import annotations

import math
import os

import pytest
import torch

from launcher.errors import ConfigError
from launcher.options import resolve_steps, step_form_error
from launcher.schema import SchedulerConfig, TrainConfig
from trainer.control import Control, FlowControl


def plan_for(tmp_path, *overrides: str):
    """The plan of a dry run, as the launcher builds it (no processes)."""
    from launcher.compose import compose
    from launcher.prepare import prepare

    return prepare(compose(["+hw=cpu", *overrides, f"train.output_dir={tmp_path / 'run'}", "dry_run=true"])).plan


def trainer_args(**kwargs):
    import transformers

    return transformers.TrainingArguments(output_dir="/tmp/unused", report_to=[], **kwargs)


@pytest.mark.parametrize("total", [1, 7, 10, 33, 300, 1001])
@pytest.mark.parametrize("value", [0, 1, 5, 0.01, 0.05, 0.1, 0.333, 0.5, 0.99])
def test_step_forms_resolve_as_trainer_does(total, value):
    """A count stays a count; a ratio below 1 is math.ceil(total * ratio): Trainer's
    get_warmup_steps (warmup_steps) and TrainerState.compute_steps (logging/eval/save steps)."""
    from transformers.trainer_callback import TrainerState

    assert resolve_steps(value, total) == trainer_args(warmup_steps=value).get_warmup_steps(total)
    if value > 0:
        args = trainer_args(logging_steps=value, eval_strategy="steps", eval_steps=value, save_strategy="steps", save_steps=value)
        state = TrainerState()
        state.compute_steps(args, total)
        assert resolve_steps(value, total) == state.logging_steps == state.eval_steps == state.save_steps


def test_the_plan_holds_the_resolved_counts_and_the_ranks_use_them(tmp_path):
    """The planner resolves each ratio once; FlowControl reads the plan's counts, not the config's."""
    plan = plan_for(tmp_path, "train.max_steps=40", "scheduler.warmup_steps=0.1", "train.logging_steps=0.05", "train.eval_strategy=steps", "train.eval_steps=0.25", "train.save_strategy=steps", "train.save_steps=0.5")
    assert (plan.warmup_steps, plan.logging_steps, plan.eval_steps, plan.save_steps) == (4, 2, 10, 20)
    t = TrainConfig(output_dir="x", logging_steps=0.05, eval_strategy="steps", eval_steps=0.25, save_strategy="steps", save_steps=0.5)
    flow = FlowControl.from_config(t, plan)
    assert (flow.logging_steps, flow.eval_steps, flow.save_steps) == (2, 10, 20)
    counts = plan_for(tmp_path, "train.max_steps=40", "scheduler.warmup_steps=3", "train.logging_steps=7", "train.eval_strategy=steps", "train.eval_steps=0")
    assert (counts.warmup_steps, counts.logging_steps, counts.eval_steps) == (3, 7, 0)  # eval_steps 0: every logging_steps


@pytest.mark.parametrize(("key", "value"), [("logging_steps", 2.5), ("eval_steps", 1.5), ("save_steps", 10.25), ("logging_steps", 0), ("eval_steps", -0.5)])
def test_a_step_count_that_is_neither_a_count_nor_a_ratio_is_refused(key, value):
    t = TrainConfig(output_dir="x", eval_strategy="steps", save_strategy="steps", **{key: value})
    with pytest.raises(ConfigError, match=f"train.{key}"):
        t.check()
    with pytest.raises(ConfigError, match="scheduler.warmup_steps"):
        SchedulerConfig(warmup_steps=2.5).check()
    assert step_form_error(0.5) is None and step_form_error(3) is None and step_form_error(3.0) is None


def test_older_names_keep_working_with_a_one_line_note(tmp_path):
    """transformers 5 removed warmup_ratio and evaluation_strategy (TrainingArguments refuses both);
    ringleader keeps both working and the plan says once what to write instead."""
    from launcher.compose import compose
    from launcher.planner import intervals_line

    for name in ("warmup_ratio", "evaluation_strategy"):
        with pytest.raises(TypeError):
            trainer_args(**{name: 0.1 if name == "warmup_ratio" else "steps"})
    plan = plan_for(tmp_path, "train.max_steps=50", "scheduler.warmup_ratio=0.1", "train.eval_strategy=no", "train.evaluation_strategy=epoch")
    assert plan.warmup_steps == 5
    notes = "\n".join(plan.notes)
    assert "scheduler.warmup_steps=0.1" in notes and "train.eval_strategy=epoch" in notes and len(plan.notes) == 2
    assert "\n" not in plan.notes[0]
    assert "evaluate every epoch" in intervals_line(plan, compose(["train.output_dir=x", "train.evaluation_strategy=epoch"]).config)
    # warmup_ratio gives the ratio over the conf files' default (a ratio in warmup_steps); a count still wins.
    assert plan_for(tmp_path, "train.max_steps=50", "scheduler.warmup_steps=7", "scheduler.warmup_ratio=0.5").warmup_steps == 7
    assert plan_for(tmp_path, "train.max_steps=50").notes == []  # the shipped schedules use transformers 5's form
    with pytest.raises(ConfigError, match="train.evaluation_strategy"):
        TrainConfig(output_dir="x", evaluation_strategy="sometimes").check()


def test_defaults_are_trainers():
    """logging_first_step is off by default (Trainer's); include_num_input_tokens_seen takes
    Trainer's booleans."""
    args = trainer_args()
    t = TrainConfig(output_dir="x")
    assert t.logging_first_step is args.logging_first_step is False
    assert (t.eval_delay, t.label_smoothing_factor, t.include_num_input_tokens_seen, t.full_determinism, t.tf32) == (args.eval_delay, args.label_smoothing_factor, args.include_num_input_tokens_seen, args.full_determinism, args.tf32)
    assert TrainConfig(output_dir="x", include_num_input_tokens_seen="True").include_num_input_tokens_seen == "all"
    assert TrainConfig(output_dir="x", include_num_input_tokens_seen="false").include_num_input_tokens_seen == "no"


def trainer_flow(args, total: int, steps_per_epoch: int) -> list[tuple[int, bool, bool]]:
    """(step, evaluate, save) as transformers' DefaultFlowCallback decides them."""
    from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState

    state, callback, out = TrainerState(), DefaultFlowCallback(), []
    state.max_steps = total
    state.compute_steps(args, total)
    for step in range(1, total + 1):
        control = TrainerControl()
        state.global_step = step
        callback.on_step_end(args, state, control)
        if step % steps_per_epoch == 0:
            state.epoch = step // steps_per_epoch
            callback.on_epoch_end(args, state, control)
        out.append((step, control.should_evaluate, control.should_save))
    return out


@pytest.mark.parametrize(("strategy", "delay"), [("steps", 0), ("steps", 7), ("steps", 8), ("steps", 30), ("epoch", 0), ("epoch", 2), ("epoch", 2.5)])
def test_eval_delay_matches_trainers_flow(strategy, delay):
    """No evaluation before eval_delay steps (eval_strategy=steps) or epochs (epoch), the final
    evaluation included, step for step as DefaultFlowCallback."""
    total, per_epoch, every = 24, 5, 4
    args = trainer_args(eval_strategy=strategy, eval_steps=every, eval_delay=delay, save_strategy="no")
    theirs = [step for step, evaluate, _ in trainer_flow(args, total, per_epoch) if evaluate]
    flow = FlowControl(logging_steps=every, eval_strategy=strategy, eval_steps=every, eval_delay=delay)
    ours = []
    for step in range(1, total + 1):
        epoch_ended = step % per_epoch == 0
        if flow.on_step_end(step, epoch_ended=epoch_ended, stop_requested=False, epoch=step // per_epoch).evaluate:
            ours.append(step)
    if flow.on_train_end(stopped=False).evaluate:
        ours.append(total)
    if strategy == "epoch":  # Trainer evaluates an epoch strategy's end only where an epoch ends; ringleader adds the last step
        ours = [s for s in ours if s % per_epoch == 0]
    assert ours == theirs
    assert ours or delay > 0


def test_save_strategy_best_saves_after_an_improving_evaluation():
    """As Trainer's SaveStrategy.BEST: never on a schedule, only after an evaluation that improved the metric."""
    flow = FlowControl(logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="best")
    c = flow.on_step_end(2, epoch_ended=True, stop_requested=False)
    assert c.evaluate and not c.save
    flow.on_evaluate(c, interrupted=False, early_stop=False, improved=True)
    assert c.save
    c = flow.on_step_end(4, epoch_ended=False, stop_requested=False)
    flow.on_evaluate(c, interrupted=False, early_stop=False, improved=False)
    assert not c.save
    assert flow.on_train_end(stopped=False) == Control(evaluate=False, save=False)
    with pytest.raises(ConfigError, match="train.save_strategy"):
        TrainConfig(output_dir="x", save_strategy="best").check()  # nothing evaluates
    TrainConfig(output_dir="x", save_strategy="best", eval_strategy="steps", load_best_model_at_end=True).check()  # no strategy match needed, as Trainer


def test_metric_for_best_model_has_real_choices_and_perplexity_is_minimised():
    for metric, maximize in (("loss", False), ("eval_loss", False), ("perplexity", False), ("accuracy", True), ("eval_accuracy", True)):
        t = TrainConfig(output_dir="x", eval_strategy="steps", metric_for_best_model=metric)
        t.check()
        assert t.maximize is maximize
    with pytest.raises(ConfigError, match="train.metric_for_best_model"):
        TrainConfig(output_dir="x", eval_strategy="steps", metric_for_best_model="bleu").check()
    TrainConfig(output_dir="x", eval_strategy="steps", metric_for_best_model="bleu", compute_metrics="mypkg.metrics.bleu").check()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_trainers_label_smoother(eps):
    """The summed smoothed cross-entropy over the count equals transformers' LabelSmoother (which
    averages over the labelled tokens), with -100 positions ignored."""
    from transformers.trainer_pt_utils import LabelSmoother

    from trainer.model_io import summed_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    count = int((labels != -100).sum())
    ours = summed_cross_entropy(logits, labels, label_smoothing=eps) / count
    theirs = LabelSmoother(epsilon=eps)({"logits": logits}, labels, shift_labels=False)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    if eps:
        assert not torch.allclose(ours, summed_cross_entropy(logits, labels) / count)


def test_label_smoothing_reaches_the_loss_and_needs_logits():
    """The built-in GPT (forward(input_ids, labels=None)) is called without labels and smoothed;
    a model that needs its labels (it returns its own mean) gives no logits: refused."""
    from tests.user_code import Bigram
    from trainer.model import GPT
    from trainer.model_io import gives_logits, loss_sum_and_count, summed_cross_entropy

    torch.manual_seed(0)
    gpt = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    batch = {"input_ids": torch.randint(0, 16, (2, 8)), "labels": torch.randint(0, 16, (2, 8))}
    plain, count = loss_sum_and_count(gpt, batch)
    smoothed, _ = loss_sum_and_count(gpt, batch, label_smoothing=0.2)
    assert torch.allclose(smoothed, summed_cross_entropy(gpt(batch["input_ids"]), batch["labels"], label_smoothing=0.2))
    assert not torch.allclose(plain, smoothed) and int(count) == 16
    assert gives_logits(gpt) and not gives_logits(Bigram(16))
    from trainer.main import needs_logits  # what the rank refuses, in one line, for a model without logits

    assert needs_logits(TrainConfig(output_dir="x", label_smoothing_factor=0.1)) == "train.label_smoothing_factor=0.1"
    assert needs_logits(TrainConfig(output_dir="x", eval_strategy="steps", metric_for_best_model="accuracy")) == "train.metric_for_best_model=eval_accuracy"
    assert needs_logits(TrainConfig(output_dir="x")) == ""


def test_eval_statistics_perplexity_accuracy_and_a_users_metric():
    """eval_perplexity is exp(token-weighted eval_loss); eval_accuracy counts argmax hits over
    labelled tokens; a user's (numerator, denominator) pairs and sums add over batches."""
    from tests.metric_code import token_accuracy
    from trainer.model_io import EvalStatistics, summed_cross_entropy

    class Fixed(torch.nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, labels=None):
            return self.logits[: len(input_ids)]

    g = torch.Generator().manual_seed(1)
    batches = []
    for n in (2, 3):  # batches of different sizes and labelled counts: a mean of means would differ
        logits = torch.randn(n, 5, 7, generator=g)
        labels = torch.randint(0, 7, (n, 5), generator=g)
        labels[0, : n + 1] = -100
        batches.append((logits, labels))
    stats = EvalStatistics(with_logits=True, metric_fn=token_accuracy)
    for logits, labels in batches:
        stats.update(Fixed(logits), {"input_ids": torch.zeros(labels.shape, dtype=torch.long), "labels": labels})
    out = stats.metrics(lambda names, values: values)
    loss = sum(float(summed_cross_entropy(lo, la)) for lo, la in batches) / sum(int((la != -100).sum()) for _, la in batches)
    correct = sum(int(((lo.argmax(-1) == la) & (la != -100)).sum()) for lo, la in batches)
    labelled = sum(int((la != -100).sum()) for _, la in batches)
    assert out["eval_loss"] == pytest.approx(loss, rel=1e-9)
    assert out["eval_perplexity"] == pytest.approx(math.exp(loss), rel=1e-9)
    assert out["eval_accuracy"] == pytest.approx(correct / labelled) == pytest.approx(out["eval_token_acc"])
    assert out["eval_labelled_tokens"] == labelled


def test_tf32_is_set_on_the_rank_and_refused_on_a_cpu_profile(tmp_path):
    from trainer.numerics import apply_numerics

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_numerics(TrainConfig(output_dir="x", tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_numerics(TrainConfig(output_dir="x", tf32=False))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    with pytest.raises(ConfigError, match="train.tf32"):
        plan_for(tmp_path, "train.tf32=true")


def test_full_determinism_sets_torch_and_the_ranks_environment(tmp_path):
    """As transformers' enable_full_determinism: deterministic algorithms and cuDNN on the rank,
    CUBLAS_WORKSPACE_CONFIG (and the launch-blocking switches) in every rank's environment."""
    from transformers.trainer_utils import enable_full_determinism

    from trainer.numerics import apply_numerics

    plan = plan_for(tmp_path, "train.full_determinism=true")
    assert plan.env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and "CUBLAS_WORKSPACE_CONFIG" not in plan_for(tmp_path).env
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    environ = dict(os.environ)  # enable_full_determinism exports variables: restored after
    try:
        apply_numerics(TrainConfig(output_dir="x", full_determinism=True, seed=3))
        ours = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.rand(3)
        torch.use_deterministic_algorithms(False)
        enable_full_determinism(3)
        theirs = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.rand(3)
        assert ours[:3] == theirs[:3] == (True, True, False) and torch.equal(ours[3], theirs[3])
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was[1], was[2]
        os.environ.clear()
        os.environ.update(environ)


def test_the_migration_carries_transformers_5_forms_and_the_new_fields(tmp_path):
    """A TrainingArguments file with ratio steps, save_strategy=best and the fields added here
    becomes a config with the same values (the migration refused them before they existed)."""
    from launcher.compose import compose
    from launcher.migrate import load_arguments, overrides_for

    path = tmp_path / "args.json"
    path.write_text(trainer_args(
        eval_strategy="steps", eval_steps=0.1, save_strategy="best", logging_steps=0.02, warmup_steps=0.05, eval_delay=3,
        label_smoothing_factor=0.1, include_num_input_tokens_seen=True, full_determinism=True, metric_for_best_model="accuracy",
    ).to_json_string())
    overrides, _ = overrides_for(load_arguments(path))
    cfg = compose([*overrides, "train.output_dir=x"]).config
    cfg.check()
    t = cfg.train
    assert (t.eval_steps, t.save_strategy, t.logging_steps, t.eval_delay, t.label_smoothing_factor) == (0.1, "best", 0.02, 3, 0.1)
    assert (t.include_num_input_tokens_seen, t.full_determinism, t.eval_metric, t.maximize) == ("all", True, "eval_accuracy", True)
    assert cfg.scheduler.warmup_steps == 0 and cfg.scheduler.warmup_ratio == 0.05  # the migration's split of warmup_steps
