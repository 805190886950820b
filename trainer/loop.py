"""The training loop, with Hugging Face Trainer's semantics: accumulation, clipping, schedule,
logging, evaluation, early stopping, saving. It never asks which strategy or precision it runs:
the strategy reports whether its step was skipped and why, and a FlowControl (trainer/control.py)
decides when to log, evaluate, save and stop.

Loss normalisation is token-exact (DESIGN.md "Loss"): before the micro-batches of a step run, the
loop counts their labelled tokens and all-reduces that count (one small collective a step); each
micro-batch's backward then takes its summed cross-entropy over that global count (the strategy
maps it onto its gradient reduction: Strategy.backward). The loss of the step is the sum over every
labelled token of every micro-batch on every rank over their number, whatever the padding, the
masked prompts, or how tokens fall into micro-batches and ranks (transformers #34242, #37766).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from launcher.plan import Plan
from launcher.schema import RunConfig
from launcher.steps import StepLayout
from trainer.checkpoint import CheckpointManager
from trainer.control import STOPPED, Control, FlowControl, track_evaluation
from trainer.data import FILLER, eval_batches, start_position, train_batches
from trainer.autobatch import BatchFinder
from trainer.compile import compile_counters
from trainer.faults import fault_point, planned
from trainer.generate import Generations
from trainer.metrics import MetricsLogger, mfu, model_flops_per_token
from trainer.model_io import Batch, EvalStatistics, MetricFn, as_batch, count_labels, to_device
from trainer.runtime import Runtime
from trainer.strategies import Strategy
from trainer.strategies.base import LOSS_SCALE, NONFINITE
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
    tokens_seen: int = 0  # input tokens of the batches trained on, padding included, all ranks (Trainer's "all")
    non_padding_tokens_seen: int = 0  # those with attention_mask 1 (every token without a mask): Trainer's "non_padding"
    skipped_steps: int = 0
    best_metric: float | None = None  # the best evaluation so far (early stopping counts from it)
    best_step: int | None = None
    # The best evaluation that has a checkpoint of its step: what load_best_model_at_end loads and
    # retention keeps. An evaluation between two saves can be better, but has nothing to load.
    best_model_metric: float | None = None
    best_model_step: int | None = None
    patience: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """One optimizer step, as every rank agrees on it."""

    loss_sum: float  # summed cross-entropy over every labelled token of the step, all ranks
    tokens: int  # labelled tokens of the step, all ranks
    input_tokens: int  # input tokens of the step, padding included, all ranks
    non_padding_tokens: int  # of which attention_mask says real (all of them without a mask)
    grad_norm: torch.Tensor  # before clipping
    learning_rate: float  # the rate the step used (read before the step's schedule update), as Trainer logs it
    skipped: str | None  # None (applied), LOSS_SCALE, or NONFINITE (a non-finite loss on some rank, or gradients)
    stop_requested: bool  # a stop signal on some rank
    local_loss: float  # this rank's summed loss (to name the rank of a non-finite one)


@dataclass
class Window:
    """What happened since the last log line."""

    loss_sum: float = 0.0  # over the steps with a finite loss
    labelled: int = 0  # their labelled tokens
    steps: int = 0
    # Every input token the steps had (padding included, filler rows not), all ranks: throughput.
    # The step's own count (its existing collective), not the plan's batch x seq_len: an epoch's
    # last, smaller step and padded batches shorter than seq_len have fewer.
    tokens: int = 0
    learning_rate: float = 0.0  # the last step's
    started: float = field(default_factory=time.perf_counter)

    def add(self, outcome: StepOutcome) -> None:
        if outcome.skipped != NONFINITE:
            self.loss_sum += outcome.loss_sum
            self.labelled += outcome.tokens
        self.steps += 1
        self.tokens += outcome.input_tokens
        self.learning_rate = outcome.learning_rate


def all_reduce(values: list[float], op=None) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


class Trainer:
    def __init__(
        self, *, cfg: RunConfig, plan: Plan, runtime: Runtime, strategy: Strategy, train_set, eval_set, checkpoints: CheckpointManager, metrics: MetricsLogger, state: LoopState,
        with_logits: bool = False, metric_fn: MetricFn | None = None,
    ) -> None:
        self.cfg, self.plan, self.rt, self.strategy = cfg, plan, runtime, strategy
        self.train_set, self.eval_set = train_set, eval_set
        self.checkpoints, self.metrics, self.state = checkpoints, metrics, state
        t = cfg.train
        self.G = t.gradient_accumulation_steps
        self.E = plan.effective_batch_size
        self.total = plan.total_steps
        # How an epoch falls into steps, as Trainer runs it (launcher/steps.py): the samples the plan
        # counted (the ranks' copy may be smaller if the files changed since: never more than it has).
        samples = min(plan.train_samples, len(train_set)) if plan.train_samples else len(train_set)
        self.layout = StepLayout(samples=samples, micro_batch=t.per_device_train_batch_size * runtime.world_size, accumulation=self.G, drop_last=t.dataloader_drop_last)
        self.usable = self.layout.kept  # samples an epoch trains on
        if self.usable == 0:
            raise ValueError(f"the training set has {len(train_set)} samples, fewer than one micro-batch of {self.layout.micro_batch} with train.dataloader_drop_last; set it to false, or use more data")
        self.flow = FlowControl.from_config(t, plan)
        # The launcher counts a data._target_ dataset's validation split only here, on the ranks.
        if eval_set is not None and len(eval_set) < runtime.world_size:
            raise ValueError(f"the validation split has {len(eval_set)} samples for {runtime.world_size} ranks; give data._target_ a larger one, or set train.eval_strategy=no")
        self.greater_is_better = t.maximize
        # Evaluation's statistics: with logits when the model gives them (eval_accuracy, a user's
        # train.compute_metrics; main.py refused what needs them otherwise).
        self.with_logits = with_logits
        self.metric_fn = metric_fn
        # Model FLOPs utilisation, where the hardware profile gives its peak (trainer/metrics.py).
        self.flops_per_token = model_flops_per_token(strategy.model, seq_len=cfg.data.seq_len) if cfg.hw.peak_tflops_bf16 > 0 else 0.0
        self.status = "running"
        self.last_train_loss: float | None = None
        self.activity = Activity()  # read by the watchdog
        self.interrupted = False  # an evaluation was cut short by a stop request
        # train.eval_prompts: completed at each evaluation by every rank together (trainer/generate.py).
        self.generations = Generations.from_config(cfg, device=runtime.device)
        # The per-device batch trained with now: train.auto_find_batch_size may divide it (and
        # multiply the accumulation by as much) after an out-of-memory error (trainer/autobatch.py).
        self.B = t.per_device_train_batch_size
        self.finder = BatchFinder(batch_size=self.B, accumulation=self.G, rank=runtime.rank, world_size=runtime.world_size, device=runtime.device) if t.auto_find_batch_size else None

    def use_batch_size(self, batch_size: int) -> None:
        """The finder's smaller per-device batch and larger accumulation, from the step that ran out
        of memory on: the same effective batch, so the same samples in every step and the same schedule."""
        assert self.finder is not None and batch_size == self.finder.batch_size
        before = (self.B, self.G)
        self.B, self.G = self.finder.batch_size, self.finder.accumulation
        self.layout = dataclasses.replace(self.layout, micro_batch=self.B * self.rt.world_size, accumulation=self.G)
        step = self.state.step + 1
        log.warning(
            "step %d: out of memory with per-device batch %d x accumulation %d; retrying it with %d x %d (effective batch %d unchanged)",
            step, *before, self.B, self.G, self.E,
        )
        self.metrics.log({"event": "auto_find_batch_size", "step": step, "per_device_train_batch_size": self.B, "gradient_accumulation_steps": self.G, "effective_batch_size": self.E})

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        s, t, started = self.state, self.cfg.train, time.perf_counter()
        if self.cfg.train.eval_on_start and s.step == 0 and self.cfg.train.eval_strategy != "no":
            self.evaluate_and_log()
        if self.finder is None:
            self.train_steps(self.B)
        else:  # accelerate's find_executable_batch_size reruns the steps from the state's position after an out-of-memory error
            self.finder.wrap(self.train_steps)()
        return self.finish(started)

    def train_steps(self, batch_size: int) -> None:
        """Optimizer steps from the state's position to the end or a stop, with per-device batch
        `batch_size` (smaller than the configured one after an out-of-memory error with
        train.auto_find_batch_size: trainer/autobatch.py)."""
        s, t = self.state, self.cfg.train
        if batch_size != self.B:
            self.use_batch_size(batch_size)
        batches = self.batches()
        window = Window()
        while s.step < self.total:
            # G micro-batches, fewer in an epoch's last, partial accumulation step (Trainer's).
            outcome = self.train_step([as_batch(next(batches)) for _ in range(self.layout.micro_batches(s.consumed))])
            epoch_ended = self.advance(outcome)
            window.add(outcome)
            control = self.flow.on_step_end(s.step, epoch_ended=epoch_ended, stop_requested=outcome.stop_requested or self.interrupted, epoch=s.epoch)
            if control.log:
                self.log_window(window, outcome.grad_norm)
                window = Window()
            if control.evaluate:
                # save_strategy=best saves exactly the evaluations that improve: those may be loaded at the end.
                early_stop = self.evaluate_and_track(checkpointed=control.save or t.save_strategy == "best")
                self.flow.on_evaluate(control, interrupted=self.interrupted, early_stop=early_stop, improved=s.best_step == s.step)
            if control.save:
                self.save(full=control.stop == STOPPED)  # a stop's checkpoint is resumed next: whole, even with save_only_model
            if control.stop:
                self.status = control.stop
                self.log_stop(control)
                break

    def finish(self, started: float) -> dict[str, Any]:
        """After the last step or a stop: the final evaluation and save Trainer's flow asks for."""
        s, t = self.state, self.cfg.train
        if t.torch_compile:  # the proof that compilation happened (dynamo's counters, this process)
            log.info("torch_compile: %s", " ".join(f"{k} {v}" for k, v in compile_counters().items()))
        self.status = "completed" if self.status == "running" else self.status
        end = self.flow.on_train_end(stopped=self.status == STOPPED)
        if end.evaluate:
            self.evaluate_and_track(checkpointed=end.save or t.save_strategy == "best")
            self.flow.on_evaluate(end, interrupted=False, early_stop=False, improved=s.best_step == s.step)
        if end.save:
            self.save(full=self.status == STOPPED)
        self.checkpoints.wait()
        return {"status": self.status, "train_runtime_s": round(time.perf_counter() - started, 3)}

    def train_step(self, micro_batches: list[Batch]) -> StepOutcome:
        """One optimizer step over this rank's micro-batches, token-exact; every rank returns the
        same outcome (loss and stop flags are reduced once after the step)."""
        rt, step = self.rt, self.state.step + 1
        # The step's labelled tokens over all ranks, counted on the CPU before the batches move (and
        # its input tokens, for num_input_tokens_seen: the same collective). A filler row (a rank
        # with no sample in a last, smaller micro-batch: trainer/data.py) has no label and no input.
        real_batches = [b for b in micro_batches if not b.pop(FILLER, False)]
        inputs = sum(b["input_ids"].numel() for b in real_batches)
        real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in real_batches)
        tokens, input_tokens, non_padding = all_reduce([float(sum(map(count_labels, micro_batches))), float(inputs), float(real)])
        self.strategy.train()
        loss_sum = torch.zeros((), device=rt.device)
        scale = math.inf if planned("overflow", step, rt.rank) else 1.0  # tests only: RINGLEADER_FAULT
        finder = self.finder  # train.auto_find_batch_size: an out-of-memory error is kept, agreed on by all ranks, retried
        for i, batch in enumerate(micro_batches):
            with finder.catch() if finder else contextlib.nullcontext():
                micro_loss, _ = self.strategy.loss(to_device(batch, rt.device), sync=i == len(micro_batches) - 1)
                self.strategy.backward(micro_loss * scale, tokens=int(tokens))
                loss_sum += micro_loss.detach()
                if finder:
                    finder.inject(step, i)  # tests only: RINGLEADER_FAULT=oom:RANK:STEP
            if finder:
                finder.agree(step, self.strategy.discard_gradients)
        learning_rate = self.strategy.learning_rate  # the step's: step() then advances the schedule
        result = self.strategy.step()
        fault_point("step", step, rt.rank)  # tests only: RINGLEADER_FAULT (trainer/faults.py)
        local_loss = float(loss_sum)
        # The step's second small collective: a stop request on any rank, a non-finite loss on any
        # rank, the step's loss over all ranks.
        stop, nonfinite, total = all_reduce([float(bool(rt.stop.signum)), float(not math.isfinite(local_loss)), local_loss if math.isfinite(local_loss) else 0.0])
        skipped = NONFINITE if nonfinite else result.skipped
        return StepOutcome(loss_sum=total, tokens=int(tokens), input_tokens=int(input_tokens), non_padding_tokens=int(non_padding), grad_norm=result.grad_norm, learning_rate=learning_rate, skipped=skipped, stop_requested=bool(stop), local_loss=local_loss)

    def advance(self, outcome: StepOutcome) -> bool:
        """Count the step in the loop's state; True when it ended an epoch."""
        s = self.state
        s.step += 1
        s.consumed += self.layout.step_samples(s.consumed)
        s.tokens_seen += outcome.input_tokens
        s.non_padding_tokens_seen += outcome.non_padding_tokens
        epoch_ended = self.layout.epoch_ends(s.consumed)
        if epoch_ended:
            s.epoch, s.consumed = s.epoch + 1, 0
        if outcome.skipped == LOSS_SCALE:
            s.skipped_steps += 1
            log.info("step %d skipped by the fp16 loss scaler (gradients overflowed); the loss scale is lowered", s.step)
        elif outcome.skipped == NONFINITE:
            self.on_nonfinite(outcome.local_loss, outcome.grad_norm)
        self.metrics.advance(s.step)
        return epoch_ended

    def batches(self) -> Iterator:
        """This rank's micro-batches from the state's position on, epoch after epoch."""
        t, s, rt = self.cfg.train, self.state, self.rt
        epoch, consumed = start_position(s.epoch, s.consumed, step_samples=self.layout.smallest, usable=self.layout.samples)
        if (epoch, consumed) != (s.epoch, s.consumed):
            log.info("epoch %d has no step of %d samples left after position %d of %d: continuing with epoch %d", s.epoch, self.layout.smallest, s.consumed, self.layout.samples, epoch)
            s.epoch, s.consumed = epoch, consumed
        return train_batches(
            self.train_set, s, usable=self.layout.samples, step_samples=self.E, batch_size=self.B, rank=rt.rank,
            world_size=rt.world_size, seed=t.seed if t.data_seed is None else t.data_seed, num_workers=self.cfg.data.num_workers, pin_memory=self.cfg.data.pin_memory and rt.device.type == "cuda",
            drop_last=t.dataloader_drop_last, prefetch_factor=self.cfg.data.prefetch_factor,
        )

    def log_stop(self, control: Control) -> None:
        if control.stop == STOPPED:
            log.warning("stopped at step %d (%s); rerun the same command to resume", self.state.step, self.rt.stop.name or "signal on another rank")
        else:
            t = self.cfg.train
            log.info("early stopping at step %d: %s did not improve for %d evaluations", self.state.step, t.metric_for_best_model, t.early_stopping_patience)

    # -- pieces ----------------------------------------------------------------------------------

    def on_nonfinite(self, local_loss: float, grad_norm: torch.Tensor) -> None:
        s = self.state
        losses: list[Any] = [float(local_loss)]
        if dist.is_initialized():
            losses = [None] * self.rt.world_size
            dist.all_gather_object(losses, float(local_loss))
        bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        where = f"loss {losses[bad[0]]} on rank(s) {', '.join(map(str, bad))}" if bad else f"gradient norm {float(grad_norm)} (loss finite on every rank)"
        if self.cfg.train.nonfinite == "skip":
            s.skipped_steps += 1
            log.warning("step %d skipped: non-finite %s", s.step, where)
            return
        raise NonFiniteError(f"non-finite {where} at step {s.step}; the update was not applied. Lower optimizer.learning_rate, or set train.nonfinite=skip to skip such steps")

    def log_window(self, window: Window, grad_norm: torch.Tensor) -> None:
        elapsed = time.perf_counter() - window.started
        times = [elapsed / max(1, window.steps)]
        if dist.is_initialized():
            gathered = torch.zeros(self.rt.world_size, dtype=torch.float64)
            gathered[self.rt.rank] = times[0]
            dist.all_reduce(gathered)
            times = gathered.tolist()
        log.debug("step time on this rank %.4f s", times[self.rt.rank] if len(times) > 1 else times[0])
        tokens_per_s = window.tokens / max(elapsed, 1e-9)
        event = {
            "step": self.state.step,
            "epoch": round(self.state.epoch + self.state.consumed / max(1, self.usable), 4),
            # Token-exact: the window's summed loss over all ranks over its labelled tokens.
            "loss": window.loss_sum / window.labelled if window.labelled else 0.0,
            "learning_rate": window.learning_rate,  # the rate the last step used, as Trainer logs it
            "grad_norm": float(grad_norm),
            "tokens_per_s": round(tokens_per_s, 1),
            "step_time_s": round(max(times), 5),
            "slowest_rank": int(max(range(len(times)), key=times.__getitem__)),
        }
        seen = self.cfg.train.include_num_input_tokens_seen
        if seen != "no":  # Trainer's num_input_tokens_seen: cumulative over the run, across resumes
            event["num_input_tokens_seen"] = self.state.tokens_seen if seen == "all" else self.state.non_padding_tokens_seen
        if self.flops_per_token:
            event["mfu"] = round(mfu(tokens_per_s / self.rt.world_size, self.flops_per_token, self.cfg.hw.peak_tflops_bf16), 6)
        if self.rt.device.type == "cuda":  # this rank's peak since the start, what an OOM is about
            event["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.rt.device) / 1e9, 3)
        self.last_train_loss = event["loss"]
        self.metrics.log(event)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-exact as training: the summed loss over all ranks' labelled tokens over their number."""
        t = self.cfg.train
        self.strategy.eval()
        loader = eval_batches(self.eval_set, batch_size=t.per_device_eval_batch_size, rank=self.rt.rank, world_size=self.rt.world_size, max_batches=t.eval_max_batches)
        stats = EvalStatistics(with_logits=self.with_logits, metric_fn=self.metric_fn)
        for raw in loader:
            fault_point("eval", self.state.step, self.rt.rank)  # tests only: a slow evaluation
            # A stop asked for on any rank ends the evaluation on all of them at this batch (one
            # tiny collective a batch), so the stop checkpoint is written before SLURM's or
            # torchrun's kill: a long evaluation would otherwise run past it.
            (stop,) = all_reduce([float(bool(self.rt.stop.signum))], dist.ReduceOp.MAX if dist.is_initialized() else None)
            if stop:
                self.strategy.train()
                raise EvaluationInterrupted
            batch = as_batch(raw)
            self.strategy.evaluate_batch(stats, to_device(batch, self.rt.device))
            stats.add("samples", len(batch["input_ids"]), self.rt.device)
            self.activity.beats += 1
        results = stats.metrics(self.reduce_statistics)
        self.strategy.train()
        results["eval_samples"] = int(results.pop("eval_samples"))
        return results

    def reduce_statistics(self, names: list[str], values: torch.Tensor) -> torch.Tensor:
        """Sum an evaluation's statistics over ranks: one all-reduce (gloo: on the CPU). The names
        are compared first when a user's metrics are in (a rank with other names would hang the sum)."""
        if not dist.is_initialized():
            return values
        if self.metric_fn is not None:
            every: list[Any] = [None] * self.rt.world_size
            dist.all_gather_object(every, names)
            if any(other != names for other in every):
                raise ValueError(f"train.compute_metrics returned other names on another rank ({every}); return the same names on every batch")
        values = values.cpu() if dist.get_backend() == "gloo" else values
        dist.all_reduce(values)
        return values

    def evaluate_and_log(self) -> dict[str, float] | None:
        """Evaluate and log; None when a stop request cut it short (the next step boundary stops)."""
        s = self.state
        try:
            results = self.evaluate()
        except EvaluationInterrupted:
            log.warning("evaluation at step %d interrupted by a stop request; saving a checkpoint instead", s.step)
            self.interrupted = True
            return None
        self.metrics.log({"step": s.step, "epoch": round(s.epoch + s.consumed / max(1, self.usable), 4), **results})
        if self.generations is not None:  # every rank generates (collective under sharding); rank 0 writes
            self.metrics.log({"step": s.step, "generations": self.generations(self.strategy)})
            self.activity.beats += 1
        return results

    def evaluate_and_track(self, *, checkpointed: bool) -> bool:
        """Evaluate, log, update the best metric; True when early stopping says stop.
        `checkpointed`: a checkpoint of this step will exist (it is saved right after), so this
        evaluation may become the best model to load at the end."""
        t = self.cfg.train
        results = self.evaluate_and_log()
        if results is None:
            return False
        self.state.last_eval = results
        value = results.get(t.eval_metric)
        if value is None:  # as Trainer's _determine_best_metric: a metric evaluation did not produce
            raise ValueError(f"train.metric_for_best_model: {t.eval_metric} is not among the evaluation's metrics ({', '.join(sorted(results))}); pick one of them")
        return track_evaluation(
            self.state, value, greater_is_better=self.greater_is_better, threshold=t.early_stopping_threshold,
            patience=t.early_stopping_patience, checkpointed=checkpointed, saves=t.save_strategy != "no",
        )

    def save(self, *, full: bool = False) -> None:
        keep = {self.state.best_model_step} if self.cfg.train.load_best_model_at_end and self.state.best_model_step else set()
        self.activity.saving = True
        try:
            self.checkpoints.save(self.state.step, self.strategy, dataclasses.asdict(self.state), keep=keep, asynchronous=self.cfg.train.save_async, full=full)
        finally:
            self.activity.saving = False
