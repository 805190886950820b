"""TrainingArguments fields of issue 15 item 6 that change how a step runs: neftune_noise_alpha,
gradient_checkpointing_kwargs, and the data loader's num_workers, pin_memory, persistent_workers
and prefetch_factor (data.*), each with Trainer's meaning or refused.

BASE is the one real 2-rank job that tests/test_compile.py and tests/test_autobatch.py compare
against too: it runs once per test session, side by side with the runs compared with it
(tests/conftest.py `share`; the tests read shared_runs["base"])."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from launcher.errors import ConfigError
from launcher.schema import DataConfig, RunConfig, StrategyConfig, TrainConfig
from tests.conftest import SLOW_VARIANT, TINY, Run, share

# Per-device batch 2 x accumulation 4 on 2 ranks (16 samples a step), an evaluation before the
# first step and after the last; no dropout, so two runs differ only by what a test changes.
BASE = [
    *TINY, "model.dropout=0.0", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=4", "train.max_steps=4",
    "train.eval_strategy=steps", "train.eval_steps=4", "train.eval_on_start=true", "train.eval_max_batches=2", "train.report_to=[]",
]
share("base", *BASE)  # made once per session, beside the runs compared with it (tests/conftest.py)


def losses(run: Run) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.metrics() if "loss" in m}


def eval_losses(run: Run) -> dict[int, float]:
    return {m["step"]: m["eval_loss"] for m in run.metrics() if "eval_loss" in m}


def rank_log(run: Run, rank: int = 0) -> str:
    return (run.run_dir / "logs" / f"rank-{rank}.log").read_text()


# -- neftune_noise_alpha ----------------------------------------------------------------------------


NEFTUNE = share("neftune", *BASE, "train.neftune_noise_alpha=5")


def test_neftune_adds_noise_to_training_but_not_to_evaluation(shared_runs):
    base = shared_runs["base"]
    run = shared_runs[NEFTUNE]
    # The same initial weights evaluated without noise: bit-identical before the first step.
    assert eval_losses(run)[0] == eval_losses(base)[0]
    # Training's forward sees noisy embeddings from the first step on.
    noisy, clean = losses(run), losses(base)
    assert sorted(noisy) == sorted(clean) == [1, 2, 3, 4]
    assert all(abs(noisy[s] - clean[s]) > 1e-4 for s in noisy)


def test_neftune_noise_is_trainers_uniform_bound_in_training_only():
    from trainer.model import GPT
    from trainer.strategies.base import activate_neftune

    torch.manual_seed(0)
    model = GPT(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=8)
    ids = torch.randint(0, 32, (3, 16))
    clean = model.wte(ids)
    activate_neftune(model, 5.0)
    noise = model.wte(ids) - clean
    bound = 5.0 / (16 * 8) ** 0.5  # alpha / sqrt(L * d)
    assert noise.abs().max() <= bound and noise.abs().max() > bound / 2
    model.eval()
    assert torch.equal(model.wte(ids), clean)


# -- gradient_checkpointing_kwargs ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,reentrant", [({}, False), ({"use_reentrant": True}, True)])
def test_gradient_checkpointing_kwargs_reach_torch_checkpoint(kwargs, reentrant):
    """use_reentrant=True runs torch's reentrant CheckpointFunction (its own autograd node); the
    default, non-reentrant form leaves none."""
    from trainer.model import GPT
    from trainer.strategies.base import enable_gradient_checkpointing

    model = GPT(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=8)
    enable_gradient_checkpointing(model, kwargs)
    out = model(torch.randint(0, 32, (2, 16)))
    assert ("CheckpointFunctionBackward" in autograd_nodes(out)) == reentrant


def autograd_nodes(out: torch.Tensor) -> set[str]:
    """The class names of every node of out's backward graph."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@SLOW_VARIANT
def test_gradient_checkpointing_kwargs_reach_a_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.strategies.base import enable_gradient_checkpointing

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    for kwargs, reentrant in (({}, False), ({"use_reentrant": True}, True)):
        model = LlamaForCausalLM(config).train()
        enable_gradient_checkpointing(model, kwargs)
        out = model(input_ids=torch.randint(0, 64, (2, 8))).logits
        assert ("CheckpointFunctionBackward" in autograd_nodes(out)) == reentrant


@pytest.mark.parametrize("train,strategy,data,key", [
    (dict(gradient_checkpointing_kwargs={"use_reentrant": False}), "ddp", {}, "train.gradient_checkpointing_kwargs"),  # without checkpointing
    (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"context_fn": "x"}), "ddp", {}, "train.gradient_checkpointing_kwargs"),
    (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": 1}), "ddp", {}, "train.gradient_checkpointing_kwargs.use_reentrant"),
    (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}), "fsdp", {}, "train.gradient_checkpointing_kwargs.use_reentrant"),
    (dict(neftune_noise_alpha=0.0), "ddp", {}, "train.neftune_noise_alpha"),
    (dict(auto_find_batch_size=True), "zero2", {}, "train.auto_find_batch_size"),
    (dict(auto_find_batch_size=True, dataloader_drop_last=True), "ddp", {}, "train.auto_find_batch_size"),
    (dict(torch_compile_backend="nvfuser"), "ddp", {}, "train.torch_compile_backend"),
    ({}, "ddp", dict(prefetch_factor=4), "data.prefetch_factor"),  # without worker processes, as Trainer
    ({}, "ddp", dict(num_workers=2, persistent_workers=True), "data.persistent_workers"),
])
def test_field_refusals_name_the_key(train, strategy, data, key):
    cfg = RunConfig(train=TrainConfig(output_dir="x", **train), strategy=StrategyConfig(name=strategy, zero_stage=2 if strategy == "zero2" else 0), data=DataConfig(**data))
    with pytest.raises(ConfigError) as err:
        cfg.check()
    assert err.value.key == key, err.value


def test_a_compile_mode_turns_compilation_on_as_trainer():
    assert TrainConfig(output_dir="x", torch_compile_mode="max-autotune").torch_compile


# -- data loader: num_workers, prefetch_factor, pin_memory -------------------------------------------


class Recorded(torch.utils.data.Dataset):
    """Samples (index, pid of the process that loaded it); counts every load in shared memory."""

    def __init__(self, n: int) -> None:
        self.n, self.loads = n, multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with self.loads.get_lock():
            self.loads.value += 1
        row = torch.tensor([i, os.getpid()])
        return row, row


def loader(dataset, **kwargs):
    from trainer.data import train_batches
    from trainer.loop import LoopState

    options = dict(usable=len(dataset), step_samples=4, batch_size=2, rank=0, world_size=2, seed=0, num_workers=0, pin_memory=False)
    return train_batches(dataset, LoopState(), **{**options, **kwargs})


def test_worker_processes_load_the_same_batches():
    plain = [next(b)["input_ids"] for b in [loader(Recorded(32))] for _ in range(6)]
    workers = loader(Recorded(32), num_workers=2)
    loaded = [next(workers)["input_ids"] for _ in range(6)]
    assert [t[:, 0].tolist() for t in loaded] == [t[:, 0].tolist() for t in plain]
    pids = {int(p) for t in loaded for p in t[:, 1]}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes did the loading


@pytest.mark.parametrize("prefetch_factor", [None, 4])
def test_prefetch_factor_is_how_many_batches_a_worker_loads_ahead(prefetch_factor):
    dataset = Recorded(64)
    batches = loader(dataset, num_workers=1, prefetch_factor=prefetch_factor)
    next(batches)
    # One worker keeps prefetch_factor batches (torch's default 2) in flight; the one taken is replaced.
    expected = ((prefetch_factor or 2) + 1) * 2
    deadline = time.monotonic() + 20
    while dataset.loads.value < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert dataset.loads.value == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory is page-locked host memory for CUDA copies: no CUDA here")
@pytest.mark.parametrize("pin", [True, False])
def test_pin_memory_pins_batches_on_cuda(pin):
    batch = next(loader(Recorded(16), num_workers=1, pin_memory=pin))
    assert batch["input_ids"].is_pinned() == pin
