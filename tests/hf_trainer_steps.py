"""Hugging Face Trainer itself, run on a one-parameter model, recording what it does at every
optimizer step: the step number, the samples it trained on (their indices, from every process),
the learning rate the step used, and where epochs ended. tests/test_trainer_parity.py compares
ringleader's plan, sampler and runs with it. In-process for one process (`record`), or as a
script under torchrun for several:

    python -m torch.distributed.run --nproc_per_node=2 tests/hf_trainer_steps.py CASES.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.nn as nn

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")


class Indices(torch.utils.data.Dataset):
    """Sample i is the token i: the model sees which samples a step trained on."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i])}


class OneWeight(nn.Module):
    """The smallest model Trainer trains; it notes the sample indices of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen: list[int] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.seen.extend(input_ids.view(-1).tolist())
        return {"loss": ((self.w * (input_ids.float().mean() + 1.0)) ** 2).sum()}


def record(case: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Trainer on Indices(case["n"]) with the case's batch, accumulation, epochs or max_steps,
    warmup and drop_last, a linear schedule. Returns, per optimizer step, this process's sample
    indices and the learning rate the step used, and the global step at each epoch's end."""
    import gc

    from transformers import Trainer, TrainerCallback, TrainingArguments

    # Trainer.train starts with accelerate's free_memory, a gc.collect over every object the imports
    # made (1.2 s a call here); frozen, they are not traversed again.
    gc.freeze()
    model = OneWeight()
    steps: list[dict[str, Any]] = []
    epoch_ends: list[int] = []

    class Recorder(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # before the schedule moves: the step's rate
            steps.append({"lr": float(optimizer.param_groups[0]["lr"]), "ids": list(model.seen)})
            model.seen.clear()

        def on_epoch_end(self, args, state, control, **kwargs):
            epoch_ends.append(state.global_step)

    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=case["batch"], gradient_accumulation_steps=case["accumulation"],
        num_train_epochs=case.get("epochs", 1.0), max_steps=case.get("max_steps", -1), warmup_steps=case.get("warmup", 0),
        lr_scheduler_type="linear", learning_rate=0.1, optim="sgd", dataloader_drop_last=case.get("drop_last", False),
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Indices(case["n"]), callbacks=[Recorder()])
    try:
        trainer.train()
    finally:
        gc.unfreeze()  # the test process's later collections as they were
    return {"global_step": trainer.state.global_step, "steps": steps, "epoch_ends": epoch_ends}


def main(cases_file: str, out_file: str) -> None:
    """Every case under this torchrun job; rank 0 writes the records, each step's indices from all ranks."""
    import torch.distributed as dist

    cases = json.loads(open(cases_file).read())
    out = []
    for i, case in enumerate(cases):
        rec = record(case, os.path.join(os.path.dirname(out_file), f"hf-{i}"))
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, [s["ids"] for s in rec["steps"]])
        for k, step in enumerate(rec["steps"]):
            step["ids"] = [i for rank in every for i in rank[k]]
        out.append(rec)
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump(out, f)
    # Trainer (accelerate) leaves its process group up; torn down at interpreter exit, gloo's threads
    # sometimes abort the process ("terminate called without an active exception", exit -6).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
