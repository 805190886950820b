"""Model FLOPs utilisation in the log events (issue 16 item 6): with hw.peak_tflops_bf16 set, every
training log event carries `mfu` = tokens/s per rank x the model's FLOPs per token / peak. On the
CPU the peak is set by hand (a profile's GPU figure would give ~0); the formula is the same."""

from __future__ import annotations

import pytest

from tests.conftest import TRAINS
from trainer.metrics import model_flops_per_token
from trainer.model import GPT

PEAK = 0.002  # TFLOP/s: makes this CPU's utilisation a number of order 0.1..10


def test_log_events_carry_mfu_from_tokens_per_second(shared_runs):
    run = shared_runs["trains"]  # tests/conftest.py TRAINS: the TINY model, hw.peak_tflops_bf16=PEAK
    assert f"hw.peak_tflops_bf16={PEAK}" in TRAINS
    events = [m for m in run.metrics() if "loss" in m]
    assert events and all("mfu" in e for e in events)
    flops = GPT(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32).flops_per_token(seq_len=32)
    world = run.plan()["world_size"]
    for e in events:
        # tokens_per_s is rounded to 0.1 in the event: compare within that rounding
        assert e["mfu"] == pytest.approx(e["tokens_per_s"] / world * flops / (PEAK * 1e12), rel=1e-3, abs=1e-5)


def test_without_a_peak_there_is_no_mfu_and_other_models_count_6n(shared_runs):
    run = shared_runs["one_rank"]  # tests/conftest.py ONE_RANK: no peak set
    assert not any("mfu" in m for m in run.metrics())
    import torch.nn as nn

    assert model_flops_per_token(nn.Linear(10, 10), seq_len=8) == 6 * 110
