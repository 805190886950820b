"""trainer/control.py without processes: when the loop logs, evaluates, saves and stops, and the
best-metric and early-stopping bookkeeping (transformers' DefaultFlowCallback and
EarlyStoppingCallback semantics)."""

from __future__ import annotations

from trainer.control import EARLY_STOPPED, STOPPED, Control, FlowControl, track_evaluation
from trainer.loop import LoopState


def decisions(flow: FlowControl, steps: int, *, epoch_every: int = 0) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"log": [], "evaluate": [], "save": []}
    for step in range(1, steps + 1):
        c = flow.on_step_end(step, epoch_ended=bool(epoch_every) and step % epoch_every == 0, stop_requested=False)
        for key in out:
            if getattr(c, key):
                out[key].append(step)
        assert c.stop is None
    return out


def test_steps_strategies_and_the_first_step():
    flow = FlowControl(logging_steps=5, logging_first_step=True, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=8)
    assert decisions(flow, 16) == {"log": [1, 5, 10, 15], "evaluate": [4, 8, 12, 16], "save": [8, 16]}
    # eval_steps 0 means logging_steps, as in transformers
    flow = FlowControl(logging_steps=3, eval_strategy="steps", eval_steps=0)
    assert decisions(flow, 7) == {"log": [3, 6], "evaluate": [3, 6], "save": []}


def test_epoch_strategies():
    flow = FlowControl(logging_steps=100, eval_strategy="epoch", save_strategy="epoch")
    assert decisions(flow, 9, epoch_every=3) == {"log": [], "evaluate": [3, 6, 9], "save": [3, 6, 9]}


def test_a_stop_request_skips_the_evaluation_and_saves():
    flow = FlowControl(logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no")
    c = flow.on_step_end(2, epoch_ended=False, stop_requested=True)
    assert c == Control(log=True, evaluate=False, save=True, stop=STOPPED)
    assert flow.on_train_end(stopped=True) == Control()


def test_an_interrupted_evaluation_stops_with_a_save_and_early_stopping_stops_without():
    flow = FlowControl(logging_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=2)
    c = flow.on_step_end(1, epoch_ended=False, stop_requested=False)
    flow.on_evaluate(c, interrupted=True, early_stop=False)
    assert (c.save, c.stop) == (True, STOPPED)
    c = flow.on_step_end(3, epoch_ended=False, stop_requested=False)
    flow.on_evaluate(c, interrupted=False, early_stop=True)
    assert (c.save, c.stop) == (False, EARLY_STOPPED)
    # the end of the run then saves the last step (not evaluated again)
    assert flow.on_train_end(stopped=False) == Control(evaluate=False, save=True)


def test_the_end_of_a_run_evaluates_and_saves_what_its_last_step_did_not():
    flow = FlowControl(logging_steps=1, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4)
    flow.on_step_end(4, epoch_ended=False, stop_requested=False)
    assert flow.on_train_end(stopped=False) == Control()
    flow.on_step_end(5, epoch_ended=False, stop_requested=False)
    assert flow.on_train_end(stopped=False) == Control(evaluate=True, save=True)
    assert FlowControl(logging_steps=1).on_train_end(stopped=False) == Control()  # eval and save off
    # a run with no step left (resumed at its end) evaluates and saves once
    assert FlowControl(logging_steps=1, eval_strategy="steps", save_strategy="steps", save_steps=3).on_train_end(stopped=False) == Control(evaluate=True, save=True)


def test_early_stopping_counts_from_the_best_beyond_the_threshold():
    s = LoopState()
    kw = {"greater_is_better": False, "threshold": 0.05, "patience": 2, "saves": True}
    for step, value, checkpointed, stop in [(1, 1.0, True, False), (2, 0.98, False, False), (3, 0.97, True, True)]:
        s.step = step
        assert track_evaluation(s, value, checkpointed=checkpointed, **kw) is stop
    # 0.98 and 0.97 improve on 1.0 but not beyond 0.05 over the best so far: patience runs out
    assert (s.best_metric, s.best_step, s.patience) == (0.97, 3, 2)
    # the best model is the best evaluation that has a checkpoint: step 2's had none
    assert (s.best_model_metric, s.best_model_step) == (0.97, 3)


def test_the_best_model_needs_a_checkpoint_unless_early_stopping_saves_it():
    s = LoopState(step=1)
    assert not track_evaluation(s, 0.5, greater_is_better=True, threshold=0.0, patience=0, checkpointed=False, saves=True)
    assert (s.best_metric, s.best_model_step) == (0.5, None)
    s.step = 2
    assert track_evaluation(s, 0.4, greater_is_better=True, threshold=0.0, patience=1, checkpointed=False, saves=True)
    assert (s.best_metric, s.best_model_step) == (0.5, 2)  # the early stop saves step 2: it is the best that has one
    s2 = LoopState(step=2, best_metric=0.5, patience=0)
    assert track_evaluation(s2, 0.4, greater_is_better=True, threshold=0.0, patience=1, checkpointed=False, saves=False)
    assert s2.best_model_step is None
