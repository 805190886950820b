"""When the loop logs, evaluates, saves and stops: one small object the loop asks after every step
(as Hugging Face Trainer's DefaultFlowCallback fills its TrainerControl), and the best-metric and
early-stopping bookkeeping (as its EarlyStoppingCallback). Pure: no torch, no processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.plan import Plan
    from launcher.schema import TrainConfig
    from trainer.loop import LoopState

STOPPED = "stopped"  # a signal (or an interrupted evaluation) on any rank: save, then leave
EARLY_STOPPED = "early_stopped"  # the metric did not improve for early_stopping_patience evaluations


@dataclass(kw_only=True)
class Control:
    """What to do at the end of one step, in this order: log, evaluate, save, stop."""

    log: bool = False
    evaluate: bool = False
    save: bool = False
    stop: str | None = None  # None, STOPPED or EARLY_STOPPED


@dataclass(kw_only=True)
class FlowControl:
    logging_steps: int
    logging_first_step: bool = False
    eval_strategy: str = "no"  # no | steps | epoch
    eval_steps: int = 0  # 0: logging_steps, as transformers
    eval_delay: float = 0  # no evaluation before this step (steps) or epoch (epoch), as Trainer
    save_strategy: str = "no"  # no | steps | epoch | best (on_evaluate decides)
    save_steps: int = 0

    @classmethod
    def from_config(cls, t: TrainConfig, plan: Plan) -> FlowControl:
        """The config's strategies with the plan's step counts (ratios of the total already resolved)."""
        return cls(
            logging_steps=plan.logging_steps, logging_first_step=t.logging_first_step, eval_strategy=t.eval_strategy,
            eval_steps=plan.eval_steps, eval_delay=t.eval_delay, save_strategy=t.save_strategy, save_steps=plan.save_steps,
        )

    def __post_init__(self) -> None:
        self.last = Control()  # the decision of the latest step, for on_train_end
        self.step, self.epoch = 0, 0  # of the latest step

    def due(self, strategy: str, every: int, step: int, epoch_ended: bool) -> bool:
        return (strategy == "steps" and every > 0 and step % every == 0) or (strategy == "epoch" and epoch_ended)

    def delayed(self, step: int, epoch: int) -> bool:
        """Within eval_delay: Trainer compares it with the step (steps) or the epochs done (epoch)."""
        return self.eval_delay > (step if self.eval_strategy == "steps" else epoch)

    def on_step_end(self, step: int, *, epoch_ended: bool, stop_requested: bool, epoch: int = 0) -> Control:
        """After optimizer step `step` (`epoch`: epochs completed). A stop asked for on any rank skips
        the evaluation (the checkpoint comes first) and always saves. save_strategy=best saves only
        after an evaluation that improved the metric (on_evaluate)."""
        self.step, self.epoch = step, epoch
        control = Control(
            log=step % self.logging_steps == 0 or (self.logging_first_step and step == 1),
            evaluate=self.due(self.eval_strategy, self.eval_steps or self.logging_steps, step, epoch_ended) and not stop_requested and not self.delayed(step, epoch),
            save=self.due(self.save_strategy, self.save_steps, step, epoch_ended) or stop_requested,
            stop=STOPPED if stop_requested else None,
        )
        self.last = control
        return control

    def on_evaluate(self, control: Control, *, interrupted: bool, early_stop: bool, improved: bool = False) -> None:
        """After this step's evaluation: cut short by a stop request, it stops (with a save); or
        early stopping ends the run (the end of the run then saves, as on_train_end says). With
        save_strategy=best, an evaluation that improved the metric saves (Trainer's SaveStrategy.BEST)."""
        if self.save_strategy == "best" and improved:
            control.save = True
        if interrupted:
            control.stop, control.save = STOPPED, True
        elif early_stop:
            control.stop = EARLY_STOPPED

    def on_train_end(self, *, stopped: bool) -> Control:
        """The last step's evaluation and save, where that step did not do them already. A stopped
        run has saved; it evaluates when it resumes."""
        if stopped:
            return Control()
        evaluate = self.eval_strategy != "no" and not self.last.evaluate and not self.delayed(self.step, self.epoch)
        # best: the end saves only if its evaluation improves the metric (on_evaluate).
        return Control(evaluate=evaluate, save=self.save_strategy not in ("no", "best") and not self.last.save)


def better(value: float, best: float | None, *, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


def track_evaluation(state: LoopState, value: float, *, greater_is_better: bool, threshold: float, patience: int, checkpointed: bool, saves: bool) -> bool:
    """Update the best metric, the patience count and the best model from one evaluation; True
    when early stopping says stop. `checkpointed`: a checkpoint of this step will exist, so it may
    become the model to load at the end; `saves`: the run saves at all (an early stop saves its
    last step)."""
    improved = better(value, state.best_metric, greater_is_better=greater_is_better)
    # As transformers' EarlyStoppingCallback: an improvement counts only beyond the threshold.
    if improved and (state.best_metric is None or abs(value - state.best_metric) > threshold):
        state.patience = 0
    else:
        state.patience += 1
    if improved:
        state.best_metric, state.best_step = value, state.step
    stop = bool(patience) and state.patience >= patience
    # The best evaluation that has a checkpoint of its step: what load_best_model_at_end loads and
    # retention keeps. An evaluation between two saves can be better, but has nothing to load.
    if (checkpointed or (stop and saves)) and better(value, state.best_model_metric, greater_is_better=greater_is_better):
        state.best_model_metric, state.best_model_step = value, state.step
    return stop
