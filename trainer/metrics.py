"""Rank 0's record of the run: metrics.jsonl, TensorBoard, and the console (a progress bar on a
terminal, plain lines otherwise). Files are appended to, so restarts continue them. Also what a
log event derives: model FLOPs utilisation."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ringleader")


def model_flops_per_token(model: Any, *, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token: the model's own `flops_per_token(seq_len)`
    where it has one (ringleader's GPT: PaLM's 6N + 12 L T d, with its attention term), else 6 x the
    parameter count (the dense estimate; attention not counted, so MFU reads a little low).
    Counted through DDP and DeepSpeed wrappers, with ZeRO-3's partitioned parameters at full size
    (ds_numel) and FSDP's DTensors at their global size."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "flops_per_token"):
        return float(inner.flops_per_token(seq_len=seq_len))
    return 6.0 * sum(getattr(p, "ds_numel", p.numel()) for p in inner.parameters())


def mfu(tokens_per_s_per_rank: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one accelerator: achieved model FLOPs over its peak."""
    return tokens_per_s_per_rank * flops_per_token / (peak_tflops * 1e12)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, tensorboard_dir: str, report_to: list[str], start_step: int) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.tensorboard_dir = tensorboard_dir
        from trainer.trackers import open_trackers, resolve_report_to  # wandb/mlflow: trainer/trackers.py

        self.use_tensorboard = enabled and "tensorboard" in resolve_report_to(report_to)
        self.trackers = open_trackers(run_dir, report_to) if enabled else None
        self.writer: Any = None  # created at the first event: importing TensorBoard costs ~1 s
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def log(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        event = {"time": round(time.time(), 3), **event}
        assert self.file is not None
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if self.use_tensorboard:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.tensorboard_dir)
            prefix = "eval" if any(k.startswith("eval_") for k in event) else "train"
            for key, value in event.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                    name = key.replace("eval_", "eval/") if key.startswith("eval_") else f"{prefix}/{key}"
                    self.writer.add_scalar(name, value, event.get("step", 0))
            if isinstance(event.get("generations"), list):  # train.eval_prompts (trainer/generate.py)
                from trainer.generate import as_markdown

                self.writer.add_text("eval/generations", as_markdown(event["generations"]), event.get("step", 0))
            self.writer.flush()
        if self.trackers is not None:
            self.trackers.log(event)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items() if k != "time")
        log.info(text)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.close()
        if self.file is not None:
            self.file.close()
