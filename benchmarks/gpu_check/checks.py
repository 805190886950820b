"""The checks of `python -m benchmarks.gpu_check`: the launcher runs each GPU path needs, and how
their run directories are judged. Pure data and judging; runner.py starts the runs.

Every run is one rank on one GPU (`cluster.nproc_per_node=1`): one GPU cannot host two NCCL ranks.
A judge reads what the run left (metrics.jsonl, plan.json, result.json, final/, the probe's peak
memory), fills `fig` with its figures, and raises CheckFailed naming what is wrong.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.gpu_check.runner import Outcome

Judge = Callable[["Runs", dict[str, Any]], None]


class CheckFailed(Exception):
    """A check's verdict: the run went, but what it did is not what the issue asks for."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


@dataclass(frozen=True, kw_only=True)
class Launch:
    """One `python -m launcher +hw=PROFILE ...` run; `name` is also its run directory's name, and
    runs of the same name are shared between checks (the DDP reference of the sharded checks)."""

    name: str
    overrides: dict[str, object]
    env: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    what: str
    launches: tuple[Launch, ...] = ()  # every run the judge may ask for (the dry run checks all)
    judge: Judge | None = None  # None: the path is not built yet

    def launch(self, name: str) -> Launch:
        return next(launch for launch in self.launches if launch.name == name)


class Runs:
    """What a judge sees: runs[name] starts that launch on first use (or reuses a shared one)."""

    def __init__(self, check: Check, start: Callable[[Launch], Outcome]) -> None:
        self.check, self.start = check, start

    def __getitem__(self, name: str) -> Outcome:
        return self.start(self.check.launch(name))


# -- the runs --------------------------------------------------------------------------------------

# A 10 M-parameter byte-level GPT on the Python standard library: learns visibly in 30 steps, and a
# run costs little more than its start-up on a GPU. No evaluation, no TensorBoard (a second to import).
SMALL: dict[str, object] = {
    "cluster.nproc_per_node": 1,
    "model": "gpt_small",
    "data.max_bytes": 2_000_000,
    "data.seq_len": 256,
    "train.per_device_train_batch_size": 16,
    "train.max_steps": 30,
    "train.logging_steps": 1,
    "train.eval_strategy": "no",
    "train.save_strategy": "no",
    "train.report_to": "[]",
    "train.export_final": "false",
}
# The same effective batch in two micro-batches: the sharded strategies' accumulation boundary too.
SHARDED = {**SMALL, "train.per_device_train_batch_size": 8, "train.gradient_accumulation_steps": 2}
# GPT-2 small (124 M) on random tokens of its vocabulary: no I/O, sequences of 1024.
GPT2 = {
    "cluster.nproc_per_node": 1,
    "model": "gpt2_small",
    "data": "synthetic",
    "data.seq_len": 1024,
    "data.num_samples": 100_000,
    "train.bf16": "true",
    "train.eval_strategy": "no",
    "train.save_strategy": "no",
    "train.report_to": "[]",
    "train.export_final": "false",
    "train.logging_first_step": "false",
}
# Resume: checkpoints every 10 steps, dropout on (the CUDA RNG state must come back too), fp32.
RESUME = {**SMALL, "model.dropout": 0.1, "train.save_strategy": "steps", "train.save_steps": 10, "train.export_final": "true", "cluster.max_restarts": 1}

BF16 = Launch(name="bf16", overrides={**SMALL, "train.bf16": "true"}, env={"NCCL_DEBUG": "INFO"})
DDP_FP32 = Launch(name="ddp_fp32", overrides={**SHARDED, "strategy": "ddp"})
KILL_AT, SAVE_EVERY = 15, 10

# Tolerances. Same seed, data and fp32 math (PyTorch keeps TF32 off for matmuls by default); only
# the order of floating-point reductions differs, and GPU kernels add atomics (1e-5 on the CPU).
LOSS_RTOL = 1e-4
MEMORY_RTOL = 0.25  # measured peak against the plan's estimate
MFU_GOAL = 0.40


# -- reading a run ---------------------------------------------------------------------------------


def losses(o: Outcome) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in o.metrics() if "loss" in e}


def median_after(o: Outcome, key: str, warmup_steps: int) -> float | None:
    """The median of a logged figure over the windows after warm-up (the first holds CUDA's start)."""
    values = [e[key] for e in o.metrics() if key in e and e["step"] > warmup_steps]
    return statistics.median(values) if values else None


def completed(o: Outcome, fig: dict[str, Any], prefix: str = "") -> list[float]:
    """The run ended `completed` with finite losses; their first and last go into fig."""
    result = o.result()
    fig[f"{prefix}status"] = result.get("status")
    require(result.get("status") == "completed", f"{o.name}: result.json says {result.get('status')}: {result.get('error', '')}")
    values = list(losses(o).values())
    require(bool(values), f"{o.name}: no loss in metrics.jsonl")
    fig[f"{prefix}loss_first"], fig[f"{prefix}loss_last"] = values[0], values[-1]
    require(all(math.isfinite(v) for v in values), f"{o.name}: non-finite losses {[v for v in values if not math.isfinite(v)][:3]}")
    return values


def learned(o: Outcome, fig: dict[str, Any], prefix: str = "") -> None:
    values = completed(o, fig, prefix)
    require(values[-1] < values[0] - 0.5, f"{o.name}: the loss went from {values[0]:.4g} to {values[-1]:.4g} in {len(values)} steps; it should fall by more than 0.5")


def peak_memory(o: Outcome, fig: dict[str, Any], prefix: str = "") -> float | None:
    """GB: torch.cuda.max_memory_allocated of the rank (the probe), and nvidia-smi's device peak."""
    fig[f"{prefix}max_memory_allocated_gb"] = o.max_memory_allocated_gb()
    fig[f"{prefix}nvidia_smi_peak_gb"] = o.smi_peak_gb
    return fig[f"{prefix}max_memory_allocated_gb"]


# -- the judges ------------------------------------------------------------------------------------


def judge_bf16(runs: Runs, fig: dict[str, Any]) -> None:
    o = runs["bf16"]
    plan = o.plan()
    fig.update(backend=plan["backend"], precision=plan["precision"], world_size=plan["world_size"])
    learned(o, fig)
    fig["tokens_per_s"] = median_after(o, "tokens_per_s", 5)
    peak_memory(o, fig)
    require((plan["backend"], plan["precision"], plan["world_size"]) == ("nccl", "bf16", 1), f"plan says backend {plan['backend']}, precision {plan['precision']}, world size {plan['world_size']}")
    fig["nccl_initialised"] = "NCCL INFO" in o.output  # NCCL_DEBUG=INFO prints as it sets up
    require(
        fig["nccl_initialised"],
        "trained in bf16, but NCCL never started (no 'NCCL INFO' line with NCCL_DEBUG=INFO): at world size 1 "
        "trainer/runtime.py skips init_process_group, so the nccl backend of the plan is not exercised",
    )


OVERFLOW_AT = 5


def judge_fp16(runs: Runs, fig: dict[str, Any]) -> None:
    """GradScaler starts at 2**16; an overflow makes the gradient norm inf or nan and the scaler
    skips the update. The schedule must not advance on it: lr logged at step s (after the step)
    equals the one at step s-1. RINGLEADER_FAULT=overflow forces one at step OVERFLOW_AT."""
    o = runs["fp16"]
    values = completed(o, fig)
    events = {e["step"]: e for e in o.metrics() if "learning_rate" in e}
    overflow = sorted(s for s, e in events.items() if not math.isfinite(e["grad_norm"]))
    base_lr = float(o.config()["optimizer"]["learning_rate"])  # lr before step 1 (no warm-up)
    advanced = [s for s in overflow if events[s]["learning_rate"] != events.get(s - 1, {"learning_rate": base_lr})["learning_rate"]]
    fig.update(precision=o.plan()["precision"], overflow_steps=overflow, lr_advanced_on_overflow_steps=advanced, skipped_steps_in_result=o.result().get("skipped_steps"))
    require(values[-1] < values[0], f"the loss did not fall: {values[0]:.4g} -> {values[-1]:.4g}")
    require(OVERFLOW_AT in overflow, f"the forced overflow at step {OVERFLOW_AT} (RINGLEADER_FAULT=overflow) did not show as a non-finite gradient norm; overflows at {overflow}")
    require(fig["skipped_steps_in_result"] == len(overflow), f"result.json counts {fig['skipped_steps_in_result']} skipped steps, the metrics {len(overflow)} overflows")
    require(not advanced, f"the learning-rate schedule advanced on overflow step(s) {advanced}: trainer/strategies/native.py steps the scheduler when the scaler skipped the update")


def judge_paged(name: str) -> Judge:
    def judge(runs: Runs, fig: dict[str, Any]) -> None:
        o = runs[name]
        learned(o, fig)
        peak_memory(o, fig)
        fig["tokens_per_s"] = median_after(o, "tokens_per_s", 5)
        reference = runs["bf16"]  # the same run with torch's AdamW
        try:
            want = completed(reference, {})[-1]
            fig["adamw_loss_last"] = want
            fig["loss_last_over_adamw"] = round(fig["loss_last"] / want, 4)
        except CheckFailed as exc:
            fig["adamw_reference"] = f"unavailable: {exc}"

    return judge


def judge_sharded(strategy: str) -> Judge:
    def judge(runs: Runs, fig: dict[str, Any]) -> None:
        ref, got = runs["ddp_fp32"], runs[strategy]
        completed(ref, fig, "ddp_")
        completed(got, fig)
        peak_memory(got, fig)
        a, b = losses(ref), losses(got)
        require(sorted(a) == sorted(b), f"logged steps differ from ddp's: {sorted(b)[:5]} vs {sorted(a)[:5]}")
        rel = {s: abs(a[s] - b[s]) / abs(a[s]) for s in a}
        worst = max(rel, key=rel.__getitem__)
        fig.update(steps=len(a), max_loss_rel_diff=rel[worst], at_step=worst, tolerance=LOSS_RTOL)
        norms = [(m["grad_norm"], n["grad_norm"]) for m, n in zip(ref.metrics(), got.metrics()) if "grad_norm" in m and "grad_norm" in n]
        fig["max_grad_norm_rel_diff"] = max((abs(x - y) / abs(x) for x, y in norms if x), default=None)
        require(rel[worst] <= LOSS_RTOL, f"{strategy} step {worst}: loss {b[worst]} vs ddp {a[worst]} (relative {rel[worst]:.2e} > {LOSS_RTOL})")

    return judge


def judge_checkpointing(runs: Runs, fig: dict[str, Any]) -> None:
    """Peak memory with and without, against the plan's estimate (launcher/memory.py)."""
    measured: dict[str, float] = {}
    for name in ("gc_off", "gc_on"):
        o = runs[name]
        completed(o, fig, f"{name}_")
        peak = peak_memory(o, fig, f"{name}_")
        memory = o.plan()["memory"]
        fig[f"{name}_plan_total_gb"] = round(memory["total"], 3)
        fig[f"{name}_plan_activations_gb"] = round(memory["activations"], 3)
        fig[f"{name}_step_time_s"] = median_after(o, "step_time_s", 2)
        if peak is None:  # the probe wrote nothing: fall back to the device's figure, and say so
            fig["note"] = "max_memory_allocated missing (the probe wrote nothing): nvidia-smi's peak used instead"
            peak = o.smi_peak_gb
        require(peak is not None, f"{name}: no peak memory measured (neither the probe nor nvidia-smi)")
        measured[name] = peak
        fig[f"{name}_measured_over_plan"] = round(peak / memory["total"], 3)
    off, on = fig["gc_off_step_time_s"], fig["gc_on_step_time_s"]
    if off and on:
        fig["step_time_ratio"] = round(on / off, 3)
    fig["peak_ratio"] = round(measured["gc_on"] / measured["gc_off"], 3)
    require(measured["gc_on"] < measured["gc_off"], f"checkpointing did not lower the peak: {measured['gc_on']:.2f} GB on, {measured['gc_off']:.2f} GB off")
    for name in ("gc_off", "gc_on"):
        ratio = fig[f"{name}_measured_over_plan"]
        require(abs(ratio - 1) <= MEMORY_RTOL, f"{name}: measured peak {measured[name]:.2f} GB is {ratio:.2f}x the plan's estimate {fig[f'{name}_plan_total_gb']} GB (tolerance {MEMORY_RTOL:.0%})")


def judge_resume(runs: Runs, fig: dict[str, Any]) -> None:
    """An uninterrupted run against one whose rank SIGKILLs itself at step 15; torchrun restarts
    it (max_restarts=1) and it resumes from step-10. final/model.safetensors must match bit for bit."""
    ref, got = runs["resume_reference"], runs["resume_killed"]
    completed(ref, fig, "reference_")
    completed(got, fig)
    log = got.rank_log(0)
    fig["fault_fired"] = "fault injection" in log
    fig["resumed_from_step_10"] = f"step-{SAVE_EVERY} at step {SAVE_EVERY}" in log
    require(fig["fault_fired"], f"the fault step:0:{KILL_AT} did not fire (no 'fault injection' in logs/rank-0.log)")
    require(fig["resumed_from_step_10"], f"no 'resumed from .../step-{SAVE_EVERY} at step {SAVE_EVERY}' in logs/rank-0.log")
    differ, max_diff = compare_weights(got, ref)
    fig.update(tensors_differing=differ, max_abs_diff=max_diff)
    if differ:
        again = runs["resume_reference_again"]  # is the GPU itself deterministic?
        completed(again, {})
        control, control_diff = compare_weights(again, ref)
        fig.update(uninterrupted_runs_tensors_differing=control, uninterrupted_runs_max_abs_diff=control_diff)
        require(
            not control,
            f"{differ} tensors differ after the resume (max {max_diff:.3g}), but two uninterrupted runs differ too ({control} tensors, max {control_diff:.3g}): "
            "the GPU run is not deterministic; the trainer would need torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8",
        )
    require(not differ, f"{differ} tensors of final/model.safetensors differ from the uninterrupted run's (max abs diff {max_diff:.3g})")


def compare_weights(a: Outcome, b: Outcome) -> tuple[int, float]:
    """(tensors that differ, their largest absolute difference), read on the CPU."""
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(str(o.run_dir / "final" / "model.safetensors")) for o in (a, b))
    require(sorted(x) == sorted(y), "the two final/model.safetensors hold different tensor names")
    require(all(t.dtype == torch.float32 for t in x.values()), "final weights are not fp32")
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    return len(differ), max((float((x[k] - y[k]).abs().max()) for k in differ), default=0.0)


def judge_mfu(runs: Runs, fig: dict[str, Any]) -> None:
    """MFU = 6 N tokens/s / peak (the issue's definition; N from plan.json). nanoGPT's, which adds
    attention's 12 L T d per token, is reported beside it."""
    o = runs["mfu"]
    completed(o, fig)
    cfg, plan = o.config(), o.plan()
    n = int(plan["memory"]["num_parameters"])
    peak = float(cfg["hw"]["peak_tflops_bf16"])
    tps = median_after(o, "tokens_per_s", 10)
    require(tps is not None, "no tokens_per_s after step 10 in metrics.jsonl")
    require(peak > 0, f"the hw profile {cfg['hw']['name']} has no peak_tflops_bf16")
    m, seq = cfg["model"], cfg["data"]["seq_len"]
    attention = 12 * m["n_layer"] * m["n_embd"] * seq
    fig.update(
        num_parameters=n, tokens_per_s=tps, step_time_s=median_after(o, "step_time_s", 10), peak_tflops_bf16=peak,
        mfu=round(6 * n * tps / (peak * 1e12), 4), mfu_with_attention=round((6 * n + attention) * tps / (peak * 1e12), 4),
        batch=plan["per_device_train_batch_size"], seq_len=seq, torch_compile=False, goal=MFU_GOAL,
    )
    peak_memory(o, fig)
    require(fig["mfu"] >= MFU_GOAL, f"MFU {fig['mfu']:.1%} is below the goal of {MFU_GOAL:.0%} (torch.compile cannot help yet: the launcher refuses train.torch_compile)")


def not_built(name_and_what: str) -> Check:
    name, what = name_and_what.split(": ", 1)
    return Check(name=name, what=what)


# In the order they run: the headline figures first, DeepSpeed's slower start-ups and bitsandbytes
# (which may not be installed) last.
CHECKS: tuple[Check, ...] = (
    Check(name="nccl_bf16", what="NCCL at world size 1, bf16 autocast on CUDA", launches=(BF16,), judge=judge_bf16),
    Check(
        name="fp16_scaler", what="fp16 with a gradient scaler: an overflow is skipped, the schedule does not advance on it",
        launches=(Launch(name="fp16", overrides={**SMALL, "train.fp16": "true", "scheduler": "linear", "scheduler.warmup_steps": 0}, env={"RINGLEADER_FAULT": f"overflow:0:{OVERFLOW_AT}"}),), judge=judge_fp16,
    ),
    Check(
        name="mfu_gpt2_small", what=f"model FLOPs utilisation of gpt2_small in bf16 (goal {MFU_GOAL:.0%}), tokens/s, peak memory",
        launches=(Launch(name="mfu", overrides={**GPT2, "train.per_device_train_batch_size": 32, "train.max_steps": 60, "train.logging_steps": 10}),),
        judge=judge_mfu,
    ),
    Check(
        name="gradient_checkpointing", what="gpt2_small bf16: max_memory_allocated with and without checkpointing, against the plan",
        launches=tuple(Launch(name=f"gc_{k}", overrides={**GPT2, "train.per_device_train_batch_size": 16, "train.max_steps": 10, "train.logging_steps": 2, "train.gradient_checkpointing": v}) for k, v in (("off", "false"), ("on", "true"))),
        judge=judge_checkpointing,
    ),
    Check(
        name="resume", what=f"checkpoint, SIGKILL at step {KILL_AT}, resume: bit-identical fp32 weights",
        launches=(
            Launch(name="resume_reference", overrides=RESUME),
            Launch(name="resume_killed", overrides=RESUME, env={"RINGLEADER_FAULT": f"step:0:{KILL_AT}"}),
            Launch(name="resume_reference_again", overrides=RESUME),
        ),
        judge=judge_resume,
    ),
    *(
        Check(name=s, what=f"{s} on CUDA: the same losses as ddp (fp32, accumulation 2)", launches=(DDP_FP32, Launch(name=s, overrides={**SHARDED, "strategy": s})), judge=judge_sharded(s))
        for s in ("fsdp", "zero2", "zero3")
    ),
    *(
        Check(name=opt, what=f"bitsandbytes' {opt} trains (beside torch's AdamW)", launches=(Launch(name=opt, overrides={**SMALL, "train.bf16": "true", "optimizer": opt}), BF16), judge=judge_paged(opt))
        for opt in ("paged_adamw_32bit", "paged_adamw_8bit")
    ),
    not_built("transformers_sdpa: a transformers model with attn_implementation=sdpa (and FlashAttention): there is no model=hf yet"),
    not_built("lora: LoRA adapters: model.lora is not built yet"),
    not_built("qlora_4bit: 4-bit QLoRA: not built yet"),
)
