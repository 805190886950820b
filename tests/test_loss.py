"""Token-exact loss (DESIGN.md "Loss"): on padded, variable-length data with masked prompts, and a
deliberately uneven split of labelled tokens over micro-batches and ranks (tests/user_code.py's
MaskedPrompts), 2 ranks x batch 2 x accumulation 2 under each strategy give the same weights after
SGD steps as one process on the whole batch of 8, within fp32 rounding, and the logged loss is the
summed cross-entropy of the step's labelled tokens over their number, computed here independently.

Averaging each micro-batch's mean instead (what transformers #34242/#37766 are about) moves the
weights by ~10x the tolerance here: tested below on the same data, so the data does tell."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.conftest import SLOW_VARIANT, Run, run_launcher, side_by_side
from trainer.data import ResumableSampler
from trainer.model import GPT
from trainer.model_io import collate, summed_cross_entropy
from tests.user_code import masked_prompts

SEQ, STEPS, LR, SEED = 16, 2, 2.0, 42
GPT_ARGS = {"vocab_size": 256, "block_size": SEQ, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, "bias": True}
COMMON = [
    "model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"model.block_size={SEQ}",
    "data._target_=tests.user_code.masked_prompts", f"data.seq_len={SEQ}", "data.num_samples=64",
    "optimizer=sgd", f"optimizer.learning_rate={LR}", "optimizer.momentum=0", "optimizer.weight_decay=0", "scheduler=constant",
    "train.max_grad_norm=0", f"train.max_steps={STEPS}", "train.logging_steps=1", "train.eval_strategy=no", "train.save_strategy=no", f"train.seed={SEED}",
    "train.report_to=[]",  # no TensorBoard: importing it costs a second a run
]
ONE_PROCESS = ["cluster.nproc_per_node=1", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1"]
TWO_RANKS = ["cluster.nproc_per_node=2", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2"]


def first_step_loss() -> float:
    """The step-1 loss by hand: the plan's first 8 samples, the initial weights, sum / count."""
    order = ResumableSampler(64, usable=64, epoch=0, consumed=0, rank=0, world_size=1, seed=SEED).order()[:8]
    data = masked_prompts(split="train", seq_len=SEQ)
    batch = collate([data[int(i)] for i in order])
    torch.manual_seed(SEED)
    model = GPT(**GPT_ARGS)
    with torch.no_grad():
        return float(summed_cross_entropy(model(batch["input_ids"]), batch["labels"]) / (batch["labels"] != -100).sum())


def losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics() if "loss" in m]


# tests/user_code.py's Bigram, which returns the mean over its labels (test_a_user_model_returning_the_mean_is_token_exact_too).
BIGRAM = [c for c in COMMON if not c.startswith("model.")] + ["model._target_=tests.user_code.Bigram", "+model.kwargs.vocab=256", "model.num_parameters=65536"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The one-process reference, 2 ranks under each default strategy, and the Bigram pair: made
    once, side by side (tests/conftest.py). The zero2 variant runs its own."""
    root = tmp_path_factory.mktemp("loss")
    strategies = {s: partial(run_launcher, root / s, *COMMON, *TWO_RANKS, f"strategy={s}") for s in ("zero3", "fsdp", "ddp")}  # DeepSpeed's, the longest, first
    return side_by_side(
        **strategies, one=partial(run_launcher, root / "one", *COMMON, *ONE_PROCESS),
        bigram_one=partial(run_launcher, root / "bigram_one", *BIGRAM, *ONE_PROCESS), bigram_two=partial(run_launcher, root / "bigram_two", *BIGRAM, *TWO_RANKS),
    )


@pytest.fixture(scope="module")
def reference(runs) -> tuple:
    run = runs["one"]
    return run.weights(), losses(run)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("zero2", marks=SLOW_VARIANT), "zero3"])  # zero2: zero3's engine.backward path
def test_two_ranks_with_accumulation_equal_one_process_on_the_whole_batch(strategy, runs, reference, tmp_path):
    weights, logged = reference
    assert logged[0] == pytest.approx(first_step_loss(), rel=1e-6)
    run = runs[strategy] if strategy in runs else run_launcher(tmp_path / strategy, *COMMON, *TWO_RANKS, f"strategy={strategy}")
    assert losses(run) == pytest.approx(logged, rel=1e-5)
    moved = max(float((weights[k] - w0).abs().max()) for k, w0 in initial_weights().items() if k in weights)
    assert moved > 1e-2, "the SGD steps must move the weights well beyond the tolerance"
    got = run.weights()
    for name, expected in weights.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{strategy} {name}: {m}")


def initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    return {k: v.detach().clone() for k, v in GPT(**GPT_ARGS).state_dict().items()}


def test_a_user_model_returning_the_mean_is_token_exact_too(runs):
    """tests/user_code.py's Bigram returns F.cross_entropy's mean; ringleader turns it back into a
    sum (mean x labelled tokens), so it is token-exact as well."""
    one, two = runs["bigram_one"], runs["bigram_two"]  # BIGRAM on one process, and on 2 ranks x accumulation 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    torch.testing.assert_close(two.weights()["table.weight"], one.weights()["table.weight"], rtol=1e-5, atol=2e-6)


def test_the_data_tells_a_per_micro_batch_mean_from_the_token_mean():
    """On the first step's micro-batches (rank r takes every 2nd sample, micro-batches of 2), the
    gradient of the mean of micro-batch means differs from the token-mean's by far more than the
    tolerance above: the equality tested there is not a coincidence of the data."""
    order = ResumableSampler(64, usable=64, epoch=0, consumed=0, rank=0, world_size=1, seed=SEED).order()[:8]
    data = masked_prompts(split="train", seq_len=SEQ)
    samples = [data[int(i)] for i in order]
    torch.manual_seed(SEED)
    model = GPT(**GPT_ARGS)
    # global micro-batch k is samples[4k : 4k+4]; rank r takes samples[4k + r :: 2] of it
    micro = [collate(samples[4 * k + r : 4 * k + 4 : 2]) for k in range(2) for r in range(2)]
    whole = collate(samples)

    def grad(loss_fn) -> torch.Tensor:
        model.zero_grad()
        loss_fn().backward()
        return model.lm_head.weight.grad.clone()

    exact = grad(lambda: summed_cross_entropy(model(whole["input_ids"]), whole["labels"]) / (whole["labels"] != -100).sum())
    naive = grad(lambda: sum(model(b["input_ids"], b["labels"]) for b in micro) / len(micro))
    assert float((LR * (exact - naive)).abs().max()) > 1e-4


def test_the_model_call_contract_for_transformers_logits_and_mean_models(monkeypatch):
    """trainer/model_io.py in one process: a transformers causal LM is called without labels and
    its summed loss over the aligned labels equals transformers' own (shifting) mean x count; a
    model returning logits and one returning the mean give the same sum; tuples and dicts collate
    to the same batch."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model_io import loss_sum_and_count

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    ids = torch.randint(0, 256, (2, 10))
    aligned = torch.full_like(ids, -100)
    aligned[:, :-1] = ids[:, 1:]
    aligned[0, :4] = -100  # a masked prompt
    total, count = loss_sum_and_count(llama, {"input_ids": ids, "labels": aligned, "attention_mask": torch.ones_like(ids)})
    unshifted = torch.full_like(ids, -100)
    unshifted[:, 1:] = aligned[:, :-1]  # what transformers shifts itself
    assert int(count) == 14
    assert float(total) == pytest.approx(float(llama(input_ids=ids, labels=unshifted).loss) * 14, rel=1e-5)

    gpt = GPT(**GPT_ARGS)
    batch = collate([(ids[i], aligned[i]) for i in range(2)])
    assert torch.equal(batch["input_ids"], ids) and torch.equal(collate([{"input_ids": ids[i], "labels": aligned[i]} for i in range(2)])["labels"], aligned)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, input_ids, labels):
            return self.gpt(input_ids)

    mean_sum, _ = loss_sum_and_count(gpt, batch)
    logits_sum, _ = loss_sum_and_count(Logits(), batch)
    assert float(mean_sum) == pytest.approx(float(logits_sum), rel=1e-5)
