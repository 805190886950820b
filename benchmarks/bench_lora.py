"""LoRA against full fine-tuning of the same transformers model at world size 2 (CPU, gloo):
per-rank model-state memory, measured and planned, under ddp and zero3; and step time.

Memory, measured after the backward of a second step (parameters, gradients and optimizer states
all exist): the bytes of the tensors that hold them on each rank, each storage once: parameters
(local partitions under ZeRO-3; the frozen base included), gradients (.grad; ZeRO-3's flat
gradient partitions) and optimizer states (the optimizer's state tensors; ZeRO-3's fp32
partitions of the trainable parameters and their moments). Beside it, as
benchmarks/bench_memory.py measures, the bytes glibc's malloc has handed out (mallinfo2) minus
the same before the model was built; that misses weights transformers leaves memory-mapped from
the safetensors file (a frozen base stays so: LoRA's malloc figure is far below its states).
Planned: the plan's estimate (launcher/memory.py estimate: parameters + gradients + optimizer,
and with LoRA the frozen base's weights).
The model: a Llama of the shipped tiny one's shape scaled up (hidden 512, 6 layers, ~21 M
parameters, random weights saved as a from_pretrained folder), so the states dwarf malloc's
few MB of Python objects. DeepSpeed knobs as bench_memory's (no persistent parameters, small
buckets).

Step time: the real launcher on the shipped tiny Llama (a from_pretrained folder of its random
weights) and the stdlib instruction set, 2 ranks, ddp, peft=lora against peft=none, alternated
(A B B A), the median of each run's logged step times after the first window.

    python -m benchmarks.bench_lora [--skip-memory] [--skip-time] [--steps 40] [--repeat 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_memory import DS_KNOBS, malloc_in_use, publish, storage_bytes, two_steps
from benchmarks.common import ROOT, env, record, run

LARGER = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
METHODS = ("none", "lora")


def make_base(folder: Path, **overrides: int) -> Path:
    """A from_pretrained folder (weights, config, tokenizer) of the shipped tiny Llama's
    architecture with `overrides`, random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.hf_config import package_path

    shipped = Path(package_path("pkg:trainer/assets/llama_tiny"))
    config = AutoConfig.from_pretrained(shipped)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for f in shipped.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) optimizer state, each storage once."""
    import torch

    found: list = []

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return storage_bytes(found)


def worker(base: str) -> None:
    import torch
    import torch.distributed as dist

    from launcher.compose import compose
    from launcher.memory import estimate
    from trainer.build import build_model
    from trainer.strategies import build_strategy

    dist.init_process_group("gloo")
    import deepspeed  # its import and communication set-up stay outside the measured window

    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    world = dist.get_world_size()
    torch.set_num_threads(1)
    for strategy_name in ("ddp", "zero3"):
        for method in METHODS:
            overrides = [
                f"strategy={strategy_name}", "model=hf", f"model.name_or_path={base}", "data=stdlib_instruct", "data.seq_len=64",
                "train.per_device_train_batch_size=2", "train.output_dir=/unused", "+hw=cpu", f"peft={method}",
            ]
            if strategy_name.startswith("zero"):
                overrides += DS_KNOBS
            cfg = compose(overrides).config
            ds_config = None
            if strategy_name.startswith("zero"):
                from launcher.deepspeed_config import deepspeed_config

                ds_config = deepspeed_config(cfg, world_size=world)
            gc.collect()
            before = malloc_in_use()
            torch.manual_seed(0)
            model = build_model(cfg.model, strategy=strategy_name, seed=0, deepspeed=ds_config, peft=cfg.peft)
            strategy = build_strategy(strategy_name, cfg=cfg, device=torch.device("cpu"))
            strategy.setup(model, total_steps=10, warmup_steps=0)
            held, params, p_bytes, g_bytes = two_steps(strategy, 4096, before, zero_grad_partitions=True)
            opt = strategy.optimizer
            if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: fp32 partitions + the inner optimizer's moments
                o_bytes = tensor_bytes(list(opt.fp32_partitioned_groups_flat)) + tensor_bytes(dict(opt.optimizer.state))
            else:
                o_bytes = tensor_bytes(dict(opt.state))
            trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
            total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            est = estimate(cfg, world_size=world)
            # LoRA: the frozen base's weights, then the adapter's parameters, gradients and optimizer states.
            plan_states = sum(est.per_rank.get(k, 0.0) for k in ("frozen_parameters", "parameters", "gradients", "optimizer")) * 1e9
            publish([held, p_bytes, g_bytes, o_bytes], {
                "strategy": strategy_name, "peft": method, "parameters": total, "trainable": trainable, "plan_bytes": plan_states, "plan_per_rank_gb": est.per_rank,
            }, strategy)
            del strategy, model, params
            gc.collect()
            dist.barrier()
    dist.destroy_process_group()


def memory(base: Path) -> list[dict]:
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "benchmarks" / "bench_lora.py"), "--worker", str(base)], timeout=900, env=env(**OFFLINE))
    rows = []
    for line in proc.stdout.splitlines():
        if not line.startswith("MEM "):
            continue
        r = json.loads(line[4:])
        held = max(x[0] for x in r["per_rank"])
        states = max(x[1] + x[2] + x[3] for x in r["per_rank"])
        rows.append({
            "strategy": r["strategy"], "peft": r["peft"], "parameters": r["parameters"], "trainable_parameters": r["trainable"],
            "held_bytes_per_rank": [int(x[0]) for x in r["per_rank"]],
            "param_bytes_per_rank": [int(x[1]) for x in r["per_rank"]],
            "grad_bytes_per_rank": [int(x[2]) for x in r["per_rank"]],
            "optimizer_bytes_per_rank": [int(x[3]) for x in r["per_rank"]],
            "plan_estimate_bytes": int(r["plan_bytes"]),
            "plan_per_rank_gb": r["plan_per_rank_gb"],
            "model_state_bytes_per_rank": [int(x[1] + x[2] + x[3]) for x in r["per_rank"]],
            "measured_over_plan": round(states / r["plan_bytes"], 3) if r["plan_bytes"] else None,
            "malloc_held_over_plan": round(held / r["plan_bytes"], 3) if r["plan_bytes"] else None,
        })
    for row in rows:  # LoRA's states over full fine-tuning's, same strategy
        full = next(f for f in rows if f["strategy"] == row["strategy"] and f["peft"] == "none")
        row["model_states_over_full_finetuning"] = round(max(row["model_state_bytes_per_rank"]) / max(full["model_state_bytes_per_rank"]), 3)
    return rows


def step_times(base: Path, *, steps: int, repeat: int, cache: Path) -> dict:
    """Median logged step time of each run (after its first logging window), runs alternated."""
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    order = [m for i in range(repeat) for m in (METHODS if i % 2 == 0 else METHODS[::-1])]
    for i, method in enumerate(order):
        out = cache / f"run-{i}-{method}"
        run([
            sys.executable, "-m", "launcher", "model=hf", f"model.name_or_path={base}", "data=stdlib_instruct", "data.seq_len=128", f"peft={method}",
            "strategy=ddp", f"train.max_steps={steps}", "train.logging_steps=5", "train.per_device_train_batch_size=8", "train.eval_strategy=no",
            "train.save_strategy=no", "train.export_final=false", "optimizer.learning_rate=1e-3", f"train.output_dir={out}",
        ], env=env(XDG_CACHE_HOME=str(cache / "xdg"), **OFFLINE), timeout=900)
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        windows = [m["step_time_s"] for m in logged if "step_time_s" in m][1:]
        times[method].append(statistics.median(windows))
    lora, full = statistics.median(times["lora"]), statistics.median(times["none"])
    return {"model": "llama_tiny (random weights, from_pretrained folder)", "strategy": "ddp", "steps": steps, "runs_each": repeat,
            "step_time_s": {"lora": times["lora"], "full": times["none"]}, "lora_over_full": round(lora / full, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    result: dict = {"world_size": 2, "device": "cpu, gloo", "goals": "plan within 10% of the measured model states (ddp and zero3, LoRA and full)"}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_memory:
            base = make_base(Path(tmp) / "larger", **LARGER)
            result["memory_model"] = {"architecture": "llama", **LARGER, "vocab_size": 4096}
            result["memory"] = memory(base)
        if not args.skip_time:
            result["step_time"] = step_times(make_base(Path(tmp) / "tiny"), steps=args.steps, repeat=args.repeat, cache=Path(tmp))
    # A part skipped this time keeps its latest recorded figures (each part is rerun on its own).
    from benchmarks.common import RESULTS

    previous = RESULTS / "lora.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        for key in ("memory_model", "memory", "step_time"):
            if key not in result and key in old:
                result[key] = old[key]
    record("lora", result)


if __name__ == "__main__":
    main()
