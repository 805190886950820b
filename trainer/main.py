"""The per-rank entry: init, build, train, close. `python -m trainer RUN_DIR` (torchrun starts it)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import record

from launcher.files import atomic_write
from launcher.schema import TrainConfig
from launcher.targets import load_target
from trainer.build import build_model
from trainer.checkpoint import CheckpointManager, apply_new_config
from trainer.data import build_dataset
from trainer.export import write_final
from trainer.loop import LoopState, Trainer
from trainer.metrics import MetricsLogger
from trainer.model_io import gives_logits
from trainer.numerics import apply_numerics
from trainer.requeue import stop_status
from trainer.runtime import close_runtime, init_runtime, load_run
from trainer.strategies import build_strategy
from trainer.strategies.base import enable_gradient_checkpointing
from trainer.watchdog import Watchdog, is_collective_timeout, name_stalled_ranks

log = logging.getLogger("ringleader")


@record
def main(run_dir: Path) -> int:
    cfg, plan = load_run(run_dir)
    rt = init_runtime(run_dir, cfg, plan)
    t = cfg.train
    result: dict = {"status": "failed"}
    try:
        apply_numerics(t)  # train.tf32, train.full_determinism
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, strategy=cfg.strategy.name, seed=t.seed, deepspeed=plan.deepspeed, peft=cfg.peft, gradient_checkpointing=t.gradient_checkpointing)
        with_logits = gives_logits(model)
        if (setting := needs_logits(t)) and not with_logits:
            raise ValueError(f"{setting} needs the model's logits, but {cfg.model._target_} returns only its own mean loss; give its forward labels=None and return logits without labels (trainer/model_io.py), or drop it")
        metric_fn = load_target(t.compute_metrics, "train.compute_metrics") if t.compute_metrics else None
        if cfg.data.is_text and cfg.data.packing:
            from trainer.hf_model import packing_refusal

            if (why := packing_refusal(model)) is not None:
                raise ValueError(f"data.packing: {why}; set data.packing=false")
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model, t.gradient_checkpointing_kwargs)
            log.info("gradient checkpointing on: activations of each transformer block are recomputed in backward")
        if cfg.model.init_from:  # warm start, before any wrapping: works from any strategy and world size
            model.load_state_dict(load_file(cfg.model.init_from))
        strategy = build_strategy(cfg.strategy.name, cfg=cfg, device=rt.device)
        strategy.setup(model, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps)
        torch.manual_seed(t.seed + rt.rank)  # dropout differs across ranks
        pad = int(plan.tokenized.get("pad_token_id", 0))
        train_set = build_dataset(cfg.data, "train", vocab_size=cfg.model.vocab_size, seed=t.seed, data_cache=plan.data_cache, pad_token_id=pad)
        eval_set = build_dataset(cfg.data, "validation", vocab_size=cfg.model.vocab_size, seed=t.seed, data_cache=plan.data_cache, pad_token_id=pad) if t.eval_strategy != "no" else None

        config_hash = hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()[:16]
        checkpoints = CheckpointManager(
            run_dir / "checkpoints", rank=rt.rank, world_size=rt.world_size, device=rt.device, save_total_limit=t.save_total_limit, config_hash=config_hash,
            process_group=rt.checkpoint_group, config=OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")),  # type: ignore[arg-type]  # a mapping at the top
            allow_config_change=t.resume_with_changed_config,
        )
        checkpoints.clean_incomplete()
        if dist.is_initialized():
            dist.barrier()
        state = LoopState()
        resume_from = None
        resume = t.resume
        if (rt.env.restart_count or rt.env.requeue_count) and checkpoints.complete():
            # A restart of this same job (torchrun's elastic restart, SLURM's requeue) continues its
            # own progress, whatever resume said for the first start (none, or another run's path).
            resume = "auto"
        if restored := checkpoints.restore(resume, strategy):
            resume_from, saved = restored
            state = LoopState(**saved["loop"])
            if t.resume_with_changed_config:  # the new values apply from the restored step on
                apply_new_config(strategy, cfg)
            log.info("resumed from %s at step %d (epoch %d, %d samples into it)", resume_from, state.step, state.epoch, state.consumed)
        metrics = MetricsLogger(run_dir, enabled=rt.is_main, total_steps=plan.total_steps, tensorboard_dir=t.logging_dir, report_to=t.report_to, start_step=state.step)
        if resume_from:
            metrics.log({"event": "resume", "step": state.step, "checkpoint": str(resume_from), **({"note": saved["note"]} if "note" in saved else {})})  # note: a model-only checkpoint

        trainer = Trainer(
            cfg=cfg, plan=plan, runtime=rt, strategy=strategy, train_set=train_set, eval_set=eval_set, checkpoints=checkpoints, metrics=metrics, state=state,
            with_logits=with_logits, metric_fn=metric_fn,
        )
        # Ends this rank if it stalls after SIGTERM; evaluation batches and saves count as progress.
        Watchdog(rt.stop, state, rank=rt.rank, log_file=run_dir / "logs" / f"rank-{rt.rank}.log", activity=trainer.activity).start()
        result = trainer.fit()
        if cfg.peft.enabled and result["status"] != "stopped":  # LoRA: the base the adapter belongs to did not move
            from trainer.lora import check_frozen_unchanged

            checked, skipped = check_frozen_unchanged(strategy.model)
            log.info("peft: frozen base weights unchanged: %d tensors held on this rank equal %s's bit for bit (%d 4-bit ones not compared)", checked, cfg.model.name_or_path, skipped)
        if t.load_best_model_at_end and state.best_model_step is not None and result["status"] != "stopped":
            best = run_dir / "checkpoints" / f"step-{state.best_model_step}"
            checkpoints.load(best, strategy)
            log.info("loaded the best model (step %d, %s %.4g)", state.best_model_step, t.metric_for_best_model, state.best_model_metric)
        if t.export_final and result["status"] != "stopped":
            write_final(run_dir / "final", strategy, cfg, is_main=rt.is_main)
        result.update(global_step=state.step, epoch=state.epoch, metrics={"train_loss": trainer.last_train_loss, **state.last_eval}, best_metric=state.best_metric, best_step=state.best_step, skipped_steps=state.skipped_steps)
        metrics.close()
        return 0
    except BaseException as exc:
        stalled = None
        if rt.world_size > 1 and is_collective_timeout(exc):  # find and name the rank that stalled
            stalled = name_stalled_ranks(exc, rank=rt.rank, group=rt.checkpoint_group, timeout_s=min(t.ddp_timeout, 10))
        result = {"status": "failed", "error": f"{type(stalled or exc).__name__}: {stalled or exc}", "rank": rt.rank}
        log.exception("rank %d failed", rt.rank)
        if stalled is not None:
            log.error("%s: %s", type(stalled).__name__, stalled)
            raise stalled from exc
        raise
    finally:
        if rt.is_main:
            # In a SLURM job, a stop by USR2 (the time limit is near) asks for a requeue, up to a cap.
            result = stop_status(result, signal_name=rt.stop.name, job_id=rt.env.job_id, restarts=rt.env.requeue_count, max_requeues=cfg.cluster.max_requeues)
            write_result(run_dir, result, rt.stop.name)
        close_runtime(rt)


def needs_logits(t: TrainConfig) -> str:
    """The setting that needs logits from the model, or ""."""
    if t.label_smoothing_factor:
        return f"train.label_smoothing_factor={t.label_smoothing_factor:g}"
    if t.eval_metric == "eval_accuracy" and t.eval_strategy != "no":
        return "train.metric_for_best_model=eval_accuracy"
    return "train.compute_metrics" if t.compute_metrics else ""


def write_result(run_dir: Path, result: dict, signal_name: str) -> None:
    """result.json, written last: sweeps and the launcher read it."""
    result = {**result, "signal": signal_name or None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result["metrics"] = {k: v for k, v in result.get("metrics", {}).items() if v is not None}
    atomic_write(run_dir / "result.json", json.dumps(result, indent=2) + "\n")  # fsynced: sweeps and SLURM requeues read it


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
