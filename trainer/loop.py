"""The training loop, with Hugging Face Trainer's semantics: accumulation, clipping, schedule,
logging, evaluation, early stopping, saving. It never asks which strategy it runs.

Loss normalisation: each micro-batch's loss is the mean over its tokens, divided by the
accumulation steps; ranks average their gradients. Every sample has the same number of tokens, so
this equals the mean over all tokens of the optimizer step (transformers #37766 is about the
variable-length case, where the two differ).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from launcher.schema import RunConfig
from trainer.checkpoint import CheckpointManager
from trainer.data import epoch_ends, eval_batches, start_position, train_batches
from trainer.faults import fault_point, planned
from trainer.metrics import MetricsLogger
from trainer.runtime import Runtime
from trainer.strategies import Strategy
from trainer.watchdog import Activity

log = logging.getLogger("ringleader")


class NonFiniteError(RuntimeError):
    pass


class EvaluationInterrupted(Exception):
    """A stop was asked for during an evaluation: every rank left it at the same batch."""


@dataclass(kw_only=True)
class LoopState:
    """Everything the loop needs to continue exactly where it stopped; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed: int = 0  # samples of this epoch consumed, over all ranks
    tokens_seen: int = 0
    skipped_steps: int = 0
    best_metric: float | None = None  # the best evaluation so far (early stopping counts from it)
    best_step: int | None = None
    # The best evaluation that has a checkpoint of its step: what load_best_model_at_end loads and
    # retention keeps. An evaluation between two saves can be better, but has nothing to load.
    best_model_metric: float | None = None
    best_model_step: int | None = None
    patience: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)


@dataclass
class Window:
    """What happened since the last log line."""

    loss: float = 0.0
    steps: int = 0  # steps with a finite loss
    all_steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def all_reduce(values: list[float], op=None) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


class Trainer:
    def __init__(self, *, cfg: RunConfig, plan: dict, runtime: Runtime, strategy: Strategy, train_set, eval_set, checkpoints: CheckpointManager, metrics: MetricsLogger, state: LoopState) -> None:
        self.cfg, self.plan, self.rt, self.strategy = cfg, plan, runtime, strategy
        self.train_set, self.eval_set = train_set, eval_set
        self.checkpoints, self.metrics, self.state = checkpoints, metrics, state
        t = cfg.train
        self.G = t.gradient_accumulation_steps
        self.E = plan["effective_batch_size"]
        self.total = plan["total_steps"]
        # Samples an epoch uses: whole optimizer steps of the dataset the plan counted (the ranks'
        # copy may be smaller if the files changed since: never more than it has).
        usable = plan["steps_per_epoch"] * self.E if plan["steps_per_epoch"] else len(train_set) // self.E * self.E
        self.usable = min(usable, len(train_set) // self.E * self.E)
        if self.usable == 0:
            raise ValueError(f"the training set has {len(train_set)} samples, fewer than one optimizer step of {self.E}; lower the batch or accumulation, or use more data")
        self.eval_every = t.eval_steps or t.logging_steps
        self.greater_is_better = t.greater_is_better if t.greater_is_better is not None else not t.metric_for_best_model.endswith("loss")
        self.status = "running"
        self.last_train_loss: float | None = None
        self.activity = Activity()  # read by the watchdog
        self.interrupted = False  # an evaluation was cut short by a stop request

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        t, s, rt = self.cfg.train, self.state, self.rt
        epoch, consumed = start_position(s.epoch, s.consumed, step_samples=self.E, usable=self.usable)
        if (epoch, consumed) != (s.epoch, s.consumed):
            log.info("epoch %d has no whole optimizer step of %d samples left after position %d of %d: continuing with epoch %d", s.epoch, self.E, s.consumed, self.usable, epoch)
            s.epoch, s.consumed = epoch, consumed
        batches = train_batches(
            self.train_set, s, usable=self.usable, step_samples=self.E, batch_size=t.per_device_train_batch_size, rank=rt.rank,
            world_size=rt.world_size, seed=t.seed, num_workers=self.cfg.data.num_workers, pin_memory=rt.device.type == "cuda",
        )
        if t.eval_on_start and s.step == 0 and t.eval_strategy != "no":
            try:
                self.metrics.log({"step": 0, "epoch": 0.0, **self.evaluate()})
            except EvaluationInterrupted:
                self.interrupted = True  # the first step's boundary stops the run, with a checkpoint
        window = Window()
        started = time.perf_counter()
        just_saved = just_evaluated = False
        while s.step < self.total:
            self.strategy.train()
            loss_sum = torch.zeros((), device=rt.device)
            scale = math.inf if planned("overflow", s.step + 1, rt.rank) else 1.0  # tests only: RINGLEADER_FAULT
            for micro in range(self.G):
                input_ids, labels = (x.to(rt.device, non_blocking=True) for x in next(batches))
                loss = self.strategy.forward(input_ids, labels, sync=micro == self.G - 1)
                self.strategy.backward(loss * scale / self.G)
                loss_sum += loss.detach()
            result = self.strategy.step()
            local_loss = loss_sum / self.G
            s.step += 1
            s.consumed += self.E
            s.tokens_seen += self.plan["tokens_per_step"]
            epoch_ended = epoch_ends(s.consumed, step_samples=self.E, usable=self.usable)
            if epoch_ended:
                s.epoch, s.consumed = s.epoch + 1, 0

            fault_point("step", s.step, rt.rank)  # tests only: RINGLEADER_FAULT (trainer/faults.py)
            # One small collective a step: a stop request on any rank, a non-finite loss on any rank.
            stop, nonfinite = all_reduce([float(bool(rt.stop.signum)), float(not torch.isfinite(local_loss))], dist.ReduceOp.MAX if dist.is_initialized() else None)
            if nonfinite or (result.skipped and not result.overflow):
                self.on_nonfinite(local_loss, result.grad_norm)
                local_loss = torch.zeros((), device=rt.device)
            else:
                if result.overflow:
                    s.skipped_steps += 1
                    log.info("step %d skipped by the fp16 loss scaler (gradients overflowed); the loss scale is lowered", s.step)
                window.loss += float(local_loss)
                window.steps += 1
            window.tokens += self.plan["tokens_per_step"]
            window.all_steps += 1
            self.metrics.advance(s.step)

            if s.step % t.logging_steps == 0 or (t.logging_first_step and s.step == 1):
                self.log_window(window, result.grad_norm)
                window = Window()
            save_due = self.due(t.save_strategy, t.save_steps, epoch_ended)
            # A stop asked for on any rank skips the evaluation: the checkpoint comes first.
            just_evaluated = self.due(t.eval_strategy, self.eval_every, epoch_ended) and not stop
            if just_evaluated and self.evaluate_and_track(checkpointed=save_due):
                self.status = "early_stopped"
            just_saved = save_due
            if just_saved:
                self.save()
            if stop or self.interrupted:
                self.status = "stopped"
                if not just_saved:
                    self.save()
                    just_saved = True
                log.warning("stopped at step %d (%s); rerun the same command to resume", s.step, rt.stop.name or "signal on another rank")
                break
            if self.status == "early_stopped":
                log.info("early stopping at step %d: %s did not improve for %d evaluations", s.step, t.metric_for_best_model, t.early_stopping_patience)
                break

        if self.status == "running":
            self.status = "completed"
        if self.status != "stopped":
            if t.eval_strategy != "no" and not just_evaluated:
                self.evaluate_and_track(checkpointed=t.save_strategy != "no")
            if t.save_strategy != "no" and not just_saved:
                self.save()
        self.checkpoints.wait()
        return {"status": self.status, "train_runtime_s": round(time.perf_counter() - started, 3)}

    def due(self, strategy: str, every: int, epoch_ended: bool) -> bool:
        return (strategy == "steps" and self.state.step % every == 0) or (strategy == "epoch" and epoch_ended)

    # -- pieces ----------------------------------------------------------------------------------

    def on_nonfinite(self, local_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        s = self.state
        losses = [float(local_loss)]
        if dist.is_initialized():
            gathered = [None] * self.rt.world_size
            dist.all_gather_object(gathered, float(local_loss))
            losses = gathered
        bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        where = f"loss {losses[bad[0]]} on rank(s) {', '.join(map(str, bad))}" if bad else f"gradient norm {float(grad_norm)} (loss finite on every rank)"
        if self.cfg.train.nonfinite == "skip":
            s.skipped_steps += 1
            log.warning("step %d skipped: non-finite %s", s.step, where)
            return
        raise NonFiniteError(f"non-finite {where} at step {s.step}; the update was not applied. Lower optimizer.learning_rate, or set train.nonfinite=skip to skip such steps")

    def log_window(self, window: Window, grad_norm: torch.Tensor) -> None:
        elapsed = time.perf_counter() - window.started
        loss_total, steps_total = all_reduce([window.loss, float(window.steps)])
        times = [elapsed / max(1, window.all_steps)]
        if dist.is_initialized():
            gathered = torch.zeros(self.rt.world_size, dtype=torch.float64)
            gathered[self.rt.rank] = times[0]
            dist.all_reduce(gathered)
            times = gathered.tolist()
        log.debug("step time on this rank %.4f s", times[self.rt.rank] if len(times) > 1 else times[0])
        event = {
            "step": self.state.step,
            "epoch": round(self.state.epoch + self.state.consumed / max(1, self.usable), 4),
            "loss": loss_total / max(1.0, steps_total),
            "learning_rate": self.strategy.learning_rate,
            "grad_norm": float(grad_norm),
            "tokens_per_s": round(window.tokens / max(elapsed, 1e-9), 1),
            "step_time_s": round(max(times), 5),
            "slowest_rank": int(max(range(len(times)), key=times.__getitem__)),
        }
        if self.rt.device.type == "cuda":  # this rank's peak since the start, what an OOM is about
            event["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.rt.device) / 1e9, 3)
        self.last_train_loss = event["loss"]
        self.metrics.log(event)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        self.strategy.eval()
        loader = eval_batches(self.eval_set, batch_size=t.per_device_eval_batch_size, rank=self.rt.rank, world_size=self.rt.world_size, max_batches=t.eval_max_batches)
        total, count = 0.0, 0.0
        for input_ids, labels in loader:
            fault_point("eval", self.state.step, self.rt.rank)  # tests only: a slow evaluation
            # A stop asked for on any rank ends the evaluation on all of them at this batch (one
            # tiny collective a batch), so the stop checkpoint is written before SLURM's or
            # torchrun's kill: a long evaluation would otherwise run past it.
            (stop,) = all_reduce([float(bool(self.rt.stop.signum))], dist.ReduceOp.MAX if dist.is_initialized() else None)
            if stop:
                self.strategy.train()
                raise EvaluationInterrupted
            loss = self.strategy.forward(input_ids.to(self.rt.device), labels.to(self.rt.device))
            total += float(loss) * len(input_ids)
            count += len(input_ids)
            self.activity.beats += 1
        total, count = all_reduce([total, count])
        self.strategy.train()
        return {"eval_loss": total / max(count, 1.0), "eval_samples": int(count)}

    def evaluate_and_track(self, *, checkpointed: bool) -> bool:
        """Evaluate, log, update the best metric; True when early stopping says stop.
        `checkpointed`: a checkpoint of this step will exist (it is saved right after), so this
        evaluation may become the best model to load at the end."""
        t, s = self.cfg.train, self.state
        try:
            results = self.evaluate()
        except EvaluationInterrupted:
            log.warning("evaluation at step %d interrupted by a stop request; saving a checkpoint instead", s.step)
            self.interrupted = True
            return False
        s.last_eval = results
        self.metrics.log({"step": s.step, "epoch": round(s.epoch + s.consumed / max(1, self.usable), 4), **results})
        value = results.get(t.metric_for_best_model if t.metric_for_best_model.startswith("eval_") else f"eval_{t.metric_for_best_model}")
        if value is None:
            return False
        improved = s.best_metric is None or (value > s.best_metric if self.greater_is_better else value < s.best_metric)
        # As transformers' EarlyStoppingCallback: an improvement counts only beyond the threshold.
        if improved and (s.best_metric is None or abs(value - s.best_metric) > t.early_stopping_threshold):
            s.patience = 0
        else:
            s.patience += 1
        if improved:
            s.best_metric, s.best_step = value, s.step
        stop = bool(t.early_stopping_patience) and s.patience >= t.early_stopping_patience
        # Early stopping ends the run here, and the end of a run saves its last step.
        if checkpointed or (stop and t.save_strategy != "no"):
            self.track_best_model(value)
        return stop

    def track_best_model(self, value: float) -> None:
        s = self.state
        if s.best_model_metric is None or (value > s.best_model_metric if self.greater_is_better else value < s.best_model_metric):
            s.best_model_metric, s.best_model_step = value, s.step

    def save(self) -> None:
        keep = {self.state.best_model_step} if self.cfg.train.load_best_model_at_end and self.state.best_model_step else set()
        self.activity.saving = True
        try:
            self.checkpoints.save(self.state.step, self.strategy, dataclasses.asdict(self.state), keep=keep, asynchronous=self.cfg.train.save_async)
        finally:
            self.activity.saving = False
